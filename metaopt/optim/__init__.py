"""Differentiable functional optimizers: pure ``init``/``update`` pairs over parameter dicts."""

from metaopt.optim.adam import adam, adamw
from metaopt.optim.base import (
    GradientTransformation,
    Hyper,
    State,
    apply_updates,
    chain,
    hyper_for,
)
from metaopt.optim.sgd import sgd

__all__ = [
    "GradientTransformation",
    "Hyper",
    "State",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "hyper_for",
    "sgd",
]
