"""``hypergradcheck``: compare any estimator with finite differences or an exact answer.

Like :func:`torch.autograd.gradcheck`, for bilevel problems. The finite-difference
reference differentiates the *K-step* outer objective ``F_K(φ) = f(θ_K(φ), φ)``
(the inner optimizer run exactly as the problem says), so it is the exact target of
full unrolling and approaches the IFT answer as K grows.

Defaults scale with the precision of φ's dtype (its machine epsilon ``ε`` from
:func:`torch.finfo`; for mixed dtypes, the least precise):

* **step** ``h = ε^(1/3)``, relative to each coordinate's magnitude (``h·max(1, |φ_i|)``).
  A central difference has truncation error ``O(h²)`` and rounding error ``O(ε/h)``;
  ``h = ε^(1/3)`` balances them at ``O(ε^(2/3))``. That is ``6e-6`` in float64 and
  ``5e-3`` in float32, where the old fixed ``1e-5`` drowned the difference in rounding
  noise (relative errors of 1e-2 on correct estimators).
* **tolerance** ``rtol = ε^(1/3)`` (``6e-6`` in float64, ``5e-3`` in float32): the
  ``O(ε^(2/3))`` accuracy of the difference with a margin of ``ε^(-1/3)`` for the
  conditioning of ``F_K`` and the estimator's own rounding over K steps.
* **directions**: every coordinate of φ when it has at most ``n_directions`` (8)
  entries, otherwise ``n_directions`` random directions. Either way the check costs at
  most ``2·n_directions`` evaluations of ``F_K`` (each a K-step inner solve) plus one
  estimator call, whatever the size of φ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from metaopt.bilevel._common import initial_theta, step_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, Estimator, InitialTheta
from metaopt.params import Params, tree_detach, tree_flatten, tree_unflatten

__all__ = ["HypergradCheck", "HypergradCheckError", "default_rtol", "default_step",
           "finite_difference_hypergradient", "hypergradcheck", "k_step_objective"]

#: Default number of finite-difference directions (and the largest φ checked coordinate-wise).
DEFAULT_DIRECTIONS = 8


class HypergradCheckError(AssertionError):
    """Raised by :func:`hypergradcheck` with ``raise_exception=True`` on a mismatch."""


@dataclass
class HypergradCheck:
    """Outcome of a check: relative error ‖est − ref‖/‖ref‖ over the compared entries.

    ``diagnostics`` holds ``eps`` (the step used), ``function_evaluations`` (calls of
    ``F_K``) and, for random directions, ``n_directions`` and ``seed``.
    """

    rel_error: float
    ok: bool
    rtol: float
    mode: str
    estimate: Tensor
    reference: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        return (f"hypergradcheck [{self.mode}]: relative error {self.rel_error:.3e} "
                f"(rtol {self.rtol:.1e}) {status}")


def _machine_eps(phi: Mapping[str, Tensor]) -> float:
    if not phi:
        raise ValueError("phi (the outer parameters) is empty")
    dtypes = {v.dtype for v in phi.values()}
    for k, v in phi.items():
        if not v.is_floating_point():
            raise TypeError(f"outer parameter '{k}' has dtype {v.dtype}; it must be floating")
    return max(torch.finfo(dt).eps for dt in dtypes)


def default_step(phi: Mapping[str, Tensor]) -> float:
    """The default finite-difference step for φ: ``ε^(1/3)`` of its least precise dtype."""
    return _machine_eps(phi) ** (1.0 / 3.0)


def default_rtol(phi: Mapping[str, Tensor]) -> float:
    """The default pass threshold for φ: ``ε^(1/3)`` of its least precise dtype."""
    return _machine_eps(phi) ** (1.0 / 3.0)


def k_step_objective(problem: BilevelProblem, theta0: InitialTheta
                     ) -> Callable[[Params], Tensor]:
    """``φ ↦ f(θ_K(φ), φ)`` evaluated without building a graph."""

    def F(phi: Params) -> Tensor:
        with torch.no_grad():
            theta = initial_theta(theta0, phi)
            trace = unroll(step_loss(problem, phi), problem.optimizer_for(phi),
                           tree_detach(theta), problem.inner_steps, check_finite=False)
            return problem.outer_value(trace.theta, phi, problem.outer_batch(0))

    return F


def _scales(flat: Tensor) -> Tensor:
    """Per-coordinate step scale ``max(1, |φ_i|)`` (a relative step for large entries)."""
    return flat.abs().clamp_min(1.0)


def _central_differences(F: Callable[[Params], Tensor], base: Params,
                         directions: Iterable[Tensor], eps: float) -> Tensor:
    """``(F(φ + h·v) − F(φ − h·v)) / 2h`` for each direction ``v`` (a flat vector)."""
    flat = tree_flatten(base)
    out = []
    for v in directions:
        upper = F(tree_unflatten(flat + eps * v, base))
        lower = F(tree_unflatten(flat - eps * v, base))
        out.append((upper - lower) / (2 * eps))
    return torch.stack(out)


def _coordinate_directions(scale: Tensor) -> Iterator[Tensor]:
    """``scale_i · e_i`` one at a time (never a dense identity matrix)."""
    for i in range(scale.numel()):
        v = torch.zeros_like(scale)
        v[i] = scale[i]
        yield v


def _random_directions(scale: Tensor, n: int, seed: int) -> list[Tensor]:
    """``n`` seeded Gaussian unit directions, scaled by ``scale`` entrywise.

    Drawn in float64 on the CPU, so a seed gives the same directions in every dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(scale.numel(), generator=gen, dtype=torch.float64)
        out.append((v / v.norm()).to(dtype=scale.dtype, device=scale.device) * scale)
    return out


def finite_difference_hypergradient(problem: BilevelProblem, phi: Mapping[str, Tensor],
                                    theta0: InitialTheta, *, eps: float | None = None
                                    ) -> Params:
    """Central differences of the K-step objective, one coordinate of φ at a time.

    Coordinate ``i`` is stepped by ``eps·max(1, |φ_i|)``; ``eps`` defaults to
    :func:`default_step` (``ε^(1/3)`` of φ's dtype). Costs ``2·numel(φ)`` K-step solves.
    """
    base = tree_detach(dict(phi))
    h = default_step(base) if eps is None else eps
    flat = tree_flatten(base)
    scale = _scales(flat)
    slopes = _central_differences(k_step_objective(problem, theta0), base,
                                  _coordinate_directions(scale), h)
    return tree_unflatten(slopes / scale, base)


def hypergradcheck(estimator: Estimator, problem: BilevelProblem, phi: Mapping[str, Tensor],
                   theta0: InitialTheta, *, reference: Params | Callable[[Params], Params] |
                   None = None, eps: float | None = None, rtol: float | None = None,
                   directions: Literal["auto", "coordinates", "random"] = "auto",
                   n_directions: int = DEFAULT_DIRECTIONS, seed: int = 0,
                   raise_exception: bool = False) -> HypergradCheck:
    """Check ``estimator``'s hypergradient at ``phi``.

    Args:
        reference: exact dF/dφ (a dict or a function of φ). Default: central finite
            differences of the K-step objective.
        eps: finite-difference step, relative to ``max(1, |φ_i|)``. Default
            ``ε^(1/3)`` of φ's dtype (see the module docstring).
        rtol: pass if the relative error is at most this. Default ``ε^(1/3)`` of φ's
            dtype: 6e-6 in float64, 5e-3 in float32.
        directions: ``"coordinates"`` compares the whole gradient (``2·numel(φ)``
            K-step solves); ``"random"`` compares directional derivatives along
            ``n_directions`` random directions (``2·n_directions`` solves; the relative
            error is then a statistical estimate, within a factor of about 2 at the
            default 8 directions); ``"auto"`` (default) takes coordinates when φ has
            at most ``n_directions`` entries, random directions otherwise.
        seed: seeds the random directions.
        raise_exception: raise :class:`HypergradCheckError` on a mismatch.
    """
    if directions not in ("auto", "coordinates", "random"):
        raise ValueError(f"directions must be 'auto', 'coordinates' or 'random', "
                         f"got {directions!r}")
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
    base = tree_detach(dict(phi))
    tol = default_rtol(base) if rtol is None else rtol
    est_flat = tree_flatten(estimator(problem, base, theta0).grad)
    diagnostics: dict[str, Any] = {}
    if reference is not None:
        ref = reference(base) if callable(reference) else reference
        ref_flat, mode, compared = tree_flatten(ref), "exact", est_flat
        diagnostics["function_evaluations"] = 0
    else:
        h = default_step(base) if eps is None else eps
        F = k_step_objective(problem, theta0)
        flat = tree_flatten(base)
        scale = _scales(flat)
        if directions == "auto":
            directions = "coordinates" if flat.numel() <= n_directions else "random"
        if directions == "coordinates":
            ref_flat = _central_differences(F, base, _coordinate_directions(scale), h) / scale
            compared, mode = est_flat, "finite-difference"
        else:
            dirs = _random_directions(scale, n_directions, seed)
            ref_flat = _central_differences(F, base, dirs, h)
            compared = torch.stack([v @ est_flat for v in dirs])
            mode = f"finite-difference ({n_directions} directions)"
            diagnostics.update(n_directions=n_directions, seed=seed)
        diagnostics.update(eps=h, function_evaluations=2 * ref_flat.numel())
    denom = float(ref_flat.norm())
    diff = float((compared - ref_flat).norm())
    rel = diff / denom if denom > 0 else diff
    result = HypergradCheck(rel, rel <= tol, tol, mode, compared.detach(), ref_flat.detach(),
                            diagnostics)
    if raise_exception and not result.ok:
        raise HypergradCheckError(str(result))
    return result
