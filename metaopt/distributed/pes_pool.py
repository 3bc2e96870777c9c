"""A pool of workers holding PES particles across truncations, with bounded staleness.

Each worker holds a contiguous range of task slots of the PES
:class:`~metaopt.bilevel.truncation.UnrollState` (both particles of every slot). Per
truncation the driver sends φ, the truncation's perturbation seed and its index;
each worker regenerates its slots' ``ε_t`` from the seed, runs the truncation
(:func:`~metaopt.bilevel.pes.advance_particles`) and sends back only its
:class:`~metaopt.bilevel.pes.PESLossDiffs`; the driver joins them
(:meth:`PESLossDiffs.cat`) and forms the estimate with :meth:`PES.finish`, which
regenerates every ``ε_t`` and keeps the accumulators ξ. With ``max_staleness=0`` the
estimate equals the in-process :class:`~metaopt.bilevel.pes.PES` exactly (the same
rows, the same seeds).

Bounded staleness (``max_staleness = s``): truncation ``k`` runs with
``φ_{max(0, k−s)}``, the meta-parameters after ``k − s`` outer updates. Call ``k`` of
:meth:`PESPool.step` receives ``φ_k``; it queues truncation ``k + s`` with it (at the
first call: truncations ``0…s``, all with ``φ_0``) *before* collecting truncation
``k``'s loss differences — so a worker starts the next truncation as soon as it has
finished the current one, while the driver forms the estimate, updates φ and sends
the next φ. The estimate of truncation ``k`` is a PES estimate at ``φ_{k−s}``, applied
to ``φ_k`` (a delayed gradient). The schedule is fixed by ``s`` alone, never by
timing: results are a function of the seeds (tested against an in-process reference
of the same schedule).

Fault tolerance: the driver keeps a snapshot of each worker's slots (taken at the
start and every ``sync_every`` truncations) and the ``(φ, seed, index)`` of the
truncations queued since. A restarted worker is rebuilt from its snapshot by
replaying the truncations before the lost one (deterministic), then the lost one is
re-sent; later queued truncations are re-sent in order. Each worker counts the
truncations it has applied and refuses one out of order
(:class:`~metaopt.distributed.executor.StateLost`, nothing changed), so a call that
reached a restarted worker early can neither be lost nor counted twice. A snapshot
first collects every queued truncation (a short pipeline bubble).

Checkpoints: with ``s > 0`` the workers are ``s`` truncations ahead of the estimates
made. :meth:`PESPool.checkpoint_state` returns the :class:`TruncatedState` whose
``unroll`` is the slots *after every queued truncation* and :meth:`PESPool.pending`
the seeds and loss differences of those queued truncations (already computed; they
are tensors only, :func:`pending_state_dict`); a pool built from both continues
exactly as the uninterrupted one. With ``s = 0`` nothing is pending and the state is
the in-process PES's.

``bytes_per_step`` records the payload of each outer step: the bytes of φ's tensors,
the 8-byte seed and the 8-byte index sent to every worker for each truncation queued
in that step, and of the loss-difference tensors received (the serializer's framing
is not counted); a snapshot adds its bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel.pes import PES, PESLossDiffs, advance_particles
from metaopt.bilevel.problem import Hypergradient
from metaopt.bilevel.truncation import (
    InnerSystem,
    TruncatedState,
    TruncationSchedule,
    UnrollState,
)
from metaopt.distributed.executor import Executor, Pending, StatefulFn, StateLost
from metaopt.distributed.sharding import shard_slices
from metaopt.params import Params
from metaopt.tree import tree_leaves

__all__ = ["PESPool", "pending_from_state_dict", "pending_state_dict"]

_SEED_BYTES = 8
_INDEX_BYTES = 8

#: One queued truncation's result once collected: its seed and joined loss differences.
PendingDiffs = tuple[int, PESLossDiffs]


@dataclass
class _Shard:
    """What a worker holds: its slots' unroll state and how to advance them."""

    system: InnerSystem
    unroll: UnrollState
    start: int  # the index of the next truncation to apply to ``unroll``
    tasks: slice
    num_tasks: int
    sigma: float
    length: int
    schedule: TruncationSchedule
    segment_objective: str = "mean"


@dataclass(frozen=True)
class _Step:
    """One truncation as sent to the workers."""

    phi: Params
    seed: int
    index: int


@dataclass
class _Flight:
    """A queued truncation: its step, the executor's handle, the joined result."""

    step: _Step
    pending: Pending | None
    diffs: PESLossDiffs | None = None
    received: int = 0


def _load(store: dict, shard: _Shard) -> None:
    store.clear()
    store["pes"] = shard
    store["next"] = shard.start


def _advance(store: dict, step: _Step) -> PESLossDiffs:
    if step.index != store["next"]:
        raise StateLost(f"PES worker holds the slots before truncation {store['next']}, "
                        f"got truncation {step.index}")
    sh: _Shard = store["pes"]
    sh.unroll, diffs = advance_particles(sh.system, step.phi, sh.unroll, step.seed, sh.sigma,
                                         sh.length, sh.schedule, num_tasks=sh.num_tasks,
                                         tasks=sh.tasks,
                                         segment_objective=sh.segment_objective)
    store["next"] += 1
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
        state: a :class:`TruncatedState` to resume from (a checkpoint's:
            :meth:`checkpoint_state`).
        pending: the queued truncations of that checkpoint (:meth:`pending`; empty
            for ``max_staleness=0`` or a fresh start).
        sync_every: truncations between snapshots of the workers' slots on the driver.
        max_staleness: ``s``: truncation ``k`` runs with ``φ_{max(0, k−s)}``.
    """

    def __init__(self, executor: Executor, estimator: PES, system: InnerSystem,
                 phi: Mapping[str, Tensor], state: TruncatedState | None = None, *,
                 pending: Sequence[PendingDiffs] = (), sync_every: int = 10,
                 max_staleness: int = 0) -> None:
        if not isinstance(estimator, PES):
            raise TypeError(f"estimator must be PES, got {type(estimator).__name__}")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
        if pending and state is None:
            raise ValueError("pending truncations need the state they were queued from")
        self.executor = executor
        self.estimator = estimator
        self.system = system
        self.sync_every = sync_every
        self.max_staleness = max_staleness
        self.state = estimator.start(system, dict(phi), state)
        T = estimator.num_tasks
        self.slices = shard_slices(T, executor.num_workers)
        if len(self.slices) != executor.num_workers:
            raise ValueError(f"PES num_tasks={T} is fewer than the executor's "
                             f"{executor.num_workers} workers")
        self.bytes_per_step: list[dict[str, int]] = []
        self._flights: deque[_Flight] = deque(
            _Flight(_Step({}, int(seed), self.state.calls + j), None, diffs)
            for j, (seed, diffs) in enumerate(pending))
        self._next = self.state.calls + len(self._flights)  # the next truncation to queue
        self._log: list[_Step] = []
        self._snapshots = [self.state.unroll.rows(sl) for sl in self.slices]
        self._snapshot_at = self._next
        executor.call_each(_load, [self._shard(i) for i in range(len(self.slices))],
                           init=True)

    def _shard(self, i: int) -> _Shard:
        est = self.estimator
        return _Shard(self.system, self._snapshots[i], self._snapshot_at, self.slices[i],
                      est.num_tasks, est.sigma, est.truncation, est.episode_schedule,
                      est.segment_objective)

    def _recover(self, i: int, upto: int) -> list[tuple[StatefulFn, Any]]:
        """The calls that rebuild worker ``i`` up to truncation ``upto`` (excluded)."""
        return [(_load, self._shard(i)),
                *((_advance, step) for step in self._log if step.index < upto)]

    def _queue(self, phi: Params) -> int:
        """Queue the next truncation with ``phi``; the bytes sent."""
        step = _Step(phi, self.estimator.perturbation_seed(replace(self.state, calls=self._next)),
                     self._next)
        n = self.executor.num_workers
        self._flights.append(_Flight(step, self.executor.submit_each(_advance, [step] * n)))
        self._log.append(step)
        self._next += 1
        return n * (_nbytes(phi) + _SEED_BYTES + _INDEX_BYTES)

    def _collect(self, flight: _Flight) -> PESLossDiffs:
        if flight.diffs is None:
            parts = self.executor.wait_each(
                flight.pending, recover=lambda i, k=flight.step.index: self._recover(i, k))
            flight.diffs = PESLossDiffs.cat(parts)
            flight.received = sum(_diff_bytes(d) for d in parts)
            flight.pending = None
        return flight.diffs

    def step(self, phi: Mapping[str, Tensor]) -> Hypergradient:
        """The estimate of truncation ``k = state.calls`` (which ran with ``φ_{k−s}``).

        ``phi`` is the current ``φ_k``; truncations up to ``k + s`` are queued with it
        first. The returned (and kept, :attr:`state`) state's unroll is the driver's
        last snapshot (the live slots are on the workers); :meth:`checkpoint_state`
        gathers them.
        """
        plain = {k: v.detach() for k, v in phi.items()}
        k = self.state.calls
        sent = 0
        while self._next <= k + self.max_staleness:
            sent += self._queue(plain)
        flight = self._flights.popleft()
        diffs = self._collect(flight)
        record = {"sent": sent, "received": flight.received}
        hg = self.estimator.finish(phi, self.state, self.state.unroll, flight.step.seed, diffs)
        self.state = hg.state
        if len(self._log) >= self.sync_every:
            record["received"] += self._sync()
        self.bytes_per_step.append(record)
        return replace(hg, state=self.state)

    def _sync(self) -> int:
        """Collect every queued truncation, then snapshot the workers' slots."""
        for flight in self._flights:
            self._collect(flight)
        self._snapshots = self.executor.call_each(
            _unroll, [None] * self.executor.num_workers,
            recover=lambda i: self._recover(i, self._next))
        self._log = []
        self._snapshot_at = self._next
        self.state = replace(self.state, unroll=UnrollState.cat(self._snapshots))
        return sum(_nbytes(s.inner) for s in self._snapshots)

    def checkpoint_state(self) -> TruncatedState:
        """The full :class:`TruncatedState`, slots gathered from the workers.

        Its ``unroll`` is after every queued truncation (``calls + len(pending())``);
        with ``max_staleness > 0`` resume needs :meth:`pending` too.
        """
        if self._log:
            self._sync()
        return self.state

    def pending(self) -> list[PendingDiffs]:
        """The seeds and loss differences of the queued truncations (collected now)."""
        return [(f.step.seed, self._collect(f)) for f in self._flights]


def pending_state_dict(pending: Sequence[PendingDiffs], max_staleness: int,
                       num_tasks: int) -> dict[str, Any]:
    """``pending`` as tensors of a fixed shape (``[max_staleness, num_tasks]``) + JSON.

    The structure depends only on ``max_staleness`` and ``num_tasks`` (so a checkpoint
    matches a freshly built experiment); ``count`` says how many rows are used. Loss
    differences are stored in float64 (exact for float32) with their dtype's name.
    """
    if len(pending) > max_staleness:
        raise ValueError(f"{len(pending)} pending truncations exceed max_staleness="
                         f"{max_staleness}")
    s, T = max_staleness, num_tasks
    out: dict[str, Any] = {
        "count": len(pending), "dtype": "float32",
        "seed": torch.zeros(s, dtype=torch.int64),
        "before": torch.zeros(s, T, dtype=torch.float64),
        "after": torch.zeros(s, T, dtype=torch.float64),
        "mean_loss": torch.zeros(s, T, dtype=torch.float64),
        "reset": torch.zeros(s, T, dtype=torch.bool),
        "resets": torch.zeros(s, dtype=torch.int64),
        "nonfinite_resets": torch.zeros(s, dtype=torch.int64)}
    for j, (seed, d) in enumerate(pending):
        out["dtype"] = str(d.before.dtype).removeprefix("torch.")
        out["seed"][j] = seed
        for key in ("before", "after", "mean_loss", "reset"):
            out[key][j] = getattr(d, key)
        for key in ("resets", "nonfinite_resets"):
            out[key][j] = int(d.diagnostics.get(key, 0))
    return out


def pending_from_state_dict(d: Mapping[str, Any]) -> list[PendingDiffs]:
    """The inverse of :func:`pending_state_dict` (bit-exact)."""
    dtype = getattr(torch, str(d["dtype"]))
    return [(int(d["seed"][j]),
             PESLossDiffs(before=d["before"][j].to(dtype), after=d["after"][j].to(dtype),
                          reset=d["reset"][j].clone(), mean_loss=d["mean_loss"][j].to(dtype),
                          diagnostics={"resets": int(d["resets"][j]),
                                       "nonfinite_resets": int(d["nonfinite_resets"][j])}))
            for j in range(int(d["count"]))]
