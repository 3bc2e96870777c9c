"""Hyperparameter learning's outer step: the bilevel outer loop with declared ranges.

There is one outer loop, :mod:`metaopt.bilevel.outer`; this module only turns
:class:`~metaopt.algorithms.hyper.constraints.Box` constraints into its ``project``
argument and defaults to a warm start (the usual choice for hyper-cleaning, where φ
moves a little per step). The whole loop is
``hypergradient_descent(..., project=projection(constraints), warm_start=True)``;
:func:`hyper_init` / :func:`hyper_step` are its steps for drivers that checkpoint
between them (the runner's hyper-cleaning experiment).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metaopt.algorithms.hyper.constraints import Box, projection
from metaopt.bilevel.outer import OuterState, outer_init, outer_step
from metaopt.bilevel.problem import BilevelProblem, Estimator, Hypergradient
from metaopt.optim import GradientTransformation

__all__ = ["HyperState", "hyper_init", "hyper_step"]

#: The outer-loop state (φ, last θ, outer-optimizer state, estimator state, step).
HyperState = OuterState


def hyper_init(phi: Mapping[str, Tensor], theta0: Mapping[str, Tensor],
               outer_optimizer: GradientTransformation,
               constraints: Mapping[str, Box] | None = None) -> HyperState:
    """Initial state; φ is checked against its constraints before anything runs."""
    return outer_init(phi, theta0, outer_optimizer, project=projection(constraints))


def hyper_step(state: HyperState, estimator: Estimator, problem: BilevelProblem,
               outer_optimizer: GradientTransformation, *, theta0: Mapping[str, Tensor],
               constraints: Mapping[str, Box] | None = None,
               warm_start: bool = True) -> tuple[HyperState, Hypergradient]:
    """One outer step (:func:`metaopt.bilevel.outer.outer_step` with the constraints)."""
    return outer_step(state, problem, estimator, outer_optimizer, theta0=theta0,
                      warm_start=warm_start, project=projection(constraints))
