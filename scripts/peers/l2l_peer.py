"""learn2learn 0.2.0: ``l2l.algorithms.MAML`` with ``.clone()`` / ``.adapt()``.

Needs ``scripts/peers/install_learn2learn.sh`` on Python 3.11 (re-cythonized sdist and a
torchvision import stub).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import LossFn, ModelFactoryState, StepFn, Tasks, run_meta_gradient, task_slices


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Per task: ``learner = maml.clone()``, ``learner.adapt(support_loss)``, backward query."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False)

    def step(tasks: Tasks) -> Tensor:
        maml.zero_grad(set_to_none=True)
        n_tasks = tasks[0].shape[0]
        losses = []
        for sx, sy, qx, qy in task_slices(tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(loss_fn(learner(sx), sy))
            query_loss = loss_fn(learner(qx), qy)
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
    """``(meta_loss, grads)`` of second-order MAML with learn2learn, from a fresh model."""
    return run_meta_gradient(make_step, model_factory_state, tasks, inner_steps, inner_lr, loss_fn)
