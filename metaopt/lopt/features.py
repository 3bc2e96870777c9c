"""Per-tensor features shared by learned-optimizer architectures.

These are the building blocks learned_optimization's optimizers use (momentum, RMS and
Adafactor-style factored accumulators, second-moment normalisation, time embeddings),
written as pure functions of one task tensor. Every accumulator keeps its decay index
on the **last** axis, as the reference does (``m`` has shape ``p.shape + (n_decays,)``).

All functions work in the dtype of their inputs; callers decide the compute dtype.
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


def init_accumulators(p: Tensor, n_mom: int, n_rms: int, n_fac: int) -> dict[str, Tensor]:
    """Zero accumulators for tensor ``p`` (in ``p``'s dtype and device).

    Keys: ``m`` (shape + (n_mom,)), ``rms`` (shape + (n_rms,)), and the factored
    ``v_row`` (shape without d0 + (n_fac,)), ``v_col`` (shape without d1 + (n_fac,)),
    ``v_diag`` (shape + (n_fac,)). Unused factored slots have shape (0, n_fac), as in
    the reference.
    """
    shape = tuple(p.shape)
    zeros = lambda *s: torch.zeros(s, dtype=p.dtype, device=p.device)  # noqa: E731
    dims = factored_dims(shape)
    if dims is None:
        v_row, v_col, v_diag = zeros(0, n_fac), zeros(0, n_fac), zeros(*shape, n_fac)
    else:
        d1, d0 = dims
        row_shape = [s for i, s in enumerate(shape) if i != d0]
        col_shape = [s for i, s in enumerate(shape) if i != d1]
        v_row, v_col, v_diag = zeros(*row_shape, n_fac), zeros(*col_shape, n_fac), zeros(0, n_fac)
    return {"m": zeros(*shape, n_mom), "rms": zeros(*shape, n_rms),
            "v_row": v_row, "v_col": v_col, "v_diag": v_diag}


def update_momentum(m: Tensor, g: Tensor, decays: Tensor) -> Tensor:
    """``m <- d * m + (1 - d) * g`` for every decay ``d`` (no clipping, as the reference)."""
    return decays * m + (1 - decays) * g.unsqueeze(-1)


def update_rms(rms: Tensor, g: Tensor, decays: Tensor) -> Tensor:
    """``rms <- d * rms + (1 - d) * g^2`` with ``d`` clipped to [0, 1]."""
    d = torch.clamp(decays, 0.0, 1.0)
    return d * rms + (1 - d) * (g * g).unsqueeze(-1)


def update_factored(v_row: Tensor, v_col: Tensor, v_diag: Tensor, g: Tensor,
                    decays: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adafactor-style accumulators and the preconditioned gradient ``fac_g``.

    Returns ``(v_row, v_col, v_diag, fac_g)``; ``fac_g`` has shape ``g.shape + (n,)``.
    Factored tensors: ``v_row``/``v_col`` track ``mean(g^2 + 1e-30)`` over ``d0``/``d1``
    and ``fac_g = g * rsqrt_safe(v_row / (mean(v_row over d1) + 1e-9)) * rsqrt_safe(v_col)``.
    Others: ``v_diag`` tracks ``g^2 + 1e-30`` and ``fac_g = g * rsqrt_safe(v_diag + 1e-9)``.
    """
    d = torch.clamp(decays, 0.0, 1.0)
    mix = 1.0 - d
    grad_sqr = g * g + FACTORED_EPS
    dims = factored_dims(g.shape)
    if dims is None:
        new_diag = d * v_diag + mix * grad_sqr.unsqueeze(-1)
        return v_row, v_col, new_diag, g.unsqueeze(-1) * safe_rsqrt(new_diag + 1e-9)
    d1, d0 = dims
    new_row = d * v_row + mix * torch.mean(grad_sqr, dim=d0).unsqueeze(-1)
    new_col = d * v_col + mix * torch.mean(grad_sqr, dim=d1).unsqueeze(-1)
    fac_g = factored_momentum(g.unsqueeze(-1), new_row, new_col, d1, d0)
    return new_row, new_col, v_diag, fac_g


def _row_col_factors(v_row: Tensor, v_col: Tensor, d1: int, d0: int) -> tuple[Tensor, Tensor]:
    """Row and column scale factors, already expanded back to the full tensor's axes."""
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = torch.mean(v_row, dim=reduced_d1, keepdim=True)
    row_factor = safe_rsqrt(v_row / (row_mean + 1e-9))
    col_factor = safe_rsqrt(v_col)
    return row_factor.unsqueeze(d0), col_factor.unsqueeze(d1)


def factored_momentum(x: Tensor, v_row: Tensor, v_col: Tensor, d1: int, d0: int) -> Tensor:
    """``x * rsqrt_safe(v_row / (mean(v_row over d1) + 1e-9)) * rsqrt_safe(v_col)``.

    ``x`` has the full tensor shape plus a trailing decay axis (e.g. momentum, or the
    gradient with a unit axis); the factors are broadcast back at ``d0`` and ``d1``.
    """
    row, col = _row_col_factors(v_row, v_col, d1, d0)
    return x * row * col


def expand_row(v_row: Tensor, d0: int, size: int) -> Tensor:
    """``v_row`` broadcast back over axis ``d0`` (of length ``size``), a view."""
    v = v_row.unsqueeze(d0)
    shape = list(v.shape)
    shape[d0] = size
    return v.expand(shape)


def expand_col(v_col: Tensor, d1: int, size: int) -> Tensor:
    """``v_col`` broadcast back over axis ``d1`` (of length ``size``), a view."""
    v = v_col.unsqueeze(d1)
    shape = list(v.shape)
    shape[d1] = size
    return v.expand(shape)
