"""Antithetic evolution strategies: the meta-gradient from loss differences alone.

For each task ``t`` a perturbation ``ε_t ~ N(0, σ²I)`` is drawn and the task is run
with ``φ + ε_t`` and ``φ − ε_t``; the estimate is ``mean_t (L⁺_t − L⁻_t) ε_t / (2σ²)``,
the gradient of the Gaussian-smoothed objective ``E[L(φ + ε)]``. Nothing is
differentiated, so the inner problem may be chaotic, non-differentiable or long.

* ``full_episode=True``: every call starts fresh tasks and runs the whole episode (the
  schedule must be :class:`~metaopt.bilevel.truncation.ConstantLength`, of which
  ``truncation`` is then ignored): unbiased for the smoothed episode objective.
* default (truncated ES): each call advances the carried tasks ``truncation`` steps
  from the positive particle's state (both particles restart from it), which ignores
  how earlier truncations' φ shaped the state: biased, low variance (see PES).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.bilevel.truncation import (
    ConstantLength,
    InnerSystem,
    TruncatedEstimator,
    TruncatedState,
    advance,
    antithetic_rows,
    detach_state,
    init_unroll,
    per_task_sums,
    perturbations,
)
from metaopt.tree import tree_leaves, tree_rebuild

__all__ = ["ES"]


@dataclass(frozen=True)
class ES(TruncatedEstimator):
    """Antithetic ES (see the module docstring); ``sigma`` is the perturbation scale."""

    sigma: float = 0.01
    full_episode: bool = False
    copies: int = field(default=2, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if self.full_episode and not isinstance(self.episode_schedule, ConstantLength):
            raise ValueError("full_episode ES needs a ConstantLength schedule (one length "
                             "for every task)")

    def __call__(self, problem: InnerSystem | BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta | None = None, state: Any = None) -> Hypergradient:
        system = self.system_for(problem, theta0)
        st = self.start(system, phi, state)
        T = self.num_tasks
        unroll, length = st.unroll, self.truncation
        if self.full_episode:
            length = self.episode_schedule.max_length
            unroll = init_unroll(system, phi, num_tasks=T, schedule=self.episode_schedule,
                                 seed=int(st.unroll.base_seed) + 7919 * (st.calls + 1),
                                 copies=2, stagger=False)
        else:  # both particles continue from the positive one's state
            unroll = replace(unroll, inner=_positive_copy_twice(unroll.inner, T))
        perts = perturbations(phi, self.perturbation_seed(st), self.sigma, T)
        with torch.no_grad():
            unroll, record = advance(system, antithetic_rows(phi, perts), unroll, length,
                                     self.episode_schedule)
        before, after = per_task_sums(record, 2, length, self.segment_objective)
        total = before + after
        delta = total[0] - total[1]
        grad = {k: (delta.reshape(-1, *([1] * (v.dim() - 1))) * v).mean(0)
                / (2 * self.sigma ** 2) for k, v in perts.items()}
        diagnostics = dict(record.diagnostics, delta_loss_abs=float(delta.abs().mean()))
        new_state = TruncatedState(unroll=detach_state(unroll), calls=st.calls + 1)
        return Hypergradient(grad=grad, theta={}, outer_loss=total.mean(),
                             diagnostics=diagnostics, state=new_state)


def _positive_copy_twice(inner: Any, T: int) -> Any:
    """The state with its positive rows (``[0, T)``) in both copies' places."""
    _, leaves = tree_leaves(inner)
    return tree_rebuild(inner, [torch.cat([v[:T], v[:T]]) for v in leaves])
