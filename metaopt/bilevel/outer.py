"""The outer loop: hypergradient descent on φ with warm- or cold-started inner solves.

Warm start feeds each outer step's inner solution back as the next θ₀; cold start
always restarts from the given θ₀. For over-parameterised inner problems the two
reach different answers (Arbel & Mairal, "On Implicit Bias in Overparameterized
Bilevel Optimization", 2022), so the choice is explicit here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from metaopt.bilevel.problem import BilevelProblem, Estimator, InitialTheta
from metaopt.optim.base import GradientTransformation, apply_updates
from metaopt.params import Params, tree_detach

__all__ = ["OuterResult", "hypergradient_descent"]


@dataclass
class OuterResult:
    """Final φ and θ, and one record per outer step."""

    phi: Params
    theta: Params
    history: list[dict[str, Any]] = field(default_factory=list)
    estimator_state: Any = None


def hypergradient_descent(problem: BilevelProblem, estimator: Estimator,
                          phi: Mapping[str, Tensor], theta0: InitialTheta, *,
                          outer_optimizer: GradientTransformation, steps: int,
                          warm_start: bool = False,
                          project: Callable[[Params], Params] | None = None,
                          callback: Callable[[int, Params, Any], None] | None = None,
                          progress: bool = False) -> OuterResult:
    """Run ``steps`` outer updates ``φ ← φ + outer_optimizer(dF/dφ)``.

    Args:
        warm_start: start each inner solve from the previous inner solution.
        project: maps φ back into its feasible set after every update (constraints).
        callback: ``callback(step, phi, hypergradient)`` after each step.
        progress: show a progress bar with the outer loss.
    """
    phi = tree_detach(dict(phi))
    opt_state = outer_optimizer.init(phi)
    start: InitialTheta = theta0
    est_state = None
    history: list[dict[str, Any]] = []
    theta: Params = {}
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="outer", leave=False)
    for step in bar:
        hg = estimator(problem, phi, start, est_state)
        est_state = hg.state
        theta = hg.theta
        updates, opt_state = outer_optimizer.update(hg.grad, opt_state, phi)
        phi = tree_detach(apply_updates(phi, updates))
        if project is not None:
            phi = tree_detach(project(phi))
        if warm_start:
            start = theta
        record = {"step": step, "outer_loss": float(hg.outer_loss)}
        record.update({k: v for k, v in hg.diagnostics.items()
                       if isinstance(v, (int, float, bool))})
        history.append(record)
        if progress:
            bar.set_postfix(outer_loss=f"{record['outer_loss']:.4g}")
        if callback is not None:
            callback(step, phi, hg)
    return OuterResult(phi=phi, theta=theta, history=history, estimator_state=est_state)
