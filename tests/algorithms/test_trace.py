"""The traced forward (``metaopt/algorithms/_trace.py``), an explicit accelerator of
``FunctionalModel``:

* where it runs, it is bit-identical to ``functional_call`` (values, first- and
  second-order gradients), for every module type it accepts, with or without the exact
  pool-before-ReLU rewrite;
* models and configurations it does not support use ``functional_call`` by a decision
  made once (own ``forward``, modules outside ``TRACEABLE``, hooks, parametrizations,
  active dropout, a trace that raises ``Untraceable``/``TraceError``, a failed
  verification) — no silent switch per call;
* verification is deterministic (a probe input, the model's own tensors) and gives the
  same decision inside ``vmap``/``grad``;
* settings are arguments only: no environment variable is read in ``metaopt/algorithms``,
  no bare ``except Exception`` and no ``torch._C`` in the accelerator.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import _trace
from metaopt.algorithms._model import FunctionalModel
from metaopt.errors import ConfigError
from metaopt.params import functional_call

ALGORITHMS = Path(__file__).resolve().parents[2] / "metaopt" / "algorithms"


def _conv_net(c_in: int = 1, channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(c_in, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * 4, 3),
    ).train()


def _reference(model: nn.Module, fm: FunctionalModel, params, x):
    return functional_call(model, params, (x,), buffers=fm.buffers(), strict=False)


def _second_order(fn, params: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of ``‖∂L/∂θ‖²`` (a MAML-like second-order quantity) w.r.t. θ."""
    loss = fn(params, x).square().mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    outer = sum(g.square().sum() for g in grads)
    return list(torch.autograd.grad(outer, list(params.values())))


# --------------------------------------------------------------------------- bit-identity
@pytest.mark.parametrize("rewrites", ["exact", "none"])
def test_trace_is_bit_identical_to_functional_call_to_second_order(rewrites):
    model = _conv_net()
    fm = FunctionalModel(model, rewrites=rewrites)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8)
    x[0] = torch.round(x[0])  # ties, exact zeros: the awkward cases for argmax
    x[1] = -x[1].abs()  # windows with no positive entry
    assert fm.traced() is None  # not decided before the first call
    fm(params, x)
    assert fm.traced() is True
    assert torch.equal(fm(params, x), _reference(model, fm, params, x))
    got = _second_order(fm, params, x)
    expected = _second_order(lambda p, x: _reference(model, fm, p, x), params, x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_exact_rewrite_moves_the_pool_before_the_relu_and_none_does_not():
    model = _conv_net()
    exact, plain = _trace.TracedForward(model, "exact"), _trace.TracedForward(model, "none")
    assert exact.module.code.index("max_pool2d") < exact.module.code.index("relu(")
    assert plain.module.code.index("relu(") < plain.module.code.index("max_pool2d")


def test_relu_with_another_user_is_not_moved():
    class Both(nn.Module):
        def forward(self, x):
            r = F.relu(x)
            return F.max_pool2d(r, 2).sum() + r.sum()

    graph = torch.fx.symbolic_trace(Both()).graph
    assert not _trace._pool_before_relu(graph)


_TYPE_MODELS = {  # one small model per TRACEABLE type (input shape, model)
    "linear": ((5, 3), lambda: nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.ReLU6())),
    "acts1": ((5, 3), lambda: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2),
                                                    nn.ELU(), nn.GELU(), nn.SiLU())),
    "acts": ((5, 3), lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sigmoid(),
                                           nn.Softplus(), nn.Hardtanh(), nn.Softmax(-1),
                                           nn.LogSoftmax(-1))),
    "bn1d": ((6, 3), lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                                           nn.LayerNorm(4))),
    "conv1d": ((4, 2, 9), lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3),
                                                nn.ReLU(), nn.MaxPool1d(2), nn.AvgPool1d(2),
                                                nn.AdaptiveAvgPool1d(1), nn.Flatten())),
    "conv2d": ((3, 2, 9, 9), lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2),
                                                   nn.BatchNorm2d(4), nn.MaxPool2d(2),
                                                   nn.Dropout2d(0.0),
                                                   nn.GroupNorm(2, 4), nn.ReLU(),
                                                   nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2),
                                                   nn.Flatten(), nn.Unflatten(1, (4, 4)))),
    "conv3d": ((2, 1, 6, 6, 6), lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2),
                                                      nn.ReLU(), nn.MaxPool3d(2),
                                                      nn.Dropout3d(0.0), nn.AvgPool3d(1))),
    "dropout_eval": ((5, 3), lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5),
                                                   nn.Dropout1d(0.0), nn.AlphaDropout(0.0))),
}


def test_every_traceable_type_is_covered_by_a_model_below():
    covered = {type(m) for _, make in _TYPE_MODELS.values() for m in make().modules()}
    missing = set(_trace.TRACEABLE) - covered
    assert not missing, sorted(t.__name__ for t in missing)


@pytest.mark.parametrize("name", sorted(_TYPE_MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_each_traceable_type_is_traced_bit_for_bit(name, training):
    shape, make = _TYPE_MODELS[name]
    torch.manual_seed(4)
    model = make().double().train(training)
    if name == "dropout_eval":
        model.eval()
    fm = FunctionalModel(model)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    x = torch.randn(*shape, dtype=torch.float64)
    fm(params, x)
    assert fm.traced() is True, name
    assert torch.equal(fm(params, x), _reference(model, fm, params, x))
    got = _second_order(fm, params, x)
    expected = _second_order(lambda p, x: _reference(model, fm, p, x), params, x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_eval_mode_batchnorm_with_running_stats_is_traced_bit_for_bit():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    model.eval()
    fm = FunctionalModel(model)
    params, x = fm.parameters(), torch.randn(6, 1, 8, 8)
    first = fm(params, x)
    assert fm.traced() is True
    assert torch.equal(fm(params, x), first)
    assert "1.running_mean" in fm._traces[fm._configuration()].names


def test_training_batchnorm_with_tracked_stats_is_traced_and_leaves_them_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2)).train()
    fm = FunctionalModel(model)
    params, x = fm.parameters(), torch.randn(6, 1, 10, 10)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    first, second = fm(params, x), fm(params, x)
    assert fm.traced() is True and torch.equal(first, second)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_batchnorm_rank_error_survives_tracing():
    fm = FunctionalModel(nn.Sequential(nn.Conv2d(1, 2, 3),
                                       nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="expected 4D input"):
        fm(fm.parameters(), torch.randn(1, 6, 6))


# --------------------------------------------------------------------------- explicit decisions
def test_trace_false_always_uses_functional_call():
    model = _conv_net()
    fm = FunctionalModel(model, trace=False)
    params, x = fm.parameters(), torch.randn(4, 1, 8, 8)
    assert torch.equal(fm(params, x), _reference(model, fm, params, x))
    assert fm.traced() is False and not fm._traces


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2)),  # not in TRACEABLE
    nn.LSTMCell(3, 3),
], ids=["instance_norm", "lstm_cell"])
def test_modules_outside_the_allowlist_use_functional_call(model):
    fm = FunctionalModel(model)
    assert not _trace.traceable(model)
    x = torch.randn(2, 1, 6, 6) if isinstance(model, nn.Sequential) else torch.randn(2, 3)
    fm(fm.parameters(), x)
    assert fm.traced() is False and not fm._traces


def test_a_subclass_of_a_traceable_type_is_not_traced():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert not _trace.traceable(nn.Sequential(MyLinear(2, 2)))


def test_untraceable_and_trace_error_are_the_only_exceptions_that_mean_functional_call():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx raises TraceError
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    class Broken(nn.Module):  # any other error while tracing is a bug: it propagates
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            raise KeyError("bug")

    fm = FunctionalModel(Branchy())
    fm._configuration.traceable = True  # let it past the allowlist to reach the tracer
    x = torch.ones(3, 2)
    assert torch.equal(fm(fm.parameters(), x), _reference(fm.model, fm, fm.parameters(), x))
    assert fm.traced() is False
    broken = FunctionalModel(Broken())
    broken._configuration.traceable = True
    with pytest.raises(KeyError, match="bug"):
        broken(broken.parameters(), x)


def test_a_trace_that_fails_verification_is_not_used():
    model = _conv_net()
    fm = FunctionalModel(model)
    mode = fm._configuration()
    trace = _trace.TracedForward(model)
    plain = trace.fn
    trace.fn = lambda *args: plain(*args) * (1 + 1e-6)  # off in the last bits
    fm._traces[mode] = trace
    params, x = fm.parameters(), torch.randn(4, 1, 8, 8)
    for _ in range(2):
        assert torch.equal(fm(params, x), _reference(model, fm, params, x))
    assert fm.traced() is False and mode in fm._untraced


def test_verification_does_not_depend_on_the_call_values_or_transforms():
    """The probe is fixed: the first call under vmap or grad decides as a plain one."""
    x = torch.randn(5, 3, dtype=torch.float64)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    plain = FunctionalModel(fresh())
    plain(plain.parameters(), x)
    under_vmap = FunctionalModel(fresh())
    params = under_vmap.parameters()
    batched = torch.vmap(lambda xi: under_vmap(params, xi))(x.unsqueeze(1))
    under_grad = FunctionalModel(fresh())
    g = torch.func.grad(lambda p: under_grad(p, x).sum())(under_grad.parameters())
    assert plain.traced() is under_vmap.traced() is under_grad.traced() is True
    ref = _reference(plain.model, plain, plain.parameters(), x)
    assert torch.equal(batched.squeeze(1), ref)
    g_ref = torch.func.grad(lambda p: _reference(plain.model, plain, p, x).sum())(
        plain.parameters())
    assert all(torch.equal(g[k], g_ref[k]) for k in g)


def test_active_dropout_uses_functional_call_and_eval_mode_is_traced():
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    fm = FunctionalModel(model)
    params, x = fm.parameters(), torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(3)
    out = fm(params, x)
    torch.manual_seed(3)
    assert torch.equal(out, _reference(model, fm, params, x))
    assert fm.traced() is False and not fm._traces  # decided without tracing
    model.eval()
    fm(params, x)
    assert fm.traced() is True


_HOOKS = {
    "forward": lambda m, calls: m.register_forward_hook(lambda *a: calls.append(1)),
    "forward_pre": lambda m, calls: m.register_forward_pre_hook(lambda *a: calls.append(1)),
    "full_backward": lambda m, calls: m.register_full_backward_hook(
        lambda *a: calls.append(1)),
    "full_backward_pre": lambda m, calls: m.register_full_backward_pre_hook(
        lambda *a: calls.append(1)),
    "global_forward": lambda m, calls: nn.modules.module.register_module_forward_hook(
        lambda *a: calls.append(1)),
    "global_full_backward": lambda m, calls:
        nn.modules.module.register_module_full_backward_hook(lambda *a: calls.append(1)),
}


@pytest.mark.parametrize("kind", sorted(_HOOKS))
def test_every_kind_of_hook_turns_the_trace_off_while_present(kind):
    """Pins the private hook registries ``_trace`` reads (torch has no public query; checked
    on torch 2.13): if torch renames one, the hook is missed and this test fails."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    fm = FunctionalModel(model)
    params, x = fm.parameters(), torch.randn(3, 2, requires_grad=True)
    fm(params, x)
    assert fm.traced() is True
    calls: list[int] = []
    handle = _HOOKS[kind](model[0], calls)
    try:
        assert fm.traced() is False
        fm(params, x).sum().backward()
        assert calls, "the hook did not run"
    finally:
        handle.remove()
    assert fm.traced() is True


def test_a_parametrization_turns_the_trace_off():
    model = nn.Sequential(nn.Linear(2, 2))
    fm = FunctionalModel(model)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    fm(fm.parameters(), torch.randn(3, 2))
    assert fm.traced() is False


# --------------------------------------------------------------------------- settings
def test_rewrite_levels_are_arguments_and_bad_ones_are_named():
    assert FunctionalModel(nn.Linear(2, 2)).rewrites == "exact"
    assert FunctionalModel(nn.Linear(2, 2), rewrites="none").rewrites == "none"
    with pytest.raises(ConfigError, match="'all'.*removed"):
        FunctionalModel(nn.Linear(2, 2), rewrites="all")
    with pytest.raises(ConfigError, match="rewrites must be one of"):
        FunctionalModel(nn.Linear(2, 2), rewrites="fastest")
    with pytest.raises(TypeError, match="trace must be a bool"):
        FunctionalModel(nn.Linear(2, 2), trace="yes")


def test_no_environment_variables_private_torch_or_bare_fallbacks():
    for path in ALGORITHMS.glob("*.py"):
        assert not re.search(r"os\.environ|getenv", path.read_text()), path.name
    for name in ("_trace.py", "_model.py"):
        text = (ALGORITHMS / name).read_text()
        assert "torch._C" not in text and "except Exception" not in text, name
        assert not re.search(r"except\s*:", text), name


def test_one_functional_call_wrapper():
    """FunctionalModel goes through metaopt.params.functional_call (the one wrapper)."""
    text = (ALGORITHMS / "_model.py").read_text()
    assert "torch.func.functional_call" not in text
    assert "from metaopt.params import Params, functional_call" in text
