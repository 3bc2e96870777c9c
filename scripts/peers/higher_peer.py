"""higher 0.2.1: ``higher.innerloop_ctx`` with a differentiable SGD, as in its MAML example."""

from __future__ import annotations

import higher
import torch
from torch import Tensor, nn

from .common import LossFn, ModelFactoryState, StepFn, Tasks, run_meta_gradient, task_slices


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Per task: patch the model, ``diffopt.step`` on the support loss, backward the query loss."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def step(tasks: Tasks) -> Tensor:
        model.zero_grad(set_to_none=True)
        n_tasks = tasks[0].shape[0]
        losses = []
        for sx, sy, qx, qy in task_slices(tasks):
            # copy_initial_weights=False: gradients flow to the model's own parameters.
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(inner_steps):
                    diffopt.step(loss_fn(fmodel(sx), sy))
                query_loss = loss_fn(fmodel(qx), qy)
                (query_loss / n_tasks).backward()
            losses.append(query_loss.detach())
        return torch.stack(losses).mean()

    return step


def meta_gradient(
    model_factory_state: ModelFactoryState,
    tasks: Tasks,
    inner_steps: int,
    inner_lr: float,
    loss_fn: LossFn,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(meta_loss, grads)`` of second-order MAML with higher, from a fresh model."""
    return run_meta_gradient(make_step, model_factory_state, tasks, inner_steps, inner_lr, loss_fn)
