"""Truncated backpropagation through time over carried unroll states.

Each call advances every task by ``truncation`` steps from where the last call left
it and differentiates the mean step loss of those steps (or another
``segment_objective``) with respect to φ through them only; the state crossing into
the next call is detached (the truncation). With a truncation that covers the whole
episode it is exactly full backpropagation (:class:`~metaopt.bilevel.Unrolled`);
shorter truncations are biased toward greedy behaviour (the short-horizon bias, Wu et
al. 2018) — the reason for PES.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import collect_grad, outer_leaves
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.bilevel.truncation import (
    InnerSystem,
    TruncatedEstimator,
    TruncatedState,
    advance,
    detach_state,
    per_task_sums,
    rows_of,
)

__all__ = ["TruncatedBPTT"]


@dataclass(frozen=True)
class TruncatedBPTT(TruncatedEstimator):
    """Reverse-mode meta-gradient of each truncation's mean loss (see the module doc).

    A task whose loss turns non-finite contributes nothing to this estimate (its rows'
    gradients are zeroed before they are summed into dφ) and is reset.
    """

    def __call__(self, problem: InnerSystem | BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta | None = None, state: Any = None) -> Hypergradient:
        system = self.system_for(problem, theta0)
        st = self.start(system, phi, state)
        phi_l = outer_leaves(phi)
        T = st.unroll.num_tasks
        rows = rows_of(phi_l, T)
        keep = torch.ones(T, dtype=torch.bool)

        def mask_rows(grad: Tensor) -> Tensor:
            m = keep.reshape(-1, *([1] * (grad.dim() - 1)))
            return torch.where(m, grad, torch.zeros((), dtype=grad.dtype))

        for v in rows.values():
            if v.requires_grad:
                v.register_hook(mask_rows)
        with torch.enable_grad():
            unroll, record = advance(system, rows, st.unroll, self.truncation,
                                     self.episode_schedule)
            keep.copy_(record.nonfinite == 0)
            before, after = per_task_sums(record, 1, self.truncation, self.segment_objective)
            objective = (before + after).sum() / T
            grad = collect_grad(objective, phi_l)
        new_state = TruncatedState(unroll=detach_state(unroll), calls=st.calls + 1)
        return Hypergradient(grad=grad, theta={}, outer_loss=objective.detach(),
                             diagnostics=dict(record.diagnostics), state=new_state)
