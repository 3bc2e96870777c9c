"""Online learning-rate adaptation by hypergradient descent (Baydin et al. 2018,
"Online Learning Rate Adaptation with Hypergradient Descent").

Ordinary training, no bilevel set-up: after each step θ_t = θ_{t−1} − α·d_{t−1}
(d the update direction: gradient, or momentum buffer), the derivative of the new
loss with respect to the learning rate that produced it is

    ∂f(θ_t)/∂α = −∇f(θ_t) · d_{t−1},

so one gradient step on α costs a dot product: ``α ← α + β·g_t·d_{t−1}``
(additive, SGD-HD), or ``α ← α·(1 + β·cos(g_t, d_{t−1}))`` (multiplicative, scale-free).
Each parameter group has its own α: with :func:`per_layer_groups`, one per layer.

The learning rate is kept in its range by a :class:`Box` (default ``[0, ∞)``,
projected): a hypergradient step that would make α negative is clamped (or raises
under ``mode="reject"``); a non-finite hypergradient always raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from metaopt.algorithms.hyper.constraints import Box

__all__ = ["HypergradientSGD", "per_layer_groups"]


def per_layer_groups(model: nn.Module, lr: float) -> list[dict]:
    """One parameter group per module that owns parameters, named by the module path.

    Pass the result to :class:`HypergradientSGD` for per-layer learning rates.
    """
    groups = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "name": name or "<root>"})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


class HypergradientSGD(torch.optim.Optimizer):
    """SGD (with optional momentum and weight decay) whose per-group lr adapts online.

    Args:
        params: parameters or groups (see :func:`per_layer_groups`).
        lr: initial learning rate α₀ (any value in ``lr_box``; a poor guess is fine).
        hyper_lr: β, the step size on α.
        momentum, weight_decay: as in ``torch.optim.SGD``.
        multiplicative: use the normalised multiplicative update instead of additive.
        lr_box: valid range of α and what to do outside it (default ``Box(low=0)``).

    ``group["lr"]`` always holds the current α; ``group["lr_history"]`` its trajectory.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, hyper_lr: float = 1e-4, *,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 multiplicative: bool = False, lr_box: Box | None = None) -> None:
        box = lr_box if lr_box is not None else Box(low=0.0)
        if box.violations(torch.tensor(float(lr))).item():
            raise ValueError(f"initial lr {lr} is outside its range [{box.low}, {box.high}]")
        if hyper_lr < 0:
            raise ValueError(f"hyper_lr must be >= 0, got {hyper_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = {"lr": lr, "hyper_lr": hyper_lr, "momentum": momentum,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.multiplicative = multiplicative
        self.lr_box = box
        for group in self.param_groups:
            group.setdefault("lr_history", [])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad if group["weight_decay"] == 0 else
                     p.grad + group["weight_decay"] * p for p in params]
            self._adapt_lr(group, gi, params, grads)
            lr, mu = group["lr"], group["momentum"]
            for p, g in zip(params, grads):
                state = self.state[p]
                if mu > 0:
                    buf = state.get("momentum_buffer")
                    buf = g.clone() if buf is None else buf.mul_(mu).add_(g)
                    state["momentum_buffer"] = buf
                    direction = buf
                else:
                    direction = g
                state["prev_direction"] = direction.clone()
                p.add_(direction, alpha=-lr)
            group["lr_history"].append(lr)
        return loss

    def _adapt_lr(self, group: dict, index: int, params: list, grads: list) -> None:
        prev = [self.state[p].get("prev_direction") for p in params]
        if any(d is None for d in prev):
            return  # first step: no previous direction yet
        dot = sum(torch.sum(g * d) for g, d in zip(grads, prev))
        if not bool(torch.isfinite(dot)):
            raise FloatingPointError(
                f"non-finite learning-rate hypergradient in group {group.get('name', index)}")
        beta = group["hyper_lr"]
        if self.multiplicative:
            norm = (torch.sqrt(sum(torch.sum(g * g) for g in grads))
                    * torch.sqrt(sum(torch.sum(d * d) for d in prev)))
            cos = dot / norm if float(norm) > 0 else torch.zeros(())
            new_lr = group["lr"] * (1.0 + beta * float(cos))
        else:
            new_lr = group["lr"] + beta * float(dot)
        name = f"lr of group {group.get('name', index)}"
        group["lr"] = float(self.lr_box.apply(name, torch.tensor(new_lr, dtype=torch.float64)))
