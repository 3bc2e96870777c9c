"""Learning per-sample weights: the data-reweighting (hyper-cleaning) bilevel problem.

    inner  g(θ, w) = (1/n) Σ_i σ(w_i) · CE(x_i θ, y_i) + (reg/2)·‖W‖²
    outer  f(θ)    = mean CE on clean validation data

θ is a multinomial logistic regression ``{"weight": [C, D], "bias": [C]}`` (the
classic hyper-cleaning model); the helpers take plain tensors, so any labelled data
fits. :func:`fit_weighted` is the plain (non-differentiable) trainer used for the
final model and for the baselines, so every method is scored by the same fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.algorithms.hyper.hyperparams import sample_weights, weighted_mean
from metaopt.bilevel.problem import BilevelProblem
from metaopt.optim import sgd
from metaopt.params import Params
from metaopt.tree import tree_axpy, tree_detach, tree_requires_grad

__all__ = ["accuracy", "fit_weighted", "linear_logits", "logistic_theta0",
           "reweighting_problem"]


def logistic_theta0(num_features: int, num_classes: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Params:
    """Zero-initialised multinomial logistic regression parameters."""
    return {"weight": torch.zeros(num_classes, num_features, dtype=dtype, device=device),
            "bias": torch.zeros(num_classes, dtype=dtype, device=device)}


def linear_logits(theta: Params, x: Tensor) -> Tensor:
    """``x Wᵀ + b``."""
    return x @ theta["weight"].T + theta["bias"]


def _inner(theta: Params, weights: Tensor, x: Tensor, y: Tensor, reg: float) -> Tensor:
    losses = F.cross_entropy(linear_logits(theta, x), y, reduction="none")
    return weighted_mean(losses, weights) + 0.5 * reg * (theta["weight"] ** 2).sum()


def reweighting_problem(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, *,
                        reg: float, inner_lr: float, inner_steps: int,
                        weight_key: str = "w", transform: str = "sigmoid") -> BilevelProblem:
    """The bilevel problem over φ = ``{weight_key: w ∈ R^n}`` (see module docstring).

    The inner solver is ``inner_steps`` of SGD (full batch) at ``inner_lr``.
    """
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")

    def inner_loss(theta: Params, phi: Params) -> Tensor:
        return _inner(theta, sample_weights(phi[weight_key], transform), x_train, y_train, reg)

    def outer_loss(theta: Params, phi: Params) -> Tensor:
        return F.cross_entropy(linear_logits(theta, x_val), y_val)

    return BilevelProblem(inner_loss, outer_loss, sgd(inner_lr), inner_steps,
                          name="hyper-cleaning")


@torch.no_grad()
def fit_weighted(x: Tensor, y: Tensor, weights: Tensor, *, reg: float, lr: float, steps: int,
                 num_classes: int, theta0: Params | None = None) -> Params:
    """Full-batch gradient descent on the weighted, L2-regularised cross-entropy."""
    theta = (logistic_theta0(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
             if theta0 is None else tree_requires_grad(theta0, False))
    weights = weights.detach()
    for _ in range(steps):
        with torch.enable_grad():
            th = tree_requires_grad(theta)
            loss = _inner(th, weights, x, y, reg)
            grads = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
        theta = tree_axpy(-lr, grads, tree_detach(th))
    return theta


@torch.no_grad()
def accuracy(theta: Params, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float((linear_logits(theta, x).argmax(-1) == y).to(torch.float64).mean())
