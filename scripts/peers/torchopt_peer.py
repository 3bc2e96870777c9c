"""TorchOpt 0.7.3, two documented faces.

* ``torchopt`` (object-oriented): ``torchopt.MetaSGD`` on the module, with
  ``extract_state_dict``/``recover_state_dict`` around each task, as in TorchOpt's
  ``examples/few-shot/maml_omniglot.py``.
* ``torchopt_func`` (functional): ``torchopt.FuncOptimizer(torchopt.sgd(lr))`` over a tuple
  of parameters with ``torch.func.functional_call``.
"""

from __future__ import annotations

import torch
import torchopt
from torch import Tensor, nn
from torch.func import functional_call

from .common import LossFn, ModelFactoryState, StepFn, Tasks, run_meta_gradient, task_slices


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """MetaSGD on the module; the module's initial state is restored after every task."""
    inner_opt = torchopt.MetaSGD(model, lr=inner_lr)

    def step(tasks: Tasks) -> Tensor:
        model.zero_grad(set_to_none=True)
        n_tasks = tasks[0].shape[0]
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(inner_opt)
        losses = []
        for sx, sy, qx, qy in task_slices(tasks):
            for _ in range(inner_steps):
                inner_opt.step(loss_fn(model(sx), sy))
            query_loss = loss_fn(model(qx), qy)
            (query_loss / n_tasks).backward()
            losses.append(query_loss.detach())
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return torch.stack(losses).mean()

    return step


def make_step_functional(
    model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn
) -> StepFn:
    """``FuncOptimizer(sgd)`` on a parameter tuple; the module itself is never modified."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def step(tasks: Tasks) -> Tensor:
        model.zero_grad(set_to_none=True)
        named = dict(model.named_parameters())
        params0 = tuple(named[name] for name in names)
        n_tasks = tasks[0].shape[0]
        losses = []
        for sx, sy, qx, qy in task_slices(tasks):
            optimizer = torchopt.FuncOptimizer(torchopt.sgd(lr=inner_lr))
            params = params0
            for _ in range(inner_steps):
                out = functional_call(model, dict(zip(names, params)), (sx,))
                params = optimizer.step(loss_fn(out, sy), params)
            query_loss = loss_fn(functional_call(model, dict(zip(names, params)), (qx,)), qy)
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
    """``(meta_loss, grads)`` with ``torchopt.MetaSGD``, from a fresh model."""
    return run_meta_gradient(make_step, model_factory_state, tasks, inner_steps, inner_lr, loss_fn)


def meta_gradient_functional(
    model_factory_state: ModelFactoryState,
    tasks: Tasks,
    inner_steps: int,
    inner_lr: float,
    loss_fn: LossFn,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(meta_loss, grads)`` with ``torchopt.FuncOptimizer``, from a fresh model."""
    return run_meta_gradient(
        make_step_functional, model_factory_state, tasks, inner_steps, inner_lr, loss_fn
    )
