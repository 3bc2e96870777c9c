"""TorchOpt 0.7.3, two documented faces.

* ``torchopt`` (object-oriented): ``torchopt.MetaSGD`` on the module, with
  ``extract_state_dict``/``recover_state_dict`` around each task, as in TorchOpt's
  ``examples/few-shot/maml_omniglot.py``.
* ``torchopt_func`` (functional): ``torchopt.FuncOptimizer(torchopt.sgd(lr))`` over a tuple
  of parameters with ``torch.func.functional_call``.
"""

from __future__ import annotations

import torchopt
from torch import Tensor, nn
from torch.func import functional_call

from .common import LossFn, StepFn, Tasks, per_task_step


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """MetaSGD on the module; the module's initial state is restored after every task."""
    inner_opt = torchopt.MetaSGD(model, lr=inner_lr)

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        for _ in range(inner_steps):
            inner_opt.step(loss_fn(model(sx), sy))
        return loss_fn(model(qx), qy)

    def step(tasks: Tasks) -> Tensor:
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(inner_opt)

        def restore() -> None:
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

        return per_task_step(model, tasks, query_loss, after_task=restore)

    return step


def make_step_functional(
    model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn
) -> StepFn:
    """``FuncOptimizer(sgd)`` on a parameter tuple; the module itself is never modified."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        named = dict(model.named_parameters())
        params = tuple(named[name] for name in names)
        optimizer = torchopt.FuncOptimizer(torchopt.sgd(lr=inner_lr))
        for _ in range(inner_steps):
            out = functional_call(model, dict(zip(names, params)), (sx,))
            params = optimizer.step(loss_fn(out, sy), params)
        return loss_fn(functional_call(model, dict(zip(names, params)), (qx,)), qy)

    def step(tasks: Tasks) -> Tensor:
        return per_task_step(model, tasks, query_loss)

    return step
