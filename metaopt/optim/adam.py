"""Differentiable Adam and AdamW (the ``torch.optim`` update rules, as pure functions)."""

from __future__ import annotations

import torch

from metaopt.optim.base import (
    GradientTransformation,
    Hyper,
    State,
    hyper_for,
    validate_hyper,
)
from metaopt.params import Params
from metaopt.tree import tree_zeros_like


def _adam(lr: Hyper, betas: tuple[Hyper, Hyper], eps: Hyper, weight_decay: Hyper,
          eps_root: float, decoupled: bool, name: str) -> GradientTransformation:
    b1, b2 = betas
    validate_hyper(lr, f"{name} lr")
    validate_hyper(b1, f"{name} beta1", high=1.0, inclusive_high=False)
    validate_hyper(b2, f"{name} beta2", high=1.0, inclusive_high=False)
    validate_hyper(eps, f"{name} eps")
    validate_hyper(weight_decay, f"{name} weight_decay")

    def init(params: Params) -> State:
        some = next(iter(params.values()))
        return {
            "step": torch.zeros((), dtype=some.dtype, device=some.device),
            "exp_avg": tree_zeros_like(params),
            "exp_avg_sq": tree_zeros_like(params),
        }

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        step = state["step"] + 1
        updates, m_new, v_new = {}, {}, {}
        for k, g in grads.items():
            wd = hyper_for(weight_decay, k)
            has_wd = not (isinstance(wd, (int, float)) and wd == 0.0)
            if has_wd and not decoupled:
                g = g + wd * params[k]
            beta1, beta2 = hyper_for(b1, k), hyper_for(b2, k)
            m = beta1 * state["exp_avg"][k] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"][k] + (1 - beta2) * g * g
            m_new[k], v_new[k] = m, v
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            # eps_root > 0 keeps d sqrt(v)/dv finite where a gradient is exactly zero,
            # which matters when differentiating through Adam (second order).
            denom = torch.sqrt(v_hat + eps_root) + hyper_for(eps, k)
            lr_k = hyper_for(lr, k)
            u = -lr_k * m_hat / denom
            if has_wd and decoupled:
                u = u - lr_k * wd * params[k]
            updates[k] = u
        return updates, {"step": step, "exp_avg": m_new, "exp_avg_sq": v_new}

    return GradientTransformation(init, update)


def adam(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
         weight_decay: Hyper = 0.0, *, eps_root: float = 0.0) -> GradientTransformation:
    """Adam with L2 weight decay coupled into the gradient (``torch.optim.Adam``)."""
    return _adam(lr, betas, eps, weight_decay, eps_root, decoupled=False, name="adam")


def adamw(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
          weight_decay: Hyper = 1e-2, *, eps_root: float = 0.0) -> GradientTransformation:
    """Adam with decoupled weight decay (``torch.optim.AdamW``)."""
    return _adam(lr, betas, eps, weight_decay, eps_root, decoupled=True, name="adamw")
