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
1941 negative) and θ* is far from stationary (‖∇ inner‖ ≈ 2–5). Plain CG breaks down
on the negative curvature, mostly after one step (it then returns a multiple of
g = ∇L_query), and the exact solve of the indefinite system is no better: it is
dominated by near-singular directions (norm 4–43 ‖g‖, cosine with g within ±0.08).

The default solver is therefore ``"lanczos"``
(:func:`metaopt.bilevel.linear_solve.lanczos`): in the Krylov space of the budget it
solves with ``|H + λI|`` — eigenvalues (Ritz values) replaced by ``max(|e|, min_eig)``,
the saddle-free Newton modification — with ``min_eig = λ`` by default. In terms of H:
curvature h ≥ 0 is kept, h in [−2λ, 0) counts as 0 and h < −2λ by its magnitude. So
wherever H ⪰ 0 (a locally convex task loss, the case iMAML's analysis assumes) the
answer is the formula above, the same iterate as CG, and in every case the map
g ↦ dL/dφ is a contraction, ‖dL/dφ‖ ≤ ‖g‖, as (I + H/λ)⁻¹ is for H ⪰ 0.

A lower floor is exact on more systems (``min_eig = 0.1 λ``: wherever H + λI ⪰ 0.1 λ I)
but amplifies weakly curved directions up to λ/min_eig times; on the sinusoid config
that made meta-training unstable (training loss rising from step ~300, the inner loop
overflowing at step 1292 of seed 0) where CG and ``min_eig = λ`` train. ``solver="cg"``
keeps the old behaviour and ``solver="normal_cg"`` solves the indefinite system
exactly. On glyph validation episodes the solver does not change accuracy beyond seed
noise (``scripts/imaml_solver_ablation.py``); the default is chosen for being well
defined and stable, not for a measured gain.
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
SOLVERS = ("lanczos", "cg", "normal_cg")
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
        solver: ``"lanczos"`` (default: saddle-free, see the module docstring),
            ``"cg"`` (stops at the first negative curvature, as before this option
            existed) or ``"normal_cg"`` (exact solve of an indefinite system, two
            products per iteration).
        min_eig: the ``lanczos`` curvature floor (default λ).

    ``meta_loss`` runs tasks one at a time (the linear solve has data-dependent
    iteration counts, so it is not vmapped); ``last_diagnostics`` holds each task's
    solver report (residual, iterations; ``lanczos`` adds the extreme Ritz values
    and how many were modified).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 10,
                 *, lam: float = 1.0, cg_steps: int = 10, cg_tol: float = 1e-10,
                 damping: float = 0.0, solver: str = "lanczos", min_eig: float | None = None,
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
        options = {"min_eig": self.min_eig} if solver == "lanczos" else None
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
