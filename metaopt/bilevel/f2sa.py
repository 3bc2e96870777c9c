"""F2SA: a fully first-order hypergradient (Kwon et al., ICML 2023).

"A Fully First-Order Method for Stochastic Bilevel Optimization" replaces the
bilevel problem by the penalty ``L_λ(φ, y, z) = f(y, φ) + λ (g(y, φ) − g(z, φ))``:
``z`` tracks argmin g, ``y`` tracks argmin (g + f/λ), and

    dF/dφ ≈ ∇φ f(y, φ) + λ (∇φ g(y, φ) − ∇φ g(z, φ))

with an O(1/λ) bias, so λ is raised on a schedule. Only gradients are used — no
Hessian-vector products, no backprop through the inner loop. ``y``, ``z`` and λ are
carried between outer steps in :attr:`Hypergradient.state` (warm start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.bilevel._common import initial_theta, outer_leaves
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.params import NonFiniteError, Params, check_finite, tree_clone, tree_detach

__all__ = ["F2SA", "F2SAState"]


@dataclass
class F2SAState:
    """The auxiliaries carried between outer steps."""

    y: Params
    z: Params
    lam: float
    outer_step: int = 0


@dataclass(frozen=True)
class F2SA:
    """Fully first-order hypergradient with an increasing penalty λ.

    Args:
        lam_init: penalty at the first outer step.
        lam_growth: added to λ after every outer step (the paper's increasing schedule).
        lam_max: cap on λ (bias of the estimate is O(1/λ)).
        inner_steps: gradient steps for ``y`` and ``z`` per outer step (default: the
            problem's ``inner_steps``). Both use the problem's inner optimizer; ``y``
            minimises ``g + f/λ``, so its step is the paper's α = η/λ on (∇f + λ∇g).
    """

    lam_init: float = 1.0
    lam_growth: float = 1.0
    lam_max: float = 1e4
    inner_steps: int | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.lam_init <= 0 or self.lam_max < self.lam_init or self.lam_growth < 0:
            raise ValueError("need 0 < lam_init <= lam_max and lam_growth >= 0, got "
                             f"{self.lam_init}, {self.lam_max}, {self.lam_growth}")

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: F2SAState | None = None) -> Hypergradient:
        phi_d = tree_detach(outer_leaves(phi))
        if state is None:
            start = tree_detach(initial_theta(theta0, phi_d))
            state = F2SAState(y=tree_clone(start), z=tree_clone(start), lam=self.lam_init)
        lam = state.lam
        steps = problem.inner_steps if self.inner_steps is None else self.inner_steps
        optimizer = problem.optimizer_for(phi_d)
        base = state.outer_step * steps
        outer_batch = problem.outer_batch(state.outer_step)

        def g_loss(theta: Params, step: int) -> Tensor:
            return problem.inner_value(theta, phi_d, problem.inner_batch(base + step))

        def penalised_loss(theta: Params, step: int) -> Tensor:
            return (problem.inner_value(theta, phi_d, problem.inner_batch(base + step))
                    + problem.outer_value(theta, phi_d, outer_batch) / lam)

        with torch.no_grad():
            z = unroll(g_loss, optimizer, state.z, steps, check_finite=self.check_finite).theta
            y = unroll(penalised_loss, optimizer, state.y, steps,
                       check_finite=self.check_finite).theta

        with torch.enable_grad():
            ph = {k: v.clone().requires_grad_() for k, v in phi_d.items()}
            batch = problem.inner_batch(base + steps)
            gap = problem.inner_value(y, ph, batch) - problem.inner_value(z, ph, batch)
            value = problem.outer_value(y, ph, outer_batch) + lam * gap
            keys = list(ph)
            gs = torch.autograd.grad(value, [ph[k] for k in keys], allow_unused=True)
            grad = {k: (torch.zeros_like(ph[k]) if g is None else g.detach())
                    for k, g in zip(keys, gs)}
            outer_value = problem.outer_value(y, phi_d, outer_batch).detach()
        if self.check_finite:
            try:
                check_finite(grad, "in the F2SA hypergradient")
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"{err} (λ = {lam:g}; lower lam_max or the inner lr)") from None
        new_state = F2SAState(y=tree_detach(y), z=tree_detach(z),
                              lam=min(lam + self.lam_growth, self.lam_max),
                              outer_step=state.outer_step + 1)
        return Hypergradient(
            grad=grad, theta=tree_detach(y), outer_loss=outer_value,
            diagnostics={"estimator": "f2sa", "lam": lam, "inner_steps": steps},
            state=new_state)
