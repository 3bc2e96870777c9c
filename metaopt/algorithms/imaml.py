"""iMAML (Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients").

Each task solves the proximal inner problem

    θ*(φ) = argmin_θ  L_support(θ) + (λ/2)‖θ − φ‖²

approximately (K optimizer steps from φ, no graph kept), and the meta-gradient of
L_query(θ*) comes from the implicit function theorem:

    dL_query/dφ = (I + H/λ)⁻¹ ∇L_query(θ*),   H = ∇²L_support(θ*),

solved matrix-free with Hessian-vector products. iMAML is :class:`MAML` with the
proximal inner objective (``proximal=λ``) and the estimator
:class:`metaopt.bilevel.Implicit`, run through the same task batching (the linear
solve is data-dependent, so tasks run in the per-task loop); this module only
chooses the solver. Memory does not grow with K.

The formula assumes θ* minimises the proximal objective, so that ``H + λI ⪰ 0``. With
a non-convex network and a few inner steps that fails badly. On the glyph conv net
of ``configs/imaml_glyph_5way1shot.yaml`` (λ = 1, 5 SGD steps; measured by
``scripts/imaml_curvature.py``) ``H + λI`` has eigenvalues down to −4…−19 (59–207 of
1941 negative) and θ* is far from stationary (‖∇ inner‖ ≈ 2–5). The exact solve of
that indefinite system is useless as a meta-gradient: it is dominated by
near-singular directions (norm 4–43 ‖g‖, cosine with g = ∇L_query within ±0.08).

The default solver (``"cg"``) is therefore *truncated* CG, the Newton-CG rule
(Nocedal & Wright, Alg. 7.1): it stops at the first search direction of non-positive
curvature and keeps the iterate reached, which lies in the Krylov subspace where the
system is positive definite; if that happens on the first direction it returns the
first-order meta-gradient g (u = g/λ) instead of 0. Where ``H + λI ≻ 0`` this is plain
CG and converges to the formula above. Stopping early is by design, so no warning is
raised; ``last_diagnostics`` reports ``linear_negative_curvature_at``.

Alternatives, kept as options and compared in ``scripts/imaml_solver_ablation.py``:
``solver="normal_cg"`` (exact solve of the indefinite system; worse on glyph
validation episodes) and ``solver="lanczos"`` (the saddle-free solve of
:func:`metaopt.bilevel.linear_solve.lanczos`: the Krylov-space solution with
``|H + λI|``, eigenvalues floored at ``min_eig``, default λ). The saddle-free solve
is as accurate as truncated CG on glyph validation episodes, but made sinusoid
meta-training diverge (seed 0 of ``configs/imaml_sinusoid.yaml``: at step 994 with
floor λ, 1292 with 0.1 λ) where truncated CG trains, so it is not the default.
"""

from __future__ import annotations

from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.bilevel.implicit import Implicit

__all__ = ["iMAML"]

#: Linear solvers iMAML accepts for (H + λI) u = ∇L_query (see :class:`iMAML`).
SOLVERS = ("cg", "lanczos", "normal_cg")
#: Default ``min_eig`` of the ``lanczos`` solve, as a fraction of λ.
MIN_EIG_RATIO = 1.0


class iMAML(MAML):
    """Implicit MAML: ``MAML(model, estimator=Implicit(...), proximal=lam)``.

    Args:
        model: the network (its parameters are φ).
        inner_lr, inner_steps, inner_optimizer: the inner solver for θ* (SGD by default).
        lam: proximal strength λ (the paper's λ; larger keeps θ* closer to φ).
        cg_steps, cg_tol, damping: budget (Hessian-vector products), relative-residual
            target (default: :func:`~metaopt.bilevel.implicit.default_tol` of the dtype)
            and Tikhonov damping of the linear solve of (H + λI) u = ∇L_query.
        solver: ``"cg"`` (default: truncated at the first negative curvature, see
            the module docstring), ``"lanczos"`` (saddle-free) or ``"normal_cg"``
            (exact solve of an indefinite system, two products per iteration).
        min_eig: the ``lanczos`` curvature floor (default λ).

    ``meta_loss`` runs tasks one at a time (the linear solve has data-dependent
    iteration counts, so it is not vmapped); ``last_diagnostics`` holds each task's
    solver report (residual, iterations; ``cg`` adds where it met negative
    curvature, ``lanczos`` the extreme Ritz values and how many it modified).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 10,
                 *, lam: float = 1.0, cg_steps: int = 10, cg_tol: float | None = None,
                 damping: float = 0.0, solver: str = "cg", min_eig: float | None = None,
                 **kwargs) -> None:
        if kwargs.pop("first_order", False):
            raise ValueError("iMAML's meta-gradient is implicit, not first-order")
        if "estimator" in kwargs or "proximal" in kwargs:
            raise TypeError("iMAML sets estimator and proximal (lam); use MAML(model, "
                            "estimator=Implicit(...), proximal=...) for other choices")
        if kwargs.get("strategy", "auto") == "vmap":
            raise ValueError("iMAML runs tasks in a loop (CG is data-dependent)")
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        lam = float(lam)
        min_eig = MIN_EIG_RATIO * lam if min_eig is None else float(min_eig)
        if not min_eig > 0:
            raise ValueError(f"min_eig must be > 0, got {min_eig!r}")
        options = {"cg": {"first_step_fallback": 1.0 / (lam + damping)},
                   "lanczos": {"min_eig": min_eig}}.get(solver)
        estimator = Implicit(solver=solver, max_iter=cg_steps, tol=cg_tol, damping=damping,
                             warn=False, solver_options=options)
        super().__init__(model, inner_lr, inner_steps, estimator=estimator, proximal=lam,
                         **kwargs)
        self.lam = lam
        self.solver = solver
        self.min_eig = min_eig
