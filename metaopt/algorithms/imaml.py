"""iMAML (Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients").

Each task solves the proximal inner problem

    θ*(φ) = argmin_θ  L_support(θ) + (λ/2)‖θ − φ‖²

approximately (K optimizer steps from φ, no graph kept), and the meta-gradient of
L_query(θ*) comes from the implicit function theorem:

    dL_query/dφ = (I + H/λ)⁻¹ ∇L_query(θ*),   H = ∇²L_support(θ*),

solved matrix-free with Hessian-vector products. The estimator is the bilevel
core's :class:`metaopt.bilevel.Implicit`; this module only states the problem.
Memory does not grow with K.

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

import torch
from torch import Tensor, nn

from metaopt.algorithms._execution import MetaBatchResult
from metaopt.algorithms.base import LossFn
from metaopt.algorithms.maml import MAML
from metaopt.bilevel import BilevelProblem
from metaopt.bilevel.implicit import Implicit
from metaopt.bilevel.unroll import unroll
from metaopt.params import Params

__all__ = ["iMAML"]

#: Linear solvers iMAML accepts for (H + λI) u = ∇L_query (see :class:`iMAML`).
SOLVERS = ("cg", "lanczos", "normal_cg")
#: Default ``min_eig`` of the ``lanczos`` solve, as a fraction of λ.
MIN_EIG_RATIO = 1.0


class iMAML(MAML):
    """Implicit MAML with a proximal inner objective.

    Args:
        model: the network (its parameters are φ).
        inner_lr, inner_steps, inner_optimizer: the inner solver for θ* (SGD by default).
        lam: proximal strength λ (the paper's λ; larger keeps θ* closer to φ).
        cg_steps, cg_tol, damping: budget (Hessian-vector products), relative-residual
            target and Tikhonov damping of the linear solve of (H + λI) u = ∇L_query.
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
                 *, lam: float = 1.0, cg_steps: int = 10, cg_tol: float = 1e-10,
                 damping: float = 0.0, solver: str = "cg", min_eig: float | None = None,
                 **kwargs) -> None:
        if kwargs.pop("first_order", False):
            raise ValueError("iMAML's meta-gradient is implicit, not first-order")
        kwargs.setdefault("strategy", "loop")
        if kwargs["strategy"] != "loop":
            raise ValueError("iMAML runs tasks in a loop (CG is data-dependent)")
        super().__init__(model, inner_lr, inner_steps, **kwargs)
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        self.lam = float(lam)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.solver = solver
        self.min_eig = MIN_EIG_RATIO * self.lam if min_eig is None else float(min_eig)
        if not self.min_eig > 0:
            raise ValueError(f"min_eig must be > 0, got {min_eig!r}")
        options = {"cg": {"first_step_fallback": 1.0 / (self.lam + damping)},
                   "lanczos": {"min_eig": self.min_eig}}.get(solver)
        self.estimator = Implicit(solver=solver, max_iter=cg_steps, tol=cg_tol, damping=damping,
                                  warn=False, solver_options=options)
        self.last_diagnostics: list[dict] = []

    def problem(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor, loss_fn: LossFn) -> BilevelProblem:
        """The proximal bilevel problem of one task (inner variables: ``inner_params``)."""
        fmodel, buffers, lam = self._fmodel, self._fmodel.buffers(), self.lam
        keys = self.inner_params

        def full(theta: Params, phi: Params) -> Params:
            return {**{k: v for k, v in phi.items() if k not in theta}, **theta}

        def inner_loss(theta: Params, phi: Params) -> Tensor:
            fit = loss_fn(fmodel(full(theta, phi), support_x, buffers), support_y)
            prox = sum((theta[k] - phi[k]).square().sum() for k in keys)
            return fit + 0.5 * lam * prox

        def outer_loss(theta: Params, phi: Params) -> Tensor:
            return loss_fn(fmodel(full(theta, phi), query_x, buffers), query_y)

        return BilevelProblem(inner_loss, outer_loss, self.optimizer_for({}),
                              self.inner_steps, name="imaml")

    def _run(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             loss_fn: LossFn) -> MetaBatchResult:
        phi = self.outer_parameters()
        need_grad = self._need_grad(phi)
        n = support_x.shape[0]
        losses, total, self.last_diagnostics = [], None, []
        for i in range(n):
            problem = self.problem(support_x[i], support_y[i], query_x[i], query_y[i], loss_fn)
            if need_grad:
                hg = self.estimator(problem, phi, lambda p: {k: p[k] for k in self.inner_params})
                total = hg.grad if total is None else {k: total[k] + hg.grad[k] for k in total}
                losses.append(hg.outer_loss)
                self.last_diagnostics.append(hg.diagnostics)
            else:
                theta = self.adapt_task(phi, support_x[i], support_y[i], loss_fn,
                                        self.inner_steps)
                losses.append(problem.outer_value(theta, phi).detach())
        grads = None if total is None else {k: g / n for k, g in total.items()}
        result = MetaBatchResult(torch.stack(losses), grads, "loop")
        result.extras["phi"] = phi
        return result

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        """θ* of the proximal problem on ``(x, y)`` (the inner solver, no IFT needed)."""
        fmodel, buffers, lam, keys = self._fmodel, self._fmodel.buffers(), self.lam, \
            self.inner_params
        anchor = {k: phi[k].detach() for k in keys}
        fixed = {k: v for k, v in phi.items() if k not in keys}

        def inner(theta: Params, step: int) -> Tensor:
            fit = loss_fn(fmodel({**fixed, **theta}, x, buffers), y)
            return fit + 0.5 * lam * sum((theta[k] - anchor[k]).square().sum() for k in keys)

        theta = unroll(inner, self.optimizer_for(phi), dict(anchor), steps).theta
        return {**fixed, **theta}
