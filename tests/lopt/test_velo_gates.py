"""Two kernel entry points on VeLO's torch.optim shell path.

``lopt_velo_gates``: the gate pre-activations of VeLO's per-tensor LSTM, with the two
512 x 2048 weight matrices read once from column panels. It must equal the torch products
on the same weight snapshot (another summation order: float32 rounding), give the same
bits for every thread count and refuse malformed arguments by name.

``lopt_first_nonfinite``: the step guard's check of the gradients in one C pass. It must
give the same answer as ``torch.isfinite`` per tensor, and a shell step with a bad
gradient must raise (or skip) with nothing written, naming the tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.errors import NonFiniteError
from metaopt.lopt import cpu_kernels
from metaopt.lopt.velo import VeLO

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason="no C compiler: the kernels cannot be built here")


@pytest.fixture(scope="module")
def kern() -> cpu_kernels.LoptCpuKernels:
    return cpu_kernels.load_kernels()


@pytest.fixture(scope="module")
def snapshot() -> tuple[VeLO, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    velo = VeLO()
    with torch.no_grad():  # random meta-parameters of a realistic scale
        for p in velo.parameters():
            p.normal_(0.0, 0.05)
        return velo, velo.derived_meta_parameters()


def _torch_gates(meta, x, h):
    """The snapshot's gates through torch's products (the shell's reference path)."""
    pooled = torch.relu(torch.addmm(meta["pool_b"], x, meta["pool_w"])).amax(dim=0)
    gates = torch.addmm(torch.addmv(meta["lstm_bias"], meta["gates_pool"], pooled), x,
                        meta["lstm_fold"])
    return torch.addmm(gates, h, meta["gates_h"])


def _gates(kern, meta, x, h):
    return kern.velo_gates(x, h, meta["pool_w"], meta["pool_b"], meta["lstm_fold"],
                           meta["lstm_bias"], meta["gates_h_panels"], meta["gates_pool_panels"])


def test_gate_panels_hold_the_matrix_column_panel_by_column_panel():
    w = torch.arange(3 * 64, dtype=torch.float32).reshape(3, 64)
    panels = cpu_kernels.gate_panels(w)
    assert panels.shape == (2, 3, cpu_kernels.GATE_PANEL) and panels.is_contiguous()
    for q in range(2):
        assert torch.equal(panels[q], w[:, q * 32:(q + 1) * 32])
    with pytest.raises(ValueError, match="multiple of 32 columns, got 40"):
        cpu_kernels.gate_panels(torch.zeros(3, 40))


@pytest.mark.parametrize("rows", [1, 8, 13])  # one row, one block of 8, a partial block
def test_gates_equal_torch_products_to_float32_rounding(kern, snapshot, rows):
    _, meta = snapshot
    torch.manual_seed(rows)
    x, h = torch.randn(rows, 30), 0.5 * torch.randn(rows, 512)
    got, want = _gates(kern, meta, x, h), _torch_gates(meta, x, h)
    assert got.shape == (rows, 2048)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a row's gates depend on that row's x and h only (plus the pooling over all rows)
    h2 = h.clone()
    h2[0] += 1.0
    changed = (_gates(kern, meta, x, h2) != got).any(dim=1)
    assert changed[0] and not changed[1:].any()


def test_gates_do_not_depend_on_the_thread_count(kern, snapshot):
    _, meta = snapshot
    x, h = torch.randn(11, 30), torch.randn(11, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _gates(kern, meta, x, h)
        torch.set_num_threads(2)
        two = _gates(kern, meta, x, h)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_gates_refuse_malformed_arguments_by_name(kern, snapshot):
    _, meta = snapshot
    x, h = torch.randn(4, 30), torch.randn(4, 512)
    args = dict(pool_w=meta["pool_w"], pool_b=meta["pool_b"], fold=meta["lstm_fold"],
                bias=meta["lstm_bias"], w_hidden=meta["gates_h_panels"],
                w_pooled=meta["gates_pool_panels"])
    with pytest.raises(ValueError, match="'w_hidden' must have shape"):
        kern.velo_gates(x, h, **{**args, "w_hidden": meta["gates_h"]})  # not panels
    with pytest.raises(ValueError, match="'x' .* and 'hidden' .* do not fit"):
        kern.velo_gates(x[:3], h, **args)
    with pytest.raises(ValueError, match="'hidden' must be a contiguous float32"):
        kern.velo_gates(x, h.double(), **args)


def test_rnn_on_the_snapshot_with_kernel_equals_torch(kern, snapshot):
    """VeLO.rnn on the shell's snapshot: controls, lr_mult and the next LSTM state with the
    gate kernel equal the torch products' to float32 rounding. (The whole shell step with
    the kernels against the reference backend: test_cpu_kernels.py.)"""
    velo, meta = snapshot
    assert "gates_h_panels" in meta and "gates_pool_panels" in meta
    torch.manual_seed(3)
    x, h, c = torch.randn(9, 30), 0.5 * torch.randn(9, 512), torch.randn(9, 512)
    with torch.no_grad():
        for a, b in zip(velo.rnn(x, h, c, meta, kern), velo.rnn(x, h, c, meta, None)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_nonfinite_agrees_with_torch(kern):
    torch.manual_seed(0)
    ts = [torch.randn(n) for n in (5, 1000, 17, 3)]
    assert kern.first_nonfinite(ts) == -1
    assert kern.first_nonfinite([]) == -1
    for bad in (math.nan, math.inf, -math.inf):
        for j in range(len(ts)):
            broken = [t.clone() for t in ts]
            broken[j][len(broken[j]) // 2] = bad
            assert kern.first_nonfinite(broken) == j
    huge = [torch.full((8,), 3e38)]  # finite values whose sum overflows
    assert kern.first_nonfinite(huge) == -1
    with pytest.raises(ValueError, match=r"'tensors\[1\]' must be a contiguous float32"):
        kern.first_nonfinite([ts[0], ts[1].double()])


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_shell_guard_refuses_a_bad_gradient_before_writing(snapshot, mode):
    velo, _ = snapshot
    model = torch.nn.Linear(6, 4)
    opt = velo.optimizer(model.parameters(), num_steps=50, backend="cpu_kernels",
                         nonfinite=mode)
    x = torch.randn(8, 6)
    for _ in range(2):  # plans are built after the first step
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss=loss.detach())
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[model.weight].items()
                    if isinstance(v, torch.Tensor)}
    model.bias.grad[1] = math.nan
    if mode == "raise":
        with pytest.raises(NonFiniteError, match="gradient of '1' has 1 non-finite"):
            opt.step(loss=loss.detach())
    else:
        with pytest.warns(RuntimeWarning, match="step skipped"):
            opt.step(loss=loss.detach())
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p.detach(), p0)
    for k, v in state_before.items():
        assert torch.equal(opt.state[model.weight][k], v)
