"""A pool of workers holding PES particles across truncations.

Each worker holds a contiguous range of task slots of the PES
:class:`~metaopt.bilevel.truncation.UnrollState` (both particles of every slot). Per
outer step the driver sends φ and the step's perturbation seed; each worker
regenerates its slots' ``ε_t`` from the seed, runs the truncation
(:func:`~metaopt.bilevel.pes.advance_particles`) and sends back only its
:class:`~metaopt.bilevel.pes.PESLossDiffs`; the driver joins them
(:meth:`PESLossDiffs.cat`) and forms the estimate with :meth:`PES.finish`, which
regenerates every ``ε_t`` and keeps the accumulators ξ. The estimate equals the
in-process :class:`~metaopt.bilevel.pes.PES` exactly (the same rows, the same seeds).

Fault tolerance: the driver keeps a snapshot of each worker's slots (taken at the
start and every ``sync_every`` steps) and the ``(φ, seed)`` of the steps since. A
restarted worker is rebuilt from its snapshot by replaying those steps
(deterministic), then the lost step is re-sent — no step lost or counted twice.

``bytes_per_step`` records the payload of each step: the bytes of φ's tensors and
the 8-byte seed sent to every worker, and of the loss-difference tensors received
(the serializer's framing is not counted); a sync step adds the snapshot's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from metaopt.bilevel.pes import PES, PESLossDiffs, advance_particles
from metaopt.bilevel.problem import Hypergradient
from metaopt.bilevel.truncation import (
    InnerSystem,
    TruncatedState,
    TruncationSchedule,
    UnrollState,
)
from metaopt.distributed.executor import Executor, StatefulFn
from metaopt.distributed.sharding import shard_slices
from metaopt.params import Params
from metaopt.tree import tree_leaves

__all__ = ["PESPool"]

_SEED_BYTES = 8


@dataclass
class _Shard:
    """What a worker holds: its slots' unroll state and how to advance them."""

    system: InnerSystem
    unroll: UnrollState
    tasks: slice
    num_tasks: int
    sigma: float
    length: int
    schedule: TruncationSchedule


def _load(store: dict, shard: _Shard) -> None:
    store.clear()
    store["pes"] = shard


def _advance(store: dict, step: tuple[Params, int]) -> PESLossDiffs:
    phi, seed = step
    sh: _Shard = store["pes"]
    sh.unroll, diffs = advance_particles(sh.system, phi, sh.unroll, seed, sh.sigma,
                                         sh.length, sh.schedule, num_tasks=sh.num_tasks,
                                         tasks=sh.tasks)
    return diffs


def _unroll(store: dict, _: Any) -> UnrollState:
    return store["pes"].unroll


def _nbytes(tree: Any) -> int:
    _, leaves = tree_leaves(tree)
    return sum(v.numel() * v.element_size() for v in leaves if isinstance(v, Tensor))


def _diff_bytes(d: PESLossDiffs) -> int:
    return sum(t.numel() * t.element_size() for t in (d.before, d.after, d.reset, d.mean_loss))


class PESPool:
    """PES with its particles on ``executor``'s workers (see the module docstring).

    Args:
        executor: the workers (slots are split into ``num_workers`` contiguous ranges).
        estimator: the :class:`PES` settings (``num_tasks``, ``truncation``, ``sigma``, ...).
        system: the inner system (picklable: it travels to the workers once).
        phi: φ for the fresh start (ignored when ``state`` is given).
        state: a :class:`TruncatedState` to resume from (e.g. a checkpoint's).
        sync_every: steps between snapshots of the workers' slots on the driver.
    """

    def __init__(self, executor: Executor, estimator: PES, system: InnerSystem,
                 phi: Mapping[str, Tensor], state: TruncatedState | None = None, *,
                 sync_every: int = 10) -> None:
        if not isinstance(estimator, PES):
            raise TypeError(f"estimator must be PES, got {type(estimator).__name__}")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        self.executor = executor
        self.estimator = estimator
        self.system = system
        self.sync_every = sync_every
        self.state = estimator.start(system, dict(phi), state)
        T = estimator.num_tasks
        self.slices = shard_slices(T, executor.num_workers)
        if len(self.slices) != executor.num_workers:
            raise ValueError(f"PES num_tasks={T} is fewer than the executor's "
                             f"{executor.num_workers} workers")
        self.bytes_per_step: list[dict[str, int]] = []
        self._log: list[tuple[Params, int]] = []
        self._snapshots = [self.state.unroll.rows(sl) for sl in self.slices]
        executor.call_each(_load, [self._shard(i) for i in range(len(self.slices))],
                           init=True)

    def _shard(self, i: int) -> _Shard:
        est = self.estimator
        return _Shard(self.system, self._snapshots[i], self.slices[i], est.num_tasks,
                      est.sigma, est.truncation, est.episode_schedule)

    def _recover(self, i: int) -> list[tuple[StatefulFn, Any]]:
        """The calls that rebuild worker ``i``: its snapshot, then the steps since."""
        return [(_load, self._shard(i)), *((_advance, step) for step in self._log)]

    def step(self, phi: Mapping[str, Tensor]) -> Hypergradient:
        """One PES estimate; its ``state`` is also kept as :attr:`state`.

        The state's unroll is the driver's last snapshot (the live slots are on the
        workers); :meth:`checkpoint_state` gathers them.
        """
        plain = {k: v.detach() for k, v in phi.items()}
        seed = self.estimator.perturbation_seed(self.state)
        n = self.executor.num_workers
        parts = self.executor.call_each(_advance, [(plain, seed)] * n, recover=self._recover)
        diffs = PESLossDiffs.cat(parts)
        self._log.append((plain, seed))
        record = {"sent": n * (_nbytes(plain) + _SEED_BYTES),
                  "received": sum(_diff_bytes(d) for d in parts)}
        hg = self.estimator.finish(phi, self.state, self.state.unroll, seed, diffs)
        self.state = hg.state
        if len(self._log) >= self.sync_every:
            record["received"] += self._sync()
        self.bytes_per_step.append(record)
        return replace(hg, state=self.state)

    def _sync(self) -> int:
        self._snapshots = self.executor.call_each(_unroll, [None] * self.executor.num_workers,
                                                  recover=self._recover)
        self._log = []
        self.state = replace(self.state, unroll=UnrollState.cat(self._snapshots))
        return sum(_nbytes(s.inner) for s in self._snapshots)

    def checkpoint_state(self) -> TruncatedState:
        """The full :class:`TruncatedState` (slots gathered from the workers)."""
        if self._log:
            self._sync()
        return self.state
