"""Reptile (Nichol et al. 2018, "On First-Order Meta-Learning Algorithms").

Each task runs K plain inner steps from φ on its support set; the meta-update
moves φ toward the adapted weights: φ ← φ − ε (φ − mean_tasks θ_K). There is no
loss whose gradient this is in general, so :meth:`Reptile.meta_loss` returns

    mean over tasks of ½‖φ − stop_grad(θ_K)‖²,

whose gradient with respect to φ is exactly the Reptile direction φ − mean θ_K.
``loss.backward()`` therefore puts the Reptile direction into the model's
``.grad``; an outer SGD with learning rate ε is the Reptile update (Adam etc. also
work, as is common). The query loss of the adapted weights is a metric only:
``last_query_loss`` (mean) and ``last_task_losses`` (per task), detached.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaopt.algorithms.base import LossFn
from metaopt.algorithms.maml import MAML
from metaopt.bilevel.problem import BilevelProblem
from metaopt.params import Params

__all__ = ["Reptile"]


class Reptile(MAML):
    """Reptile on any ``nn.Module``; see the module docstring for what ``meta_loss`` is.

    Each task is the MAML problem with θ₀ = stop_grad(φ) and the outer objective
    ½‖φ − stop_grad(θ_K)‖², estimated by :class:`~metaopt.bilevel.FirstOrder`.

    Args:
        model: the network (its parameters are φ).
        inner_lr, inner_steps, inner_optimizer: the inner optimizer (SGD by default;
            Reptile papers often use Adam: ``inner_optimizer=metaopt.optim.adam(1e-3)``).
        strategy, memory_budget, chunk_size: as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 **kwargs) -> None:
        if kwargs.pop("first_order", True) is False:
            raise ValueError("Reptile is first-order by construction")
        if "estimator" in kwargs:
            raise TypeError("Reptile's estimator is fixed (first order); estimator is not "
                            "an argument")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
        self.last_query_loss: Tensor | None = None

    @property
    def second_order(self) -> bool:
        return False

    def theta0(self, phi: Params) -> Params:
        """θ₀ = stop_grad(φ): the Reptile direction needs no path through the inner loop."""
        return {k: phi[k].detach() for k in self.inner_params}

    def problem(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor, loss_fn: LossFn) -> BilevelProblem:
        """The MAML task with the outer objective ½‖φ − stop_grad(θ_K)‖²."""

        def outer_loss(theta: Params, phi: Params) -> Tensor:
            return sum(0.5 * (phi[k] - theta[k].detach()).square().sum() for k in theta)

        return BilevelProblem(self._inner_objective(support_x, support_y, loss_fn), outer_loss,
                              self.inner_optimizer_of_problem(), self.inner_steps,
                              name="Reptile")

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool = True,
                  functional: bool = False) -> tuple[Tensor, Tensor]:
        """½‖φ − θ_K‖² (differentiated) and the query loss at θ_K (a metric)."""
        problem = self.problem(support_x, support_y, query_x, query_y, loss_fn)
        objective = self.estimator.objective(problem, phi, self.theta0, functional=functional,
                                             check_finite=checks)
        with torch.no_grad():
            query = self.query_loss(objective.theta, phi, query_x, query_y, loss_fn)
        return objective.value, query

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn) -> Tensor:
        """Mean ½‖φ − θ_K‖²; its gradient is the Reptile direction φ − mean θ_K."""
        loss = super().meta_loss(support_x, support_y, query_x, query_y, loss_fn)
        self.last_query_loss = self.last_task_losses.mean()
        return loss
