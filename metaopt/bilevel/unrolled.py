"""Unrolled hypergradients: backpropagate through K inner optimizer steps.

Full unrolling is exact for the K-step inner solver (not for the limit θ*).
``truncate=T`` differentiates only the last T steps (Shaban et al. 2019, truncated
back-propagation); ``checkpoint_segment=S`` recomputes S-step segments in the
backward pass, so peak memory grows like K/S + S instead of K.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import collect_grad, initial_theta, outer_leaves, step_loss
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.bilevel.unroll import unroll
from metaopt.params import tree_detach

__all__ = ["Unrolled"]


@dataclass(frozen=True)
class Unrolled:
    """Reverse-mode differentiation through the inner optimization.

    Args:
        truncate: differentiate only the last ``truncate`` inner steps (None: all).
        checkpoint_segment: recompute segments of this many steps in backward.
        first_order: treat inner gradients as constants (see :class:`FirstOrder`).
        check_finite: stop with the step and tensor named when NaN/inf appears.
    """

    truncate: int | None = None
    checkpoint_segment: int | None = None
    first_order: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.truncate is not None and self.truncate < 0:
            raise ValueError(f"truncate must be >= 0, got {self.truncate}")
        if self.checkpoint_segment is not None and self.checkpoint_segment < 1:
            raise ValueError(f"checkpoint_segment must be >= 1, got {self.checkpoint_segment}")

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        phi = outer_leaves(phi)
        theta = initial_theta(theta0, phi)
        optimizer = problem.optimizer_for(phi)
        loss_fn = step_loss(problem, phi)
        K = problem.inner_steps
        T = K if self.truncate is None else min(self.truncate, K)
        opt_state = None
        losses = []
        if K - T > 0:
            with torch.no_grad():
                prefix = unroll(loss_fn, optimizer, theta, K - T, check_finite=self.check_finite,
                                stop_gradient=True)
            theta, opt_state, losses = (tree_detach(prefix.theta),
                                        _detach_state(prefix.opt_state), prefix.losses)
        trace = unroll(loss_fn, optimizer, theta, T, opt_state=opt_state, start=K - T,
                       stop_gradient=self.first_order,
                       checkpoint_segment=self.checkpoint_segment,
                       check_finite=self.check_finite)
        outer = problem.outer_value(trace.theta, phi, problem.outer_batch(0))
        grad = collect_grad(outer, phi)
        losses = losses + trace.losses
        return Hypergradient(
            grad=grad,
            theta=tree_detach(trace.theta),
            outer_loss=outer.detach(),
            diagnostics={
                "estimator": "first_order" if self.first_order else "unrolled",
                "inner_steps": K,
                "differentiated_steps": T,
                "final_inner_loss": float(losses[-1]) if losses else float("nan"),
            },
            state=state,
        )


def _detach_state(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _detach_state(v) for k, v in state.items()}
    return state.detach() if isinstance(state, Tensor) else state
