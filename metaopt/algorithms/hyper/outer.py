"""The outer loop of hyperparameter learning, one step at a time (functional core).

One outer step: estimate the hypergradient at φ (any estimator), step φ with a
functional optimizer (:mod:`metaopt.optim`), then enforce the declared ranges
(:mod:`~metaopt.algorithms.hyper.constraints`). With ``warm_start`` the next inner
solve starts from the inner solution just reached instead of θ₀ — the usual choice
for hyper-cleaning, where φ moves a little per step — and estimator state (F2SA's
auxiliaries, BOME's iterate) is always passed back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.algorithms.hyper.constraints import Box, constrain
from metaopt.bilevel.problem import BilevelProblem, Estimator, Hypergradient
from metaopt.optim import GradientTransformation, State, apply_updates
from metaopt.params import Params, check_finite, tree_detach

__all__ = ["HyperState", "hyper_init", "hyper_step"]


@dataclass
class HyperState:
    """Everything that changes across outer steps (all tensors detached)."""

    phi: Params
    theta: Params
    outer_state: State
    estimator_state: Any = None
    step: int = 0


def hyper_init(phi: Mapping[str, Tensor], theta0: Mapping[str, Tensor],
               outer_optimizer: GradientTransformation,
               constraints: Mapping[str, Box] | None = None) -> HyperState:
    """Initial state; φ is checked against its constraints before anything runs."""
    phi = constrain(tree_detach(dict(phi)), constraints or {})
    return HyperState(phi=phi, theta=tree_detach(dict(theta0)),
                      outer_state=outer_optimizer.init(phi))


def hyper_step(state: HyperState, estimator: Estimator, problem: BilevelProblem,
               outer_optimizer: GradientTransformation, *, theta0: Mapping[str, Tensor],
               constraints: Mapping[str, Box] | None = None,
               warm_start: bool = True) -> tuple[HyperState, Hypergradient]:
    """One outer step; returns the new state and the hypergradient it used."""
    start = state.theta if warm_start else dict(theta0)
    hg = estimator(problem, state.phi, start, state.estimator_state)
    check_finite(hg.grad, f"in the hypergradient at outer step {state.step + 1}")
    with torch.no_grad():
        updates, outer_state = outer_optimizer.update(hg.grad, state.outer_state, state.phi)
        phi = apply_updates(state.phi, updates)
    phi = constrain(tree_detach(phi), constraints or {})
    new = HyperState(phi=phi, theta=tree_detach(hg.theta), outer_state=outer_state,
                     estimator_state=hg.state, step=state.step + 1)
    return new, hg
