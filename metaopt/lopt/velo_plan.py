"""VeLO's fused-kernel calls for one tensor stepped in place, prepared once per tensor.

The torch.optim shell steps the same parameters with the same state tensors every
step. Finding the accumulators' channel-first views, checking every argument and
allocating the kernel's scratch (channel sums, row/column factors, hidden biases) is
then the same work each step — on a 1M-parameter MLP about a millisecond of Python
per VeLO step, ~7% of it. A :class:`KernelPlan` does that work once, holds the
addresses, and calls the C entry points directly; per step only the gradient (which
``zero_grad(set_to_none=True)`` reallocates) is checked.

A plan is valid while the parameter and its state tensors are the *same objects* at
the same addresses (:meth:`KernelPlan.matches`); loading a state dict, replacing
``p.data`` or a functional (not in-place) update builds a new one. Plans are only used
for in-place steps (:meth:`VeLO.update_`), where the state tensors are written in
place and handed back unchanged, so they keep matching.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.lopt import cpu_kernels

__all__ = ["KernelPlan", "MLPSlots"]

_F32 = torch.float32
_F64 = torch.float64
_CLIP = 1000.0  # VeLO clips gradients to [-1000, 1000]
_GROUPS = ("mom", "rms", "v_row", "v_col", "v_diag")


@dataclass(frozen=True)
class MLPSlots:
    """Where one kernel call's MLP arguments start in a packed row (in floats): first-layer
    weights ``w_x`` (``n_x`` channels × H), for matrices the row/column-statistic weights
    ``w_stat`` (4k × H), the first-layer bias ``b0``, ``w1`` (H × H), ``b1``, ``w2``
    (H × 2) and ``b2`` (2)."""

    n_x: int
    w_x: int
    w_stat: int | None
    b0: int
    w1: int
    b1: int
    w2: int
    b2: int
    end: int

    @staticmethod
    def after(start: int, n_x: int, n_stat: int, hidden: int) -> MLPSlots:
        """The slots of a segment at ``start`` with ``n_stat`` statistic channels (0: none)."""
        w_stat = start + n_x * hidden
        b0 = w_stat + n_stat * hidden
        w1 = b0 + hidden
        b1 = w1 + hidden * hidden
        w2 = b1 + hidden
        b2 = w2 + 2 * hidden
        return MLPSlots(n_x, start, w_stat if n_stat else None, b0, w1, b1, w2, b2, b2 + 2)


def _owned_channel_first(t: Tensor, rows: int, n: int) -> Tensor | None:
    """``t`` (``shape + (rows,)``) as a contiguous (rows, n) view of its own storage, or
    None when it is not stored channel-first."""
    view = t.movedim(-1, 0).reshape(rows, n)
    if view.is_contiguous() and view.data_ptr() == t.data_ptr():
        return view
    return None


class KernelPlan:
    """Kernel arguments of one float32 CPU vector or matrix stepped in place."""

    def __init__(self, kern: cpu_kernels.LoptCpuKernels, p: Tensor, state: dict[str, Any],
                 key: str, k: int, hidden: int, d0: int | None) -> None:
        self.lib = kern._lib
        self.threads = kern._threads
        self.k, self.hidden = k, hidden
        self.n = n = p.numel()
        self.diag = p.dim() == 1
        self.shape = tuple(p.shape)
        tensors = (p, *(state[group][key] for group in _GROUPS))
        # The state tensors are handed back unchanged by in-place steps, so they are
        # recognised by identity (weak references: a plan never keeps optimizer state
        # alive); the parameter arrives as a fresh `detach()` view each step, so it is
        # recognised by its storage, shape and dtype.
        self.refs = tuple(weakref.ref(t) for t in tensors[1:])
        self.ptrs = tuple(t.data_ptr() for t in tensors)
        mom, rms, v_row, v_col, v_diag = tensors[1:]
        self.mode = cpu_kernels._MODES["velo_diag" if self.diag else "velo"]
        self.n_ch = kern.n_channels("velo_diag" if self.diag else "velo")
        self.sumsq = torch.empty(self.n_ch, dtype=_F64)
        self.stats = torch.empty(2 * k + 3, dtype=_F64)
        self.zeros = torch.zeros(4 * k * hidden + hidden + k, dtype=_F32)
        m_cf = _owned_channel_first(mom, k, n)
        r_cf = _owned_channel_first(rms, 1, n)
        self.ok = (p.is_contiguous() and p.dtype == _F32 and m_cf is not None
                   and r_cf is not None)
        if self.diag:
            v_cf = _owned_channel_first(v_diag, k, n)
            self.ok = self.ok and v_cf is not None
            self.a, self.b = 1, n
            self.v_ptr = v_cf.data_ptr() if v_cf is not None else 0
        else:
            self.a, self.b = self.shape
            self.d0 = int(d0)
            len_r, len_c = (self.b, self.a) if self.d0 == 0 else (self.a, self.b)
            self.ok = (self.ok and v_row.is_contiguous() and v_col.is_contiguous()
                       and tuple(v_row.shape) == (len_r, k) and tuple(v_col.shape) == (len_c, k))
            self.fac_a = torch.empty(k, self.a, dtype=_F32)
            self.fac_b = torch.empty(k, self.b, dtype=_F32)
            self.u_a = torch.empty(hidden, self.a, dtype=_F32)
            self.u_b = torch.empty(hidden, self.b, dtype=_F32)

    def matches(self, p: Tensor, state: dict[str, Any], key: str) -> bool:
        """Whether ``p`` and its state are still the tensors (and storage) planned for."""
        tensors = (p, *(state[group][key] for group in _GROUPS))
        return (tuple(p.shape) == self.shape and p.dtype is _F32 and p.is_contiguous()
                and all(ref() is t for ref, t in zip(self.refs, tensors[1:]))
                and self.ptrs == tuple(t.data_ptr() for t in tensors))

    def grad_ptr(self, g: Tensor) -> int | None:
        """The gradient's address when the kernel can read it directly."""
        if g.dtype is _F32 and g.is_contiguous() and g.numel() == self.n \
                and g.device.type == "cpu":
            return g.data_ptr()
        return None

    def pass1(self, g_ptr: int, mom_decay: Tensor, rms_decay: float, fac_decay: Tensor
              ) -> dict[str, Any]:
        """Passes 0 and 1 (in place); returns what :meth:`pass2` and the LSTM need."""
        lib, k = self.lib, self.k
        threads = self.threads()
        p_ptr, m_ptr, r_ptr = self.ptrs[0], self.ptrs[1], self.ptrs[2]
        if self.diag:
            lib.lopt_pass1(self.mode, 1, self.n, g_ptr, p_ptr, m_ptr, r_ptr, m_ptr, r_ptr,
                           mom_decay.data_ptr(), rms_decay, None, None, self.v_ptr,
                           self.v_ptr, fac_decay.data_ptr(), self.sumsq.data_ptr(),
                           self.stats.data_ptr(), threads)
        else:
            z = self.zeros.data_ptr()
            status = lib.lopt_factored_prepare(
                self.a, self.b, self.d0, 1, g_ptr, _CLIP, self.ptrs[3], 1, k, self.ptrs[4],
                1, k, fac_decay.data_ptr(), z, z, self.fac_a.data_ptr(),
                self.fac_b.data_ptr(), self.u_a.data_ptr(), self.u_b.data_ptr(), threads)
            if status != 0:
                raise MemoryError("lopt_factored_prepare could not allocate its row/column "
                                  "sums")
            lib.lopt_pass1(self.mode, self.a, self.b, g_ptr, p_ptr, m_ptr, r_ptr, m_ptr,
                           r_ptr, mom_decay.data_ptr(), rms_decay, self.fac_a.data_ptr(),
                           self.fac_b.data_ptr(), None, None, None, self.sumsq.data_ptr(),
                           self.stats.data_ptr(), threads)
        return {"plan": self, "g_ptr": g_ptr, "stats": self.stats, "n": self.n}

    def pass2(self, g_ptr: int, row_ptr: int, slots: MLPSlots, coef: float, p_decay: float,
              exp_mult: float) -> None:
        """Pass 2 (writes the parameter in place) with the tensor's row of mixed MLP
        arguments at ``row_ptr`` (float32 address), laid out as ``slots`` says."""
        lib, k = self.lib, self.k
        threads = self.threads()

        def at(offset: int) -> int:
            return row_ptr + 4 * offset

        if self.diag:
            u_a, u_b, fac_a, fac_b, v = at(slots.b0), None, None, None, self.v_ptr
        else:
            status = lib.lopt_factored_prepare(
                self.a, self.b, self.d0, 0, g_ptr, 0.0, self.ptrs[3], 1, k, self.ptrs[4], 1, k,
                self.zeros.data_ptr(), at(slots.w_stat), at(slots.b0), self.fac_a.data_ptr(),
                self.fac_b.data_ptr(), self.u_a.data_ptr(), self.u_b.data_ptr(), threads)
            if status != 0:
                raise MemoryError("lopt_factored_prepare could not allocate")
            u_a, u_b = self.u_a.data_ptr(), self.u_b.data_ptr()
            fac_a, fac_b, v = self.fac_a.data_ptr(), self.fac_b.data_ptr(), None
        p_ptr = self.ptrs[0]
        lib.lopt_pass2(self.mode, self.a, self.b, g_ptr, p_ptr, self.ptrs[1], self.ptrs[2],
                       fac_a, fac_b, v, at(slots.w_x), self.sumsq.data_ptr(), u_a, u_b,
                       at(slots.w1), at(slots.b1), at(slots.w2), at(slots.b2), exp_mult, coef,
                       p_decay, p_ptr, threads)
