"""Hyperparameter learning: hyperparameters as outer parameters of a bilevel problem.

* :mod:`.hyperparams` — how φ enters the inner problem (sample weights, per-layer
  learning rates / weight decay, L2 strengths, a loss-weighting network);
* :mod:`.constraints` — valid ranges, projected or rejected (:class:`Box`);
* :mod:`.outer` — the bilevel outer loop (:mod:`metaopt.bilevel.outer`) with those
  ranges as its projection, warm-started by default;
* :mod:`.cleaning` — the data-reweighting (hyper-cleaning) problem and its trainer;
* :mod:`.online_lr` — hypergradient descent on per-layer learning rates during
  ordinary training (Baydin et al. 2018), as a ``torch.optim`` optimizer.
"""

from metaopt.algorithms.hyper.cleaning import (
    accuracy,
    fit_weighted,
    linear_logits,
    logistic_theta0,
    reweighting_problem,
)
from metaopt.algorithms.hyper.constraints import (
    Box,
    HyperparameterRangeError,
    constrain,
    constraint_for,
    projection,
)
from metaopt.algorithms.hyper.hyperparams import (
    LossWeightNet,
    l2_penalty,
    learned_sgd,
    net_params,
    net_weights,
    prefixed,
    sample_weights,
    unprefixed,
    weighted_mean,
)
from metaopt.algorithms.hyper.online_lr import HypergradientSGD, per_layer_groups
from metaopt.algorithms.hyper.outer import HyperState, hyper_init, hyper_step

__all__ = [
    "Box",
    "HyperState",
    "HypergradientSGD",
    "HyperparameterRangeError",
    "LossWeightNet",
    "accuracy",
    "constrain",
    "constraint_for",
    "fit_weighted",
    "hyper_init",
    "hyper_step",
    "l2_penalty",
    "learned_sgd",
    "linear_logits",
    "logistic_theta0",
    "net_params",
    "net_weights",
    "per_layer_groups",
    "prefixed",
    "projection",
    "reweighting_problem",
    "sample_weights",
    "unprefixed",
    "weighted_mean",
]
