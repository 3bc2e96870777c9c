"""The speed rewrites of a traced forward (``metaopt/algorithms/_rewrites.py``).

* pool-before-ReLU is exact: values, first- and second-order gradients bit-identical;
* the im2col GEMM equals ``F.conv2d`` to float rounding for general stride, padding,
  dilation and bias, and steps aside (calls ``F.conv2d`` itself) where it does not apply;
* ``FunctionalModel`` uses a rewritten trace only after verifying it, falls back to the
  plain trace when it fails, and the ``METAOPT_GRAPH_REWRITES=0`` switch turns it off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import _rewrites
from metaopt.algorithms._model import FunctionalModel, _fall_back_on_error, _TracedForward


def _conv_net(c_in: int = 1, channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(c_in, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * 4, 3),
    ).train()


def _second_order(fn, params: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of ``‖∂L/∂θ‖²`` (a MAML-like second-order quantity) w.r.t. θ."""
    names = list(params)
    loss = fn(*[params[n] for n in names], x).square().mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    outer = sum(g.square().sum() for g in grads)
    return list(torch.autograd.grad(outer, [params[n] for n in names]))


# --------------------------------------------------------------------------- pool before ReLU
def test_pool_before_relu_is_swapped_and_bit_identical_to_second_order():
    model = _conv_net().double()  # float64: the GEMM rule steps aside, only the swap acts
    trace = _TracedForward(model)
    code = trace.fast.__self__.code
    assert code.index("max_pool2d") < code.index("relu(")  # the pool now runs first
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    x[0] = torch.round(x[0])  # ties, exact zeros: the awkward cases for argmax
    x[1] = -x[1].abs()  # windows with no positive entry
    args = [params[n] for n in trace.names]
    assert torch.equal(trace.fast(*args, x), trace.fn(*args, x))
    got = _second_order(trace.fast, {n: params[n] for n in trace.names}, x)
    expected = _second_order(trace.fn, {n: params[n] for n in trace.names}, x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_relu_with_another_user_is_not_moved():
    class Both(nn.Module):  # never traced by FunctionalModel (own forward); rewrite directly
        def forward(self, x):
            r = F.relu(x)
            return F.max_pool2d(r, 2).sum() + r.sum()

    graph = torch.fx.symbolic_trace(Both()).graph
    assert _rewrites.rewrite(graph) is None


# --------------------------------------------------------------------------- conv as GEMM
CASES = [  # (c_in, kernel, stride, padding, dilation, bias)
    (1, 3, 1, 1, 1, True), (1, 3, 2, 0, 1, True), (1, 5, 1, 2, 2, False),
    (3, 3, (2, 1), (1, 0), (1, 2), True), (2, (3, 2), 1, "valid", 1, True), (1, 1, 1, 0, 1, False),
]


@pytest.mark.parametrize("c_in,kernel,stride,padding,dilation,bias", CASES)
def test_conv2d_gemm_matches_conv2d(c_in, kernel, stride, padding, dilation, bias):
    torch.manual_seed(2)
    conv = nn.Conv2d(c_in, 6, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=bias)
    x = torch.randn(4, c_in, 13, 11, requires_grad=True)
    args = (conv.stride, conv.padding, conv.dilation, 1)
    got = _rewrites.conv2d_gemm(x, conv.weight, conv.bias, *args)
    expected = F.conv2d(x, conv.weight, conv.bias, *args)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    inputs = [x, conv.weight] + ([conv.bias] if bias else [])

    def second(out):  # gradients and a second-order term, as MAML needs
        grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)

    for g, e in zip(second(got), second(expected)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@pytest.mark.parametrize("why", ["groups", "float64", "wide", "non_contiguous", "vmap"])
def test_conv2d_gemm_steps_aside(why):
    torch.manual_seed(3)
    c_in, groups, dtype = (2, 2, torch.float32) if why == "groups" else (1, 1, torch.float32)
    if why == "float64":
        dtype = torch.float64
    if why == "wide":
        c_in = 4  # 4·3·3 = 36 > GEMM_MAX_COLUMNS
    w = torch.randn(4, c_in // groups, 3, 3, dtype=dtype)
    b = torch.randn(4, dtype=dtype)
    x = torch.randn(3, c_in, 9, 9, dtype=dtype)
    if why == "non_contiguous":
        x = torch.randn(3, c_in, 9, 18)[..., ::2]  # strided: not contiguous
    if why == "vmap":
        xs = torch.randn(2, 3, c_in, 9, 9)
        got = torch.vmap(lambda xi: _rewrites.conv2d_gemm(xi, w, b, 1, 1, 1, 1))(xs)
        expected = torch.stack([F.conv2d(xi, w, b, 1, 1, 1, 1) for xi in xs])
    else:
        got = _rewrites.conv2d_gemm(x, w, b, 1, 1, 1, groups)
        expected = F.conv2d(x, w, b, 1, 1, 1, groups)
    assert torch.equal(got, expected)
    assert got.stride() == expected.stride()


# --------------------------------------------------------------------------- in FunctionalModel
def test_functional_model_uses_the_verified_rewrite_and_keeps_output_layout():
    model = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.MaxPool2d(2)).train()
    fm = FunctionalModel(model, rewrites=True)
    params = fm.parameters()
    x = torch.randn(7, 1, 12, 12)
    first = fm(params, x)  # functional_call's result; verifies both traces
    (mode, run), = fm._verified.items()
    assert run is not fm._traces[mode].fn  # the rewritten trace was accepted
    second = fm(params, x)
    assert second.stride() == first.stride()  # made contiguous again at the output
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-6)


def test_batchnorm_conv_net_is_traced_and_close_to_functional_call():
    model = _conv_net()
    fm = FunctionalModel(model)
    params = fm.parameters()
    x = torch.randn(10, 1, 8, 8)
    expected = fm(params, x)
    assert fm._verified
    torch.testing.assert_close(fm(params, x), expected, rtol=1e-5, atol=1e-5)


def test_switch_off_gives_functional_call_bit_for_bit(monkeypatch):
    monkeypatch.setenv(_rewrites.ENV_VAR, "0")
    model = _conv_net()
    fm = FunctionalModel(model)
    assert fm.rewrites == "none"
    params = fm.parameters()
    x = torch.randn(10, 1, 8, 8)
    first, second = fm(params, x), fm(params, x)
    (mode, run), = fm._verified.items()
    assert fm._traces[mode].fast is None and run == fm._traces[mode].fn
    assert torch.equal(first, second)


def test_a_rewrite_that_does_not_verify_is_not_used():
    model = _conv_net()
    fm = FunctionalModel(model)
    mode = fm._configuration()
    trace = fm._traces[mode] = fm._trace()
    plain = trace.fast
    trace.fast = lambda *args: plain(*args) * (1 + 1e-3)  # off by more than the tolerance
    x = torch.randn(10, 1, 8, 8)
    fm(fm.parameters(), x)
    assert fm._verified[mode] == trace.fn


def test_a_rewrite_that_raises_later_falls_back_to_the_plain_trace():
    """E.g. a ``.view`` that channels-last strides do not allow, on an input the first
    call's verification did not exercise: that call and later ones run the plain trace."""
    model = _conv_net()
    fm = FunctionalModel(model)
    params = fm.parameters()
    x = torch.randn(10, 1, 8, 8)
    fm(params, x)  # verified with the rewrite
    mode = fm._configuration()
    trace = fm._traces[mode]
    assert fm._verified[mode] is not trace.fn

    def broken(*args):
        raise RuntimeError("view size is not compatible with input tensor's size and stride")

    fm._verified[mode] = _fall_back_on_error(
        broken, trace.fn, lambda: fm._verified.__setitem__(mode, trace.fn))
    assert torch.equal(fm(params, x), trace.fn(*[params[n] for n in trace.names], x))
    assert fm._verified[mode] is trace.fn  # later calls skip the rewrite


def test_close_enough_checks_strides_and_non_finite_entries():
    a = torch.randn(2, 3, 4, 4)
    assert _rewrites.close_enough(a + 1e-7 * a.abs().max(), a)
    assert not _rewrites.close_enough(a.contiguous(memory_format=torch.channels_last), a)
    b = a.clone()
    b[0, 0, 0, 0] = float("nan")
    assert not _rewrites.close_enough(b, a)
    assert _rewrites.close_enough(b.clone(), b)


# --------------------------------------------------------------------------- BatchNorm tracing
def test_eval_mode_batchnorm_with_running_stats_is_traced_bit_for_bit():
    model = _conv_net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # eval mode reads running statistics
            m.track_running_stats = True
            m.register_buffer("running_mean", torch.randn(m.num_features) * 0.1)
            m.register_buffer("running_var", torch.rand(m.num_features) + 0.5)
            m.register_buffer("num_batches_tracked", torch.tensor(3))
    model.eval()
    fm = FunctionalModel(model, rewrites=False)
    params = fm.parameters()
    x = torch.randn(6, 1, 8, 8)
    first = fm(params, x)
    assert fm._verified
    assert torch.equal(fm(params, x), first)
    assert "running_mean" in " ".join(fm._traces[fm._configuration()].names)


def test_batchnorm_rank_error_survives_tracing():
    fm = FunctionalModel(nn.Sequential(nn.Conv2d(1, 2, 3),
                                       nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="expected 4D input"):
        fm(fm.parameters(), torch.randn(1, 6, 6))


def test_levels_default_exact_and_the_switch(monkeypatch):
    """The default level applies only the exact rule (bit-identical to functional_call,
    GEMM convolutions left out); ``all`` adds them; bad levels are named."""
    monkeypatch.delenv(_rewrites.ENV_VAR, raising=False)
    assert _rewrites.level() == "exact"
    assert _rewrites.level(True) == "all" and _rewrites.level(False) == "none"
    monkeypatch.setenv(_rewrites.ENV_VAR, "all")
    assert _rewrites.level() == "all"
    monkeypatch.setenv(_rewrites.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="METAOPT_GRAPH_REWRITES"):
        _rewrites.level()
    monkeypatch.delenv(_rewrites.ENV_VAR)
    model = _conv_net()
    fm = FunctionalModel(model)
    params = fm.parameters()
    x = torch.randn(10, 1, 8, 8)
    first, second = fm(params, x), fm(params, x)
    (mode, run), = fm._verified.items()
    fast = fm._traces[mode].fast
    assert fast is not None and run is not fm._traces[mode].fn  # the exact rewrite is used
    targets = {n.target for n in fast.__self__.graph.nodes}
    assert _rewrites.conv2d_gemm not in targets  # ... without the GEMM convolutions
    assert torch.equal(first, second)


def test_default_batchnorm_with_tracked_stats_is_traced_in_training_mode():
    """nn.BatchNorm2d's default (tracked running statistics) in training mode is traced as
    the batch-statistics call functional_call makes with FunctionalModel's None buffers,
    and the running statistics are left untouched."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2)).train()
    fm = FunctionalModel(model)
    params = fm.parameters()
    x = torch.randn(6, 1, 10, 10)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    first, second = fm(params, x), fm(params, x)
    assert fm._verified and torch.equal(first, second)
    (_, run), = fm._verified.items()
    assert run is not None
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
