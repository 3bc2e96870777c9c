"""Matrix-free linear solvers over parameter dicts, for implicit differentiation.

Every solver has the form ``solve(matvec, b, **options) -> (x, SolveInfo)`` where
``matvec`` is a closure computing ``A @ x`` for a dict ``x`` (a Hessian-vector
product, a vector-Jacobian product, …); no matrix is ever materialised.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metaopt.params import (
    Params,
    tree_axpy,
    tree_dot,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_zeros_like,
)

__all__ = [
    "SOLVERS",
    "LinearSolveWarning",
    "SolveInfo",
    "cg",
    "fixed_point",
    "neumann",
    "normal_cg",
    "power_iteration",
]

MatVec = Callable[[Params], Params]


class LinearSolveWarning(UserWarning):
    """A linear solve stopped before reaching its tolerance."""


@dataclass
class SolveInfo:
    """How a linear solve went: iterations used and the relative residual ‖Ax−b‖/‖b‖."""

    solver: str
    iterations: int
    residual: float
    converged: bool

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return {"solver": self.solver, "iterations": self.iterations,
                "residual": self.residual, "converged": self.converged}


def _relative_residual(matvec: MatVec, x: Params, b: Params, b_norm: float) -> float:
    r = tree_norm(tree_sub(b, matvec(x)))
    return float(r) / b_norm if b_norm > 0 else float(r)


def _finish(name: str, x: Params, iterations: int, residual: float, tol: float,
            warn: bool) -> tuple[Params, SolveInfo]:
    converged = residual <= tol or residual == 0.0
    if not math.isfinite(residual):
        converged = False
    if warn and not converged:
        warnings.warn(
            f"{name} linear solve did not converge: relative residual {residual:.3e} "
            f"> tol {tol:.1e} after {iterations} iterations (raise max_iter, add damping, "
            "or check that the inner problem is solved)",
            LinearSolveWarning, stacklevel=3)
    return x, SolveInfo(name, iterations, residual, converged)


def cg(matvec: MatVec, b: Params, *, x0: Params | None = None, max_iter: int = 100,
       tol: float = 1e-10, damping: float = 0.0, warn: bool = True,
       **_: object) -> tuple[Params, SolveInfo]:
    """Conjugate gradients for symmetric positive-definite ``A + damping·I``."""
    A = _damped(matvec, damping)
    b_norm = float(tree_norm(b))
    x = tree_zeros_like(b) if x0 is None else dict(x0)
    r = tree_sub(b, A(x)) if x0 is not None else dict(b)
    p = dict(r)
    rs = tree_dot(r, r)
    it = 0
    threshold = (tol * b_norm) ** 2
    for it in range(1, max_iter + 1):
        if float(rs) <= threshold:
            it -= 1
            break
        Ap = A(p)
        pAp = tree_dot(p, Ap)
        if float(pAp) <= 0.0:
            if warn:
                warnings.warn(f"cg: matrix is not positive definite along a search direction "
                              f"(pᵀAp = {float(pAp):.3e}); use normal_cg or add damping",
                              LinearSolveWarning, stacklevel=2)
            break
        alpha = rs / pAp
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, Ap, r)
        rs_new = tree_dot(r, r)
        p = tree_axpy(rs_new / rs, p, r)
        rs = rs_new
    return _finish("cg", x, it, _relative_residual(A, x, b, b_norm), tol, warn)


def normal_cg(matvec: MatVec, b: Params, *, rmatvec: MatVec, x0: Params | None = None,
              max_iter: int = 100, tol: float = 1e-10, damping: float = 0.0,
              warn: bool = True, **_: object) -> tuple[Params, SolveInfo]:
    """CG on the normal equations ``AᵀA x = Aᵀb``: any non-singular (non-symmetric) ``A``."""
    A = _damped(matvec, damping)
    At = _damped(rmatvec, damping)
    x, info = cg(lambda v: At(A(v)), At(b), x0=x0, max_iter=max_iter, tol=tol * 1e-3,
                 warn=False)
    b_norm = float(tree_norm(b))
    return _finish("normal_cg", x, info.iterations, _relative_residual(A, x, b, b_norm),
                   tol, warn)


def neumann(matvec: MatVec, b: Params, *, step_size: float, max_iter: int = 100,
            tol: float = 1e-10, damping: float = 0.0, warn: bool = True,
            **_: object) -> tuple[Params, SolveInfo]:
    """Truncated Neumann series ``x = α Σ_{k<K} (I − αA)^k b`` (Lorraine et al. 2020).

    Converges when ``0 < α < 2/λ_max(A)``; runs exactly ``max_iter`` terms, as in the
    paper, and reports the residual reached.
    """
    A = _damped(matvec, damping)
    term = dict(b)
    total = dict(b)
    for _k in range(max_iter - 1):
        term = tree_sub(term, tree_scale(A(term), step_size))
        total = {k: total[k] + term[k] for k in total}
    x = tree_scale(total, step_size)
    b_norm = float(tree_norm(b))
    return _finish("neumann", x, max_iter, _relative_residual(A, x, b, b_norm), tol, warn)


def fixed_point(matvec: MatVec, b: Params, *, step_size: float = 1.0, x0: Params | None = None,
                max_iter: int = 100, tol: float = 1e-10, damping: float = 0.0,
                warn: bool = True, **_: object) -> tuple[Params, SolveInfo]:
    """Richardson iteration ``x ← x + α(b − Ax)`` until the residual is below ``tol``.

    With a fixed-point map T and ``A = I − ∂T/∂θ`` (α = 1) this is the classic
    fixed-point backward pass ``x ← b + ∂Tᵀ x``.
    """
    A = _damped(matvec, damping)
    b_norm = float(tree_norm(b))
    x = tree_zeros_like(b) if x0 is None else dict(x0)
    it = 0
    residual = math.inf
    for it in range(1, max_iter + 1):
        r = tree_sub(b, A(x))
        residual = float(tree_norm(r)) / (b_norm if b_norm > 0 else 1.0)
        if residual <= tol or not math.isfinite(residual):
            it -= 1
            break
        x = tree_axpy(step_size, r, x)
    else:
        residual = _relative_residual(A, x, b, b_norm)
    return _finish("fixed_point", x, it, residual, tol, warn)


def power_iteration(matvec: MatVec, like: Params, *, iters: int = 20,
                    generator: torch.Generator | None = None) -> float:
    """Estimate the largest |eigenvalue| of ``A`` (to choose Neumann/Richardson step sizes)."""
    v = {k: torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device)
         for k, t in like.items()}
    v = tree_scale(v, 1.0 / float(tree_norm(v)))
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(tree_norm(w))
        if lam == 0.0:
            return 0.0
        v = tree_scale(w, 1.0 / lam)
    return lam


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0.0:
        return matvec
    return lambda v: tree_axpy(damping, v, matvec(v))


SOLVERS: dict[str, Callable[..., tuple[Params, SolveInfo]]] = {
    "cg": cg,
    "normal_cg": normal_cg,
    "neumann": neumann,
    "fixed_point": fixed_point,
}

