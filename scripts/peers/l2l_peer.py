"""learn2learn 0.2.0: ``l2l.algorithms.MAML`` with ``.clone()`` / ``.adapt()``.

Needs ``scripts/peers/install_learn2learn.sh`` on Python 3.11 (re-cythonized sdist and a
torchvision import stub).
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import LossFn, StepFn, Tasks, per_task_step


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Per task: ``learner = maml.clone()``, ``learner.adapt(support_loss)``, query loss."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False)

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        learner = maml.clone()
        for _ in range(inner_steps):
            learner.adapt(loss_fn(learner(sx), sy))
        return loss_fn(learner(qx), qy)

    def step(tasks: Tasks) -> Tensor:
        return per_task_step(maml, tasks, query_loss)

    return step
