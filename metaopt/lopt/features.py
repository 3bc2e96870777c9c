"""Per-tensor features shared by learned-optimizer architectures.

These are the building blocks learned_optimization's optimizers use (momentum, RMS and
Adafactor-style factored accumulators, second-moment normalisation, time embeddings),
written as pure functions of one task tensor. Every accumulator keeps its decay index
on the **last** axis, as the reference does (``m`` has shape ``p.shape + (n_decays,)``).

With ``decay_first=True`` the accumulator functions use the transposed layout instead
(decay index on the **first** axis, ``m`` of shape ``(n_decays,) + p.shape``): every
per-decay slice is then contiguous, which makes elementwise work and the per-channel
feature matrix much faster on CPU. All functions work in the dtype of their inputs;
callers decide the compute dtype.
Stable API (other architectures import it): ``factored_dims``, ``safe_rsqrt``,
``second_moment_normalize``, ``channel_rsqrt_norm``, ``tanh_time_embedding``,
``decays_from_offsets``, ``init_accumulators``, ``update_momentum``, ``update_rms``,
``update_factored``, ``expand_row``, ``expand_col``, ``factored_momentum``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "TIME_SCALES",
    "channel_rsqrt_norm",
    "decays_from_offsets",
    "expand_col",
    "expand_row",
    "factored_dims",
    "factored_momentum",
    "init_accumulators",
    "safe_rsqrt",
    "second_moment_normalize",
    "tanh_time_embedding",
    "update_factored",
    "update_momentum",
    "update_rms",
]

#: Time scales of the ``tanh(iteration / c - 1)`` step embedding (11 features).
TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)

#: Added to squared gradients before the factored accumulators (reference value).
FACTORED_EPS = 1e-30


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """Axes ``(d1, d0)`` a tensor's second moment is factored over, or ``None``.

    Tensors of rank >= 2 are factored over their two largest axes: ``d0`` the largest,
    ``d1`` the second largest, by a *stable* sort of the sizes (so among equal sizes the
    later axis wins ``d0``). Rank 0/1 tensors are not factored. Example: (3, 3, 2, 4)
    gives ``(1, 3)``; (5, 5) gives ``(0, 1)``.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])  # Python sort is stable
    return order[-2], order[-1]


def safe_rsqrt(x: Tensor) -> Tensor:
    """``1 / sqrt(max(x, 1e-9))``: an inverse square root that never divides by zero."""
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def second_moment_normalize(x: Tensor, dims: Sequence[int], eps: float = 1e-5) -> Tensor:
    """``x * rsqrt(eps + mean(x^2 over dims))``: per-channel scale normalisation."""
    return x * torch.rsqrt(eps + torch.mean(x * x, dim=tuple(dims), keepdim=True))


def channel_rsqrt_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """The per-channel factor of :func:`second_moment_normalize` for a (N, C) matrix.

    Returns ``rsqrt(eps + mean(x^2, dim=0))`` of shape (C,). Multiplying it into the
    first-layer weights instead of the (large) feature matrix gives the same math with
    one pass less over memory.
    """
    return torch.rsqrt(eps + torch.mean(x * x, dim=0))


def tanh_time_embedding(iteration: Tensor, dtype: torch.dtype = torch.float32,
                        timescales: Sequence[float] = TIME_SCALES) -> Tensor:
    """Step embedding ``tanh(iteration / c - 1)`` for each time scale ``c``."""
    scales = torch.tensor(timescales, dtype=dtype, device=iteration.device)
    return torch.tanh(iteration.to(dtype) / scales - 1.0)


def decays_from_offsets(base: Sequence[float], offsets: Tensor) -> Tensor:
    """Meta-learned decays: ``1 - (1 - base) * exp(10 * offset)``.

    Evaluated in the reference's order, ``1 - exp(10 * (log(1 - base) / 10 + offset))``,
    in the dtype of ``offsets``, so a zero offset returns ``base`` (up to rounding).
    """
    base_t = torch.tensor(tuple(base), dtype=offsets.dtype, device=offsets.device)
    as_param = torch.log(1 - base_t) / 10.0
    return 1 - torch.exp((as_param + offsets) * 10.0)


def init_accumulators(p: Tensor, n_mom: int, n_rms: int, n_fac: int, *,
                      decay_first: bool = False) -> dict[str, Tensor]:
    """Zero accumulators for tensor ``p`` (in ``p``'s dtype and device).

    Keys: ``m`` (shape + (n_mom,)), ``rms`` (shape + (n_rms,)), and the factored
    ``v_row`` (shape without d0 + (n_fac,)), ``v_col`` (shape without d1 + (n_fac,)),
    ``v_diag`` (shape + (n_fac,)). Unused factored slots have shape (0, n_fac), as in
    the reference. With ``decay_first`` the decay axis comes first instead.
    """
    shape = tuple(p.shape)

    def zeros(n: int, *s: int) -> Tensor:
        full = (n, *s) if decay_first else (*s, n)
        return torch.zeros(full, dtype=p.dtype, device=p.device)

    dims = factored_dims(shape)
    if dims is None:
        v_row, v_col, v_diag = zeros(n_fac, 0), zeros(n_fac, 0), zeros(n_fac, *shape)
    else:
        d1, d0 = dims
        row_shape = [s for i, s in enumerate(shape) if i != d0]
        col_shape = [s for i, s in enumerate(shape) if i != d1]
        v_row, v_col, v_diag = zeros(n_fac, *row_shape), zeros(n_fac, *col_shape), zeros(n_fac, 0)
    return {"m": zeros(n_mom, *shape), "rms": zeros(n_rms, *shape),
            "v_row": v_row, "v_col": v_col, "v_diag": v_diag}


def _decay(decays: Tensor, ndim: int, decay_first: bool) -> Tensor:
    """Decays shaped to broadcast against an accumulator of ``ndim`` tensor axes."""
    return decays.reshape(-1, *([1] * ndim)) if decay_first else decays


def update_momentum(m: Tensor, g: Tensor, decays: Tensor, *, decay_first: bool = False
                    ) -> Tensor:
    """``m <- d * m + (1 - d) * g`` for every decay ``d`` (no clipping, as the reference)."""
    d = _decay(decays, g.ndim, decay_first)
    return d * m + (1 - d) * g.unsqueeze(0 if decay_first else -1)


def update_rms(rms: Tensor, g: Tensor, decays: Tensor, *, decay_first: bool = False) -> Tensor:
    """``rms <- d * rms + (1 - d) * g^2`` with ``d`` clipped to [0, 1]."""
    d = _decay(torch.clamp(decays, 0.0, 1.0), g.ndim, decay_first)
    return d * rms + (1 - d) * (g * g).unsqueeze(0 if decay_first else -1)


def update_factored(v_row: Tensor, v_col: Tensor, v_diag: Tensor, g: Tensor,
                    decays: Tensor, *, decay_first: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adafactor-style accumulators and the preconditioned gradient ``fac_g``.

    Returns ``(v_row, v_col, v_diag, fac_g)``; ``fac_g`` has shape ``g.shape + (n,)``
    (``(n,) + g.shape`` with ``decay_first``).
    Factored tensors: ``v_row``/``v_col`` track ``mean(g^2 + 1e-30)`` over ``d0``/``d1``
    and ``fac_g = g * rsqrt_safe(v_row / (mean(v_row over d1) + 1e-9)) * rsqrt_safe(v_col)``.
    Others: ``v_diag`` tracks ``g^2 + 1e-30`` and ``fac_g = g * rsqrt_safe(v_diag + 1e-9)``.
    """
    axis = 0 if decay_first else -1
    clipped = torch.clamp(decays, 0.0, 1.0)
    grad_sqr = g * g + FACTORED_EPS
    dims = factored_dims(g.shape)
    if dims is None:
        d = _decay(clipped, g.ndim, decay_first)
        new_diag = d * v_diag + (1.0 - d) * grad_sqr.unsqueeze(axis)
        return v_row, v_col, new_diag, g.unsqueeze(axis) * safe_rsqrt(new_diag + 1e-9)
    d1, d0 = dims
    d = _decay(clipped, g.ndim - 1, decay_first)
    new_row = d * v_row + (1.0 - d) * torch.mean(grad_sqr, dim=d0).unsqueeze(axis)
    new_col = d * v_col + (1.0 - d) * torch.mean(grad_sqr, dim=d1).unsqueeze(axis)
    fac_g = factored_momentum(g.unsqueeze(axis), new_row, new_col, d1, d0,
                              decay_first=decay_first)
    return new_row, new_col, v_diag, fac_g


def factored_momentum(x: Tensor, v_row: Tensor, v_col: Tensor, d1: int, d0: int, *,
                      decay_first: bool = False) -> Tensor:
    """``x * rsqrt_safe(v_row / (mean(v_row over d1) + 1e-9)) * rsqrt_safe(v_col)``.

    ``x`` has the full tensor shape plus a decay axis (e.g. momentum, or the gradient
    with a unit axis); the factors are broadcast back at ``d0`` and ``d1``. ``d0``/``d1``
    are axes of the task tensor (without the decay axis).
    """
    shift = 1 if decay_first else 0
    reduced_d1 = (d1 - 1 if d1 > d0 else d1) + shift
    row_mean = torch.mean(v_row, dim=reduced_d1, keepdim=True)
    row_factor = safe_rsqrt(v_row / (row_mean + 1e-9))
    col_factor = safe_rsqrt(v_col)
    return x * row_factor.unsqueeze(d0 + shift) * col_factor.unsqueeze(d1 + shift)


def expand_row(v_row: Tensor, d0: int, size: int, *, decay_first: bool = False) -> Tensor:
    """``v_row`` broadcast back over tensor axis ``d0`` (of length ``size``), a view."""
    axis = d0 + (1 if decay_first else 0)
    v = v_row.unsqueeze(axis)
    shape = list(v.shape)
    shape[axis] = size
    return v.expand(shape)


def expand_col(v_col: Tensor, d1: int, size: int, *, decay_first: bool = False) -> Tensor:
    """``v_col`` broadcast back over tensor axis ``d1`` (of length ``size``), a view."""
    return expand_row(v_col, d1, size, decay_first=decay_first)
