"""The contract every learned optimizer architecture follows.

A learned optimizer is an ``nn.Module`` whose parameters are the *meta*-parameters
(the weights of the per-parameter MLP, the LSTM, …), plus two pure functions over the
*task* parameters:

* ``init(params, num_steps) -> state`` — optimizer state for a task model;
* ``update(grads, state, params, loss=None) -> (new_params, new_state)`` — one step.

Both are pure in the task tensors (nothing is mutated), so meta-training can
differentiate through ``update`` (truncated BPTT) or perturb the meta-parameters
(ES/PES) with ``torch.func.functional_call(lopt, meta_params, ...)``. ``state`` is a
nested dict of tensors (and ints/floats) so it serialises without pickling.

The stateful ``torch.optim.Optimizer`` face is built on top of this contract, once,
for all architectures (see :mod:`metaopt.lopt.torch_optimizer`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from metaopt.params import Params

__all__ = ["ARCHITECTURES", "LOptState", "LearnedOptimizer", "register_architecture"]

LOptState = dict[str, Any]


class LearnedOptimizer(nn.Module):
    """Base class: meta-parameters as module parameters, steps as pure functions."""

    #: Registry/architecture name written into native checkpoints (e.g. "small_fc_lopt").
    architecture: str = ""
    #: Whether ``update`` needs the training loss (VeLO's loss features do).
    needs_loss: bool = False

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, enough to rebuild the architecture."""
        raise NotImplementedError

    def init(self, params: Params, num_steps: int) -> LOptState:
        """Optimizer state for task parameters ``params`` and a horizon of ``num_steps``."""
        raise NotImplementedError

    def update(self, grads: Params, state: LOptState, params: Params,
               loss: Tensor | None = None) -> tuple[Params, LOptState]:
        """One optimizer step: the new task parameters and the new state."""
        raise NotImplementedError

    def optimizer(self, params, num_steps, **kw):
        """A ``torch.optim.Optimizer`` running this learned optimizer on ``params``."""
        from metaopt.lopt.torch_optimizer import LearnedOptimizerShell
        return LearnedOptimizerShell(params, self, num_steps=num_steps, **kw)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not a layer
        raise TypeError(f"{type(self).__name__} is used through init()/update(), not called")


#: Architecture name → class; native checkpoints and release importers look here.
ARCHITECTURES: dict[str, type[LearnedOptimizer]] = {}


def register_architecture(cls: type[LearnedOptimizer]) -> type[LearnedOptimizer]:
    """Class decorator: make ``cls`` loadable by its ``architecture`` name."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__} must set a non-empty `architecture` name")
    ARCHITECTURES[cls.architecture] = cls
    return cls
