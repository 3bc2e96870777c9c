"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021).

Truncated ES ignores that the state a truncation starts from was shaped by φ in all
earlier truncations, so its estimate of the episode's gradient is biased. PES keeps,
per task, the sum ``ξ_t`` of every perturbation the task's particles have run with
since the episode began, evolves the ``+`` and ``−`` particles' inner states
separately across truncations, and weights each truncation's loss difference by
``ξ_t`` instead of the fresh ``ε_t``::

    ξ_t ← ξ_t + ε_t ;   ĝ = mean_t (L⁺_t − L⁻_t) ξ_t / (2σ²)

Summed over the truncations of an episode this is an unbiased estimate of the
gradient of the Gaussian-smoothed episode objective. At an episode end ξ is reset: a
loss after a reset depends only on the perturbation the particles have used since, so
the loss difference of the steps after a reset is weighted by ``ε_t`` alone and ξ
restarts from it (here exactly, step by step; learned_optimization approximates this
split by the fraction of steps before the reset).

The estimate is split into three pure parts so the particles can live elsewhere (a
Ray actor pool holds the unroll states; only seeds and loss differences travel):

1. :meth:`PES.perturbation_seed` — one integer per outer step (driver);
2. :func:`advance_particles` — regenerate the ``ε_t`` of the slots it holds from the
   seed, run the truncation for both particles, return :class:`PESLossDiffs` (worker);
3. :func:`combine` — regenerate every ``ε_t``, update ξ, form ĝ (driver).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.bilevel.truncation import (
    InnerSystem,
    TruncatedEstimator,
    TruncatedState,
    TruncationSchedule,
    UnrollState,
    advance,
    antithetic_rows,
    detach_state,
    per_task_sums,
    perturbations,
)
from metaopt.params import Params

__all__ = ["PES", "PESLossDiffs", "advance_particles", "combine", "particle_perturbations"]


@dataclass
class PESLossDiffs:
    """What a truncation of PES particles reports (per task ``t``; all ``[T]``).

    ``before``/``after``: ``L⁺ − L⁻`` summed over the truncation's steps before / after
    the task's first reset in it (divided by the truncation length); ``reset``: whether
    the task was reset; ``mean_loss``: the mean of both particles' losses per task.
    """

    before: Tensor
    after: Tensor
    reset: Tensor
    mean_loss: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[PESLossDiffs]) -> PESLossDiffs:
        """Join reports of consecutive task slices (a sharded pool)."""
        return PESLossDiffs(
            before=torch.cat([p.before for p in parts]),
            after=torch.cat([p.after for p in parts]),
            reset=torch.cat([p.reset for p in parts]),
            mean_loss=torch.cat([p.mean_loss for p in parts]),
            diagnostics={k: sum(p.diagnostics.get(k, 0) for p in parts)
                         for k in ("resets", "nonfinite_resets")})


def particle_perturbations(phi: Mapping[str, Tensor], seed: int, sigma: float,
                           num_tasks: int, tasks: slice = slice(None)) -> Params:
    """The ``ε_t`` of slots ``tasks`` out of ``num_tasks`` for the seed of an outer step."""
    return {k: v[tasks] for k, v in perturbations(phi, seed, sigma, num_tasks).items()}


def advance_particles(system: InnerSystem, phi: Mapping[str, Tensor], unroll: UnrollState,
                      seed: int, sigma: float, length: int, schedule: TruncationSchedule,
                      *, num_tasks: int | None = None, tasks: slice = slice(None),
                      segment_objective: str = "mean") -> tuple[UnrollState, PESLossDiffs]:
    """Run one truncation of the ``±ε`` particles of every task in ``unroll``.

    ``unroll`` holds slots ``tasks`` of ``num_tasks`` (default: all of them); ``seed``
    regenerates their perturbations, so the result needs only φ and the seed and any
    process holding ``unroll`` can compute it. ``segment_objective``: see
    :func:`~metaopt.bilevel.truncation.per_task_sums`.
    """
    if unroll.copies != 2:
        raise ValueError(f"PES particles need 2 copies per task, the state has "
                         f"{unroll.copies}")
    num_tasks = unroll.num_tasks if num_tasks is None else num_tasks
    perts = particle_perturbations(phi, seed, sigma, num_tasks, tasks)
    if next(iter(perts.values())).shape[0] != unroll.num_tasks:
        raise ValueError(f"slots {tasks} of {num_tasks} do not match the "
                         f"{unroll.num_tasks} tasks the state holds")
    with torch.no_grad():
        unroll, record = advance(system, antithetic_rows(phi, perts), unroll, length,
                                 schedule)
    before, after = per_task_sums(record, 2, length, segment_objective)
    diffs = PESLossDiffs(before=before[0] - before[1], after=after[0] - after[1],
                         reset=record.reset, mean_loss=(before + after).mean(0),
                         diagnostics=dict(record.diagnostics))
    return detach_state(unroll), diffs


def combine(phi: Mapping[str, Tensor], accumulator: Params | None, seed: int,
            diffs: PESLossDiffs, sigma: float) -> tuple[Params, Params]:
    """The PES estimate and the new accumulators from a truncation's loss differences.

    ``accumulator`` (leaves ``[T, ...]``; None = zeros, a fresh start) is ξ before this
    truncation; ``seed`` is the outer step's perturbation seed. Returns
    ``(grad, new_accumulator)``.
    """
    T = int(diffs.before.numel())
    perts = perturbations(phi, seed, sigma, T)
    if accumulator is None:
        accumulator = {k: torch.zeros_like(v) for k, v in perts.items()}
    grad, new_acc = {}, {}
    for k, eps in perts.items():
        shape = (T, *([1] * (eps.dim() - 1)))
        xi = accumulator[k] + eps
        before = diffs.before.reshape(shape).to(eps.dtype)
        after = diffs.after.reshape(shape).to(eps.dtype)
        grad[k] = (before * xi + after * eps).mean(0) / (2 * sigma ** 2)
        new_acc[k] = torch.where(diffs.reset.reshape(shape), eps, xi)
    return grad, new_acc


@dataclass(frozen=True)
class PES(TruncatedEstimator):
    """Persistent ES over truncations (see the module docstring).

    The μLO/learned_optimization defaults: ``PES(num_tasks=8, truncation=50,
    sigma=0.01, schedule=LogUniformLength(100, 1000))``.
    """

    sigma: float = 0.01
    copies: int = field(default=2, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")

    def start(self, system: InnerSystem, phi: Mapping[str, Tensor],
              state: TruncatedState | None) -> TruncatedState:
        """``state``, or fresh tasks with zero accumulators when it is None."""
        st = super().start(system, phi, state)
        if st.accumulator is None:
            st = TruncatedState(unroll=st.unroll, calls=st.calls, accumulator={
                k: torch.zeros((self.num_tasks, *v.shape), dtype=v.dtype, device=v.device)
                for k, v in phi.items()})
        return st

    def __call__(self, problem: InnerSystem | BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta | None = None, state: Any = None) -> Hypergradient:
        system = self.system_for(problem, theta0)
        st = self.start(system, phi, state)
        seed = self.perturbation_seed(st)
        unroll, diffs = advance_particles(system, phi, st.unroll, seed, self.sigma,
                                          self.truncation, self.episode_schedule,
                                          segment_objective=self.segment_objective)
        return self.finish(phi, st, unroll, seed, diffs)

    def finish(self, phi: Mapping[str, Tensor], st: TruncatedState, unroll: UnrollState,
               seed: int, diffs: PESLossDiffs) -> Hypergradient:
        """The :class:`Hypergradient` of a truncation whose particles ran elsewhere."""
        grad, acc = combine(phi, st.accumulator, seed, diffs, self.sigma)
        new_state = TruncatedState(unroll=unroll, calls=st.calls + 1, accumulator=acc)
        diagnostics = dict(diffs.diagnostics,
                           delta_loss_abs=float((diffs.before + diffs.after).abs().mean()))
        return Hypergradient(grad=grad, theta={}, outer_loss=diffs.mean_loss.mean(),
                             diagnostics=diagnostics, state=new_state)
