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

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from metaopt.params import Params

__all__ = ["ARCHITECTURES", "LOptState", "LearnedOptimizer", "apply_step_",
           "register_architecture"]

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

    def update_(self, grads: Params, state: LOptState, params: Params,
                loss: Tensor | None = None, *, lr: Mapping[str, float] | None = None,
                weight_decay: Mapping[str, float] | None = None) -> LOptState:
        """In-place step for the sole owner of ``state`` (the ``torch.optim`` shell).

        Writes ``p ← p + lr·(p_learned − p) − lr·wd·p`` into the tensors of ``params``
        (``lr``/``weight_decay`` per name, default 1 and 0) and returns the new state,
        which may reuse the old state's tensors: ``state`` is invalid afterwards. Same
        math as :meth:`update`; architectures override it to skip allocations and copies.
        """
        new_params, new_state = self.update(grads, state, params, loss=loss)
        for name, p in params.items():
            apply_step_(p, new_params[name], (lr or {}).get(name, 1.0),
                        (weight_decay or {}).get(name, 0.0))
        return new_state

    def optimizer(self, params, num_steps, **kw):
        """A ``torch.optim.Optimizer`` running this learned optimizer on ``params``."""
        from metaopt.lopt.torch_optimizer import LearnedOptimizerShell
        return LearnedOptimizerShell(params, self, num_steps=num_steps, **kw)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not a layer
        raise TypeError(f"{type(self).__name__} is used through init()/update(), not called")


def apply_step_(p: Tensor, p_learned: Tensor, lr: float, weight_decay: float) -> None:
    """``p ← p + lr·(p_learned − p) − lr·weight_decay·p``, in place."""
    new_p = p_learned
    if lr != 1.0:
        new_p = p + lr * (new_p - p)
    if weight_decay:
        new_p = new_p - (lr * weight_decay) * p
    p.copy_(new_p)


#: Architecture name → class; native checkpoints and release importers look here.
ARCHITECTURES: dict[str, type[LearnedOptimizer]] = {}


def register_architecture(cls: type[LearnedOptimizer]) -> type[LearnedOptimizer]:
    """Class decorator: make ``cls`` loadable by its ``architecture`` name."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__} must set a non-empty `architecture` name")
    ARCHITECTURES[cls.architecture] = cls
    return cls
