"""VeLO's fast backend: the per-element half of a step in the fused CPU kernels.

:mod:`metaopt.lopt.velo` holds the architecture and its pure reference step. When the
step is given the kernels (``backend``, chosen once per optimizer instance), every
float32 CPU vector or matrix that needs no autograd graph goes through here instead of
:meth:`~metaopt.lopt.velo.VeLO._tensor_step`: pass 1 (accumulators, channel sums and the
old state's moments the LSTM reads), then — after the shared per-tensor LSTM — pass 2
(the mixed per-element MLP). In-place steps of the torch.optim shell use a
:class:`~metaopt.lopt.cpu_kernels.VeLOTensorPlan` per tensor, kept in the shell's
workspace. Equal to the reference to float32 rounding (tests/lopt/test_cpu_kernels.py,
tests/lopt/test_velo.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaopt.lopt.cpu_kernels import LoptCpuKernels, MLPSlots, VeLOPlanBatch, VeLOTensorPlan

if TYPE_CHECKING:
    from metaopt.lopt.velo import VeLO

__all__ = ["batch_for", "gather_supported", "kernel_mlp_gather", "kernel_moments", "kernel_ok",
           "pass1", "pass2", "plan_for", "scalars", "supports"]

_GROUPS = ("mom", "rms", "v_row", "v_col", "v_diag")


def supports(velo: VeLO, kern: LoptCpuKernels) -> bool:
    """Whether the library is built for this VeLO's shape (3 decays, 2 hidden layers of
    the released width)."""
    return gather_supported(velo) and kern.supports(len(velo.initial_momentum_decays),
                                                    velo.ff_hidden_size)


def gather_supported(velo: VeLO) -> bool:
    """Whether this VeLO's MLP stack has the layout :func:`kernel_mlp_gather` packs
    (two hidden layers, 1 rms and as many adafactor as momentum decays)."""
    return (velo.ff_hidden_layers == 2 and len(velo.initial_rms_decays) == 1
            and len(velo.initial_adafactor_decays) == len(velo.initial_momentum_decays))


def kernel_ok(p: Tensor, g: Tensor) -> bool:
    """Whether the fused kernel steps this tensor: a non-empty float32 CPU vector or matrix."""
    return (p.dim() in (1, 2) and p.dtype == torch.float32 and g.dtype == torch.float32
            and p.device.type == "cpu" and g.device.type == "cpu" and p.numel() > 0)


@functools.lru_cache(maxsize=8)
def kernel_mlp_gather(n_in: int, hidden: int, n_out: int, k: int, full: tuple[int, ...],
                      row: tuple[int, ...], col: tuple[int, ...]
                      ) -> tuple[Tensor, Tensor, MLPSlots, MLPSlots]:
    """Where the fused kernel's MLP arguments sit in a row of mixed MLP weights.

    A mixed row is ``[W0 (n_in, hidden), b0, W1 (hidden, hidden), b1, W2 (hidden, n_out),
    b2]`` flattened (see :meth:`VeLO._mixed_mlps`; ``full``, ``row``, ``col``: the first-layer input
    channels that vary per element, along rows and along columns); a zero is appended at index
    ``len(row)``. Returns ``(first, second, matrix, vector)``: ``row[first] + row[second]``
    packs, at the ``matrix`` slots, ``[w_x (18, H), w_stat (4k, H), b0, w1, b1, w2[:, :2],
    b2[:2]]`` and then, at the ``vector`` slots, ``[w_x (24, H), b0, w1, b1, w2[:, :2],
    b2[:2]]`` (the vector kernel takes each row/column statistic's two weights summed).
    """
    o_b0 = n_in * hidden
    o_w1 = o_b0 + hidden
    o_b1 = o_w1 + hidden * hidden
    o_w2 = o_b1 + hidden
    o_b2 = o_w2 + hidden * n_out
    zero = o_b2 + n_out

    full, row, col = list(full), list(row), list(col)

    def w0_rows(rows: Sequence[int]) -> list[int]:
        return [c * hidden + o for c in rows for o in range(hidden)]

    tail = (list(range(o_b0, o_b0 + hidden)) + list(range(o_w1, o_w1 + hidden * hidden))
            + list(range(o_b1, o_b1 + hidden))
            + [o_w2 + c * n_out + o for c in range(hidden) for o in range(2)]
            + [o_b2, o_b2 + 1])
    stat_rows = row[:k] + col[:k] + row[k:] + col[k:]
    matrix = w0_rows(full) + w0_rows(stat_rows) + tail
    diag_first = (w0_rows(full[:-3]) + w0_rows(row)
                  + w0_rows(full[-3:]) + tail)
    diag_second = ([zero] * (len(full[:-3]) * hidden) + w0_rows(col)
                   + [zero] * (3 * hidden + len(tail)))
    first = torch.tensor(matrix + diag_first, dtype=torch.long)
    second = torch.tensor([zero] * len(matrix) + diag_second, dtype=torch.long)
    matrix_slots = MLPSlots.after(0, len(full), 4 * k, hidden)
    vector_slots = MLPSlots.after(matrix_slots.end, len(full) + 2 * k, 0, hidden)
    assert matrix_slots.end == len(matrix) and vector_slots.end == len(first)
    return first, second, matrix_slots, vector_slots



def plan_for(velo: VeLO, kern: LoptCpuKernels, workspace: dict, key: str, p: Tensor,
             state: Mapping[str, Any]) -> VeLOTensorPlan | None:
    """The prepared in-place kernel calls of tensor ``key``, kept in ``workspace`` (the
    optimizer's, never the module's) and rebuilt when ``p`` or its state are other
    tensors than last time; None when the state is not laid out for them (the first
    step from :meth:`VeLO.init`'s channel-last zeros: the checked path then stores the
    accumulators channel-first)."""
    plans = workspace.setdefault("velo_plans", {})
    tensors = tuple(state[group][key] for group in _GROUPS)
    plan = plans.get(key)
    if plan is not None and plan.kern is kern and plan.matches(p, tensors):
        return plan
    factored = velo._info(p.shape).factored
    plan = kern.velo_plan(p, *tensors, factored[1] if factored else None)
    if plan is None:
        plans.pop(key, None)
    else:
        plans[key] = plan
    return plan


def batch_for(kern: LoptCpuKernels, workspace: dict, plans: tuple[VeLOTensorPlan, ...],
              rows: tuple[int, ...], slots: tuple[MLPSlots, MLPSlots]) -> VeLOPlanBatch:
    """The :class:`~metaopt.lopt.cpu_kernels.VeLOPlanBatch` running ``plans`` (packed MLP
    rows ``rows``), kept in ``workspace`` and rebuilt when the plans change."""
    batch = workspace.get("velo_batch")
    if batch is None or batch.kern is not kern or not batch.matches(plans, rows):
        batch = workspace["velo_batch"] = VeLOPlanBatch(kern, plans, rows, slots)
    return batch


def pass1(velo: VeLO, kern: LoptCpuKernels, p: Tensor, g: Tensor,
          state: Mapping[str, Any], key: str, mom_d: Tensor, rms_d: Tensor, fac_d: Tensor,
                  inplace: bool) -> dict[str, Any]:
    """Kernel passes 0 and 1 for one vector or matrix: Adafactor statistics, new
    accumulators (into the old buffers when ``inplace`` and they are channel-first),
    the channels' sums of squares and the old state's moments for the LSTM input."""
    n, k = p.numel(), len(velo.initial_momentum_decays)
    g_c, p_c = g.contiguous(), p.contiguous()

    def channel_first(t: Tensor, rows: int) -> tuple[Tensor, bool]:
        view = t.movedim(-1, 0).reshape(rows, n)  # a view when stored channel-first
        return view.contiguous(), view.is_contiguous() and view.data_ptr() == t.data_ptr()

    m_old, own_m = channel_first(state["mom"][key], k)
    r_old, own_r = channel_first(state["rms"][key], 1)
    pre: dict[str, Any] = {"g": g_c, "p": p_c}
    if p.dim() == 1:
        v_old, own_v = channel_first(state["v_diag"][key], k)
        m_new, r_new, v_new, sumsq, stats = kern.pass1(
            "velo_diag", g_c, p_c, m_old, r_old, mom_d, float(rms_d), v_old=v_old,
            fac_decay=fac_d.contiguous(), with_stats=True,
            inplace=inplace and own_m and own_r and own_v)
        pre.update(v=v_new, v_row=state["v_row"][key], v_col=state["v_col"][key])
    else:
        d1, d0 = velo._info(p.shape).factored
        # the row/column statistics are small: updated in place (copies when pure)
        v_row = state["v_row"][key].contiguous() if inplace else state["v_row"][key].clone()
        v_col = state["v_col"][key].contiguous() if inplace else state["v_col"][key].clone()
        zeros = _zeros_f32((0.0,) * (4 * k * velo.ff_hidden_size), p.device)
        fac_a, fac_b, _, _ = kern.factored_prepare(  # hidden biases come after the LSTM
            g_c, d0, v_row, v_col, fac_d, zeros.view(4 * k, velo.ff_hidden_size),
            zeros[:velo.ff_hidden_size], channel_last=True, clip=1000.0)
        m_new, r_new, _, sumsq, stats = kern.pass1(
            "velo", g_c, p_c, m_old, r_old, mom_d, float(rms_d), fac_a, fac_b,
            with_stats=True, inplace=inplace and own_m and own_r)
        pre.update(v_row=v_row, v_col=v_col, fac_a=fac_a, fac_b=fac_b, dims=(d1, d0))
    pre.update(m=m_new, rms=r_new, sumsq=sumsq, stats=stats, n=n)
    return pre

def kernel_moments(k: int, pres: Sequence[Mapping[str, Any]]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``mean(p²)`` (n,), variance and mean of the old momenta (n, 3) and of the old
    second moment (n, 1) of the tensors whose first kernel pass returned ``pres``."""
    counts = _counts_f64(tuple(pre["n"] for pre in pres))
    sums = (torch.stack([pre["stats"] for pre in pres]) / counts).float()
    mean_m, mean_r = sums[:, 0:2 * k:2], sums[:, 2 * k:2 * k + 1]
    var_m = torch.clamp(sums[:, 1:2 * k:2] - mean_m * mean_m, min=0.0)
    var_r = torch.clamp(sums[:, 2 * k + 1:2 * k + 2] - mean_r * mean_r, min=0.0)
    return sums[:, 2 * k + 2], var_m, mean_m, var_r, mean_r

def scalars(kern: LoptCpuKernels, state: Mapping[str, Any], loss: Tensor,
            pres: Sequence[Mapping[str, Any]], timescales: Tensor, rank: Tensor
            ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """The step's scalar part in one kernel call, for tensors that all went through pass 1
    (their ``pres``): ``(next loss buffer, loss features (9,), LSTM input (n, 30),
    mean(p²) (n,))`` — :func:`~metaopt.lopt.velo.loss_buffer_step` and
    :meth:`~metaopt.lopt.velo.VeLO._lstm_features` of :func:`kernel_moments`, in float32
    like them."""
    buf = state["loss_buffer"]
    counts = _counts_f64(tuple(pre["n"] for pre in pres))
    stats = torch.stack([pre["stats"] for pre in pres])
    means, running_min, x, msq = kern.velo_scalars(
        int(state["iteration"]), int(state["num_steps"]), int(buf["iteration"]), float(loss),
        buf, timescales, stats, counts, rank)
    next_buffer = {"means": means, "running_min": running_min, "decays": buf["decays"],
                   "iteration": buf["iteration"] + 1}
    return next_buffer, x[0, 9:18], x, msq


def pass2(velo: VeLO, kern: LoptCpuKernels, pre: Mapping[str, Any],
                  p: Tensor, packed: Tensor, slots: MLPSlots, coef: float, p_decay: float,
                  inplace: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kernel pass 2 for one tensor: ``(p_new, mom, rms, v_row, v_col, v_diag)``,
    accumulators as channel-last views of channel-first storage. ``packed`` is the
    tensor's row of MLP arguments at ``slots`` (:func:`kernel_mlp_gather`).
    ``inplace`` writes into ``p``."""
    hidden, k = velo.ff_hidden_size, len(velo.initial_momentum_decays)
    diag = p.dim() == 1

    def block(start: int, rows: int) -> Tensor:
        return packed[start:start + rows * hidden].view(rows, hidden)

    w_x = block(slots.w_x, slots.n_x)
    b0 = packed[slots.b0:slots.b0 + hidden]
    if diag:
        u_a, u_b = b0.view(hidden, 1), None
    else:
        _, _, u_a, u_b = kern.factored_prepare(
            pre["g"], pre["dims"][1], pre["v_row"], pre["v_col"],
            _zeros_f32((0.0,) * k, p.device), block(slots.w_stat, 4 * k), b0,
            channel_last=True, update_v=False)
    w1, b1 = block(slots.w1, hidden), packed[slots.b1:slots.b1 + hidden]
    w2, b2 = packed[slots.w2:slots.b2].view(hidden, 2), packed[slots.b2:slots.end]
    out = p if inplace and p.is_contiguous() else None
    p_new = kern.pass2(
        "velo_diag" if diag else "velo", pre["g"], pre["p"], pre["m"], pre["rms"],
        pre.get("fac_a"), pre.get("fac_b"), pre.get("v"), w_x, pre["sumsq"],
        u_a, u_b, w1, b1, w2, b2, velo.exp_mult, coef, p_decay, out=out)
    if inplace and out is None:
        p.copy_(p_new)
        p_new = p
    shape = tuple(p.shape)
    mom = pre["m"].view(-1, *shape).movedim(0, -1)
    rms = pre["rms"].view(1, *shape).movedim(0, -1)
    v_diag = pre["v"].view(-1, *shape).movedim(0, -1) if diag else None
    return p_new, mom, rms, pre["v_row"], pre["v_col"], v_diag

@functools.lru_cache(maxsize=256)
def _counts_f64(counts: tuple[int, ...]) -> Tensor:
    """The element counts as a float64 (n, 1) column (cached per model; never written to)."""
    return torch.tensor(counts, dtype=torch.float64).unsqueeze(1)


@functools.lru_cache(maxsize=64)
def _zeros_f32(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A float32 constant vector (cached per device; never written to)."""
    return torch.tensor(values, dtype=torch.float32, device=device)
