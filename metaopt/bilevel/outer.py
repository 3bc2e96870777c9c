"""The outer loop: hypergradient descent on φ with warm- or cold-started inner solves.

One outer step (:func:`outer_step`, the functional core) estimates dF/dφ with any
estimator, refuses a non-finite hypergradient, steps φ with a functional optimizer
(:mod:`metaopt.optim`) and maps φ back into its feasible set (``project``).
:func:`hypergradient_descent` is that step in a loop; step-by-step drivers (the
runner's experiments, which checkpoint between steps) call :func:`outer_init` and
:func:`outer_step` themselves. Estimator state (F2SA's auxiliaries, BOME's iterate)
is always passed back to the next step.

Warm start feeds each outer step's inner solution back as the next θ₀; cold start
always restarts from the given θ₀. For over-parameterised inner problems the two
reach different answers (Arbel & Mairal, "On Implicit Bias in Overparameterized
Bilevel Optimization", 2022), so the choice is explicit here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaopt.bilevel.problem import BilevelProblem, Estimator, Hypergradient, InitialTheta
from metaopt.optim.base import GradientTransformation, State, apply_updates
from metaopt.params import Params, check_finite, tree_detach

__all__ = ["OuterResult", "OuterState", "hypergradient_descent", "outer_init", "outer_step"]

#: Maps φ back into its feasible set (a projection), or raises if it left it.
Projection = Callable[[Params], Params]


@dataclass
class OuterState:
    """Everything that changes across outer steps (all tensors detached).

    ``theta`` is the last inner solution (θ₀ before the first step).
    """

    phi: Params
    theta: Params
    outer_state: State
    estimator_state: Any = None
    step: int = 0


@dataclass
class OuterResult:
    """Final φ and θ, and one record per outer step."""

    phi: Params
    theta: Params
    history: list[dict[str, Any]] = field(default_factory=list)
    estimator_state: Any = None


def _project(phi: Params, project: Projection | None) -> Params:
    return phi if project is None else tree_detach(project(phi))


def outer_init(phi: Mapping[str, Tensor], theta0: InitialTheta,
               outer_optimizer: GradientTransformation, *,
               project: Projection | None = None) -> OuterState:
    """The state before the first outer step; φ goes through ``project`` first.

    ``theta0`` may be a function of φ (MAML: θ₀ = φ); the state then holds θ₀(φ).
    """
    phi = _project(tree_detach(dict(phi)), project)
    theta = theta0(phi) if callable(theta0) else dict(theta0)
    return OuterState(phi=phi, theta=tree_detach(theta), outer_state=outer_optimizer.init(phi))


def outer_step(state: OuterState, problem: BilevelProblem, estimator: Estimator,
               outer_optimizer: GradientTransformation, *, theta0: InitialTheta,
               warm_start: bool, project: Projection | None = None
               ) -> tuple[OuterState, Hypergradient]:
    """One outer step ``φ ← project(φ + outer_optimizer(dF/dφ))``.

    Args:
        theta0: the inner start for a cold start (a dict, or a function of φ).
        warm_start: start the inner solve from ``state.theta`` (the previous inner
            solution) instead of ``theta0``.
        project: maps φ back into its feasible set after the update (constraints);
            it may raise instead (a rejecting constraint).

    Returns the new state and the hypergradient it used. A non-finite hypergradient
    raises :class:`~metaopt.params.NonFiniteError` naming the entry and the step.
    """
    start: InitialTheta = state.theta if warm_start else theta0
    hg = estimator(problem, state.phi, start, state.estimator_state)
    check_finite(hg.grad, f"in the hypergradient at outer step {state.step + 1}")
    with torch.no_grad():
        updates, outer_state = outer_optimizer.update(hg.grad, state.outer_state, state.phi)
        phi = tree_detach(apply_updates(state.phi, updates))
    phi = _project(phi, project)
    new = OuterState(phi=phi, theta=tree_detach(hg.theta), outer_state=outer_state,
                     estimator_state=hg.state, step=state.step + 1)
    return new, hg


def hypergradient_descent(problem: BilevelProblem, estimator: Estimator,
                          phi: Mapping[str, Tensor], theta0: InitialTheta, *,
                          outer_optimizer: GradientTransformation, steps: int,
                          warm_start: bool = False,
                          project: Projection | None = None,
                          callback: Callable[[int, Params, Any], None] | None = None,
                          progress: bool = False) -> OuterResult:
    """Run ``steps`` outer updates ``φ ← φ + outer_optimizer(dF/dφ)`` (:func:`outer_step`).

    Args:
        warm_start: start each inner solve from the previous inner solution.
        project: maps φ back into its feasible set, before the first step and after
            every update (constraints).
        callback: ``callback(step, phi, hypergradient)`` after each step.
        progress: show a progress bar with the outer loss.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    state = outer_init(phi, theta0, outer_optimizer, project=project)
    history: list[dict[str, Any]] = []
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="outer", leave=False)
    for step in bar:
        state, hg = outer_step(state, problem, estimator, outer_optimizer, theta0=theta0,
                               warm_start=warm_start, project=project)
        record = {"step": step, "outer_loss": float(hg.outer_loss)}
        record.update({k: v for k, v in hg.diagnostics.items()
                       if isinstance(v, (int, float, bool))})
        history.append(record)
        if progress:
            bar.set_postfix(outer_loss=f"{record['outer_loss']:.4g}")
        if callback is not None:
            callback(step, state.phi, hg)
    return OuterResult(phi=state.phi, theta=state.theta, history=history,
                       estimator_state=state.estimator_state)
