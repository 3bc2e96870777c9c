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
from metaopt.bilevel.unroll import unroll
from metaopt.params import Params

__all__ = ["Reptile"]


class Reptile(MAML):
    """Reptile on any ``nn.Module``; see the module docstring for what ``meta_loss`` is.

    Args:
        model: the network (its parameters are φ).
        inner_lr, inner_steps, inner_optimizer: the inner optimizer (SGD by default;
            Reptile papers often use Adam: ``inner_optimizer=metaopt.optim.adam(1e-3)``).
        strategy, chunk_size: as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 **kwargs) -> None:
        if kwargs.pop("first_order", True) is False:
            raise ValueError("Reptile is first-order by construction")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
        self.last_query_loss: Tensor | None = None

    @property
    def second_order(self) -> bool:
        return False

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool) -> tuple[Tensor, Tensor]:
        fmodel, buffers = self._fmodel, self._fmodel.buffers()
        fixed = {k: v.detach() for k, v in phi.items() if k not in self.inner_params}

        def inner(theta: Params, step: int) -> Tensor:
            return loss_fn(fmodel({**fixed, **theta}, support_x, buffers), support_y)

        start = {k: phi[k].detach() for k in self.inner_params}
        with torch.no_grad():
            theta = unroll(inner, self.optimizer_for(phi), start, self.inner_steps,
                           stop_gradient=True, check_finite=checks).theta
            query = loss_fn(fmodel({**fixed, **theta}, query_x, buffers), query_y)
        half_sq = sum(0.5 * (phi[k] - theta[k].detach()).square().sum()
                      for k in self.inner_params)
        return half_sq, query

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn) -> Tensor:
        """Mean ½‖φ − θ_K‖²; its gradient is the Reptile direction φ − mean θ_K."""
        loss = super().meta_loss(support_x, support_y, query_x, query_y, loss_fn)
        self.last_query_loss = self.last_task_losses.mean()
        return loss
