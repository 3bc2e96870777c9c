"""Differentiable SGD with optional (Nesterov) momentum and L2 weight decay."""

from __future__ import annotations

from metaopt.optim.base import (
    GradientTransformation,
    Hyper,
    State,
    hyper_for,
    validate_hyper,
)
from metaopt.params import Params
from metaopt.tree import tree_zeros_like


def sgd(lr: Hyper, momentum: Hyper = 0.0, *, nesterov: bool = False,
        weight_decay: Hyper = 0.0, dampening: float = 0.0) -> GradientTransformation:
    """SGD matching ``torch.optim.SGD``'s update rule, as a pure transformation.

    ``lr``, ``momentum`` and ``weight_decay`` may be per-parameter tensor dicts and
    receive gradients when they require grad.
    """
    validate_hyper(lr, "sgd lr")
    validate_hyper(momentum, "sgd momentum", high=1.0)
    validate_hyper(weight_decay, "sgd weight_decay")
    use_momentum = not (isinstance(momentum, (int, float)) and momentum == 0.0)
    if nesterov and not use_momentum:
        raise ValueError("nesterov=True needs a non-zero momentum")

    def init(params: Params) -> State:
        return {"momentum": tree_zeros_like(params)} if use_momentum else {}

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        updates, new_buf = {}, {}
        for k, g in grads.items():
            wd = hyper_for(weight_decay, k)
            if not (isinstance(wd, (int, float)) and wd == 0.0):
                g = g + wd * params[k]
            if use_momentum:
                mu = hyper_for(momentum, k)
                buf = mu * state["momentum"][k] + (1.0 - dampening) * g
                new_buf[k] = buf
                g = g + mu * buf if nesterov else buf
            updates[k] = -hyper_for(lr, k) * g
        return updates, ({"momentum": new_buf} if use_momentum else {})

    return GradientTransformation(init, update)
