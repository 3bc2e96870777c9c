"""Matrix-free linear solvers over parameter dicts, for implicit differentiation.

Every solver has the form ``solve(matvec, b, **options) -> (x, SolveInfo)`` where
``matvec`` is a closure computing ``A @ x`` for a dict ``x`` (a Hessian-vector
product, a vector-Jacobian product, …); no matrix is ever materialised.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    "lanczos",
    "neumann",
    "normal_cg",
    "power_iteration",
]

MatVec = Callable[[Params], Params]


class LinearSolveWarning(UserWarning):
    """A linear solve stopped before reaching its tolerance."""


@dataclass
class SolveInfo:
    """How a linear solve went: iterations used and the relative residual ‖Ax−b‖/‖b‖.

    ``extra`` holds solver-specific facts (:func:`lanczos`: the extreme Ritz values
    and how many were modified), merged into :meth:`as_dict`.
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return {"solver": self.solver, "iterations": self.iterations,
                "residual": self.residual, "converged": self.converged, **self.extra}


def _relative_residual(matvec: MatVec, x: Params, b: Params, b_norm: float) -> float:
    r = tree_norm(tree_sub(b, matvec(x)))
    return float(r) / b_norm if b_norm > 0 else float(r)


def _finish(name: str, x: Params, iterations: int, residual: float, tol: float,
            warn: bool, extra: dict[str, Any] | None = None) -> tuple[Params, SolveInfo]:
    converged = residual <= tol or residual == 0.0
    if not math.isfinite(residual):
        converged = False
    if warn and not converged:
        warnings.warn(
            f"{name} linear solve did not converge: relative residual {residual:.3e} "
            f"> tol {tol:.1e} after {iterations} iterations (raise max_iter, add damping, "
            "or check that the inner problem is solved)",
            LinearSolveWarning, stacklevel=3)
    return x, SolveInfo(name, iterations, residual, converged, dict(extra or {}))


def cg(matvec: MatVec, b: Params, *, x0: Params | None = None, max_iter: int = 100,
       tol: float = 1e-10, damping: float = 0.0, warn: bool = True,
       first_step_fallback: float | None = None,
       **_: object) -> tuple[Params, SolveInfo]:
    """Conjugate gradients for symmetric positive-definite ``A + damping·I``.

    On a search direction of non-positive curvature (``pᵀAp ≤ 0``: ``A`` is not
    positive definite) it stops and returns the iterate reached — the truncated
    Newton-CG rule (Nocedal & Wright, *Numerical Optimization*, Alg. 7.1) — with a
    :class:`LinearSolveWarning` when ``warn``. If that happens on the very first
    direction the iterate is still ``x0`` (0); with ``first_step_fallback = c`` it
    returns ``c·b`` instead, the rule's steepest-descent fallback. ``SolveInfo.extra``
    has ``negative_curvature_at``: the iteration that met it (0: none).
    """
    A = _damped(matvec, damping)
    b_norm = float(tree_norm(b))
    x = tree_zeros_like(b) if x0 is None else dict(x0)
    r = tree_sub(b, A(x)) if x0 is not None else dict(b)
    p = dict(r)
    rs = tree_dot(r, r)
    it = 0
    negative_at = 0
    threshold = (tol * b_norm) ** 2
    for it in range(1, max_iter + 1):
        if float(rs) <= threshold:
            it -= 1
            break
        Ap = A(p)
        pAp = tree_dot(p, Ap)
        if float(pAp) <= 0.0:
            negative_at = it
            if warn:
                warnings.warn(f"cg: matrix is not positive definite along a search direction "
                              f"(pᵀAp = {float(pAp):.3e}); use lanczos (min_eig), normal_cg "
                              "or add damping",
                              LinearSolveWarning, stacklevel=2)
            if it == 1 and x0 is None and first_step_fallback is not None:
                x = tree_scale(b, first_step_fallback)
            break
        alpha = rs / pAp
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, Ap, r)
        rs_new = tree_dot(r, r)
        p = tree_axpy(rs_new / rs, p, r)
        rs = rs_new
    return _finish("cg", x, it, _relative_residual(A, x, b, b_norm), tol, warn,
                   {"negative_curvature_at": negative_at})


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


def lanczos(matvec: MatVec, b: Params, *, min_eig: float | None = None, max_iter: int = 100,
            tol: float = 1e-10, damping: float = 0.0, warn: bool = True,
            **_: object) -> tuple[Params, SolveInfo]:
    """Symmetric, possibly indefinite ``A x = b``, solved positive-definitely in a Krylov space.

    Runs ``k ≤ max_iter`` Lanczos steps on ``A + damping·I`` from ``b`` (one matvec each,
    full reorthogonalisation), giving ``A V_k ≈ V_k T_k`` with ``T_k = S Θ Sᵀ`` (Ritz
    values Θ), and returns

        x = ‖b‖ V_k S |Θ|₊⁻¹ Sᵀ e₁,    |θ|₊ = max(|θ|, min_eig).

    * If every Ritz value is ≥ ``min_eig`` — always so when ``A ⪰ min_eig·I`` — nothing
      is modified and ``x`` is the CG iterate (same Krylov space, same minimiser); it
      converges to ``A⁻¹ b``.
    * Where ``A`` is indefinite CG breaks down (or diverges) and ``A⁻¹ b`` is dominated
      by its near-singular directions. Here negative curvature is used by magnitude —
      the saddle-free Newton modification ``|A|`` (Dauphin et al. 2014, who also apply it
      in a Krylov subspace) — and curvature below ``min_eig`` is raised to it, so
      ``‖x‖ ≤ ‖b‖ / min_eig``. The answer is deliberately *not* ``A⁻¹ b``.

    ``min_eig`` (> 0) must be given. The reported ``residual`` is that of the solved
    (modified) system, ``β_k |y_k| / ‖b‖`` from the Lanczos relation; ``SolveInfo.extra``
    holds ``ritz_min``, ``ritz_max``, ``modified`` (how many Ritz values were changed)
    and ``true_residual`` (‖Ax − b‖/‖b‖, which stays large when something was modified).
    """
    if min_eig is None or not min_eig > 0:
        raise ValueError(f"lanczos needs min_eig > 0 (the smallest curvature it inverts), "
                         f"got {min_eig!r}")
    A = _damped(matvec, damping)
    b_norm = float(tree_norm(b))
    if b_norm == 0.0:
        return _finish("lanczos", tree_zeros_like(b), 0, 0.0, tol, warn,
                       {"ritz_min": math.nan, "ritz_max": math.nan, "modified": 0,
                        "true_residual": 0.0})
    basis = [tree_scale(b, 1.0 / b_norm)]
    eps = max(torch.finfo(t.dtype).eps for t in b.values())
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(max_iter):
        v = basis[-1]
        w = A(v)
        alphas.append(float(tree_dot(w, v)))
        # Full reorthogonalisation (twice is enough): keeps V_k orthonormal in float32.
        for _ in range(2):
            for q in basis:
                w = tree_axpy(-float(tree_dot(w, q)), q, w)
        beta = float(tree_norm(w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        y = S @ ((S[0] * b_norm) / theta.abs().clamp_min(min_eig))
        residual = beta * abs(float(y[-1])) / b_norm
        scale = max(abs(float(theta[0])), abs(float(theta[-1])))
        if residual <= tol or beta <= 64 * eps * scale:  # converged, or an invariant subspace
            break
        betas.append(beta)
        basis.append(tree_scale(w, 1.0 / beta))
    x = tree_zeros_like(b)
    for coeff, q in zip(y.tolist(), basis):
        x = tree_axpy(coeff, q, x)
    extra = {"ritz_min": float(theta[0]), "ritz_max": float(theta[-1]),
             "modified": int((theta < min_eig).sum()),
             "true_residual": _relative_residual(A, x, b, b_norm)}
    return _finish("lanczos", x, len(alphas), residual, tol, warn, extra)


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
    "lanczos": lanczos,
    "neumann": neumann,
    "fixed_point": fixed_point,
}

