"""higher 0.2.1: ``higher.innerloop_ctx`` with a differentiable SGD, as in its MAML example."""

from __future__ import annotations

import higher
import torch
from torch import Tensor, nn

from .common import LossFn, StepFn, Tasks, per_task_step


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Per task: patch the model, ``diffopt.step`` on the support loss, then the query loss."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        # copy_initial_weights=False: gradients flow to the model's own parameters.
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(inner_steps):
                diffopt.step(loss_fn(fmodel(sx), sy))
            return loss_fn(fmodel(qx), qy)

    def step(tasks: Tasks) -> Tensor:
        return per_task_step(model, tasks, query_loss)

    return step
