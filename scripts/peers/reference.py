"""Plain PyTorch MAML: ``torch.autograd.grad(create_graph=True)`` + ``functional_call``.

The cross-check for the peers, and the stand-in for metaopt while
``metaopt.algorithms.MAML`` is not importable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .common import LossFn, StepFn, Tasks, per_task_step


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Second-order MAML by hand: task loop, SGD inner loop, per-task backward."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        named = dict(model.named_parameters())
        params = {name: named[name] for name in names}
        for _ in range(inner_steps):
            loss = loss_fn(functional_call(model, params, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
        return loss_fn(functional_call(model, params, (qx,)), qy)

    def step(tasks: Tasks) -> Tensor:
        return per_task_step(model, tasks, query_loss)

    return step
