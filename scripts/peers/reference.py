"""Plain PyTorch MAML: ``torch.autograd.grad(create_graph=True)`` + ``functional_call``.

The cross-check for the peers, and the stand-in for metaopt while
``metaopt.algorithms.MAML`` is not importable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .common import LossFn, ModelFactoryState, StepFn, Tasks, run_meta_gradient, task_slices


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """Second-order MAML by hand: task loop, SGD inner loop, per-task backward."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def step(tasks: Tasks) -> Tensor:
        model.zero_grad(set_to_none=True)
        params0 = dict(model.named_parameters())
        n_tasks = tasks[0].shape[0]
        losses = []
        for sx, sy, qx, qy in task_slices(tasks):
            params = {name: params0[name] for name in names}
            for _ in range(inner_steps):
                loss = loss_fn(functional_call(model, params, (sx,)), sy)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {
                    name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)
                }
            query_loss = loss_fn(functional_call(model, params, (qx,)), qy)
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
    """``(meta_loss, grads)`` of second-order MAML from a fresh model."""
    return run_meta_gradient(make_step, model_factory_state, tasks, inner_steps, inner_lr, loss_fn)
