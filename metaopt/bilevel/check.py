"""``hypergradcheck``: compare any estimator with finite differences or an exact answer.

Like :func:`torch.autograd.gradcheck`, for bilevel problems. The finite-difference
reference differentiates the *K-step* outer objective ``F_K(φ) = f(θ_K(φ), φ)``
(the inner optimizer run exactly as the problem says), so it is the exact target of
full unrolling and approaches the IFT answer as K grows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import initial_theta, step_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, Estimator, InitialTheta
from metaopt.params import Params, tree_detach, tree_flatten, tree_unflatten

__all__ = ["HypergradCheck", "HypergradCheckError", "finite_difference_hypergradient",
           "hypergradcheck", "k_step_objective"]


class HypergradCheckError(AssertionError):
    """Raised by :func:`hypergradcheck` with ``raise_exception=True`` on a mismatch."""


@dataclass
class HypergradCheck:
    """Outcome of a check: relative error ‖est − ref‖/‖ref‖ over the compared entries."""

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


def finite_difference_hypergradient(problem: BilevelProblem, phi: Mapping[str, Tensor],
                                    theta0: InitialTheta, *, eps: float = 1e-5) -> Params:
    """Central differences of the K-step objective, one coordinate of φ at a time."""
    F = k_step_objective(problem, theta0)
    base = tree_detach(dict(phi))
    flat = tree_flatten(base)
    grad = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        upper, lower = F(tree_unflatten(flat + e, base)), F(tree_unflatten(flat - e, base))
        grad[i] = (upper - lower) / (2 * eps)
    return tree_unflatten(grad, base)


def hypergradcheck(estimator: Estimator, problem: BilevelProblem, phi: Mapping[str, Tensor],
                   theta0: InitialTheta, *, reference: Params | Callable[[Params], Params] |
                   None = None, eps: float = 1e-5, rtol: float = 1e-4,
                   n_directions: int | None = None, seed: int = 0,
                   raise_exception: bool = False) -> HypergradCheck:
    """Check ``estimator``'s hypergradient at ``phi``.

    Args:
        reference: exact dF/dφ (a dict or a function of φ). Default: finite differences
            of the K-step objective — coordinate-wise, or along ``n_directions`` random
            directions (for large φ; compares directional derivatives).
        eps: finite-difference step (use float64 problems for tight checks).
        rtol: pass if the relative error is at most this.
    """
    base = tree_detach(dict(phi))
    est = estimator(problem, base, theta0).grad
    est_flat = tree_flatten(est)
    if reference is not None:
        ref = reference(base) if callable(reference) else reference
        ref_flat, mode, compared = tree_flatten(ref), "exact", est_flat
    elif n_directions is None:
        ref_flat = tree_flatten(finite_difference_hypergradient(problem, base, theta0, eps=eps))
        mode, compared = "finite-difference", est_flat
    else:
        F = k_step_objective(problem, theta0)
        flat = tree_flatten(base)
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_directions, flat.numel(), generator=gen, dtype=flat.dtype)
        dirs = dirs.to(flat.device)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        ref_flat = torch.stack([
            (F(tree_unflatten(flat + eps * v, base)) - F(tree_unflatten(flat - eps * v, base)))
            / (2 * eps) for v in dirs])
        compared = dirs @ est_flat
        mode = f"finite-difference ({n_directions} directions)"
    denom = float(ref_flat.norm())
    diff = float((compared - ref_flat).norm())
    rel = diff / denom if denom > 0 else diff
    result = HypergradCheck(rel, rel <= rtol, rtol, mode, compared.detach(), ref_flat.detach())
    if raise_exception and not result.ok:
        raise HypergradCheckError(str(result))
    return result
