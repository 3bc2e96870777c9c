"""Where shard work runs: in this process (``local``, the default) or on Ray actors.

An :class:`Executor` has ``num_workers`` workers, each holding a private ``store``
(a dict) that lives across calls:

* :meth:`Executor.map` ``(fn, shards)`` runs ``fn(shard)`` for every shard (shard ``i``
  on worker ``i % num_workers``) and returns the results in shard order;
* :meth:`Executor.call_each` ``(fn, args)`` runs ``fn(store_i, args[i])`` on worker
  ``i`` — stateful work such as PES particles that stay on their worker;
* :meth:`Executor.submit_each` / :meth:`Executor.wait_each` split ``call_each`` in two
  so a caller can queue several stateful calls before collecting the first (the PES
  pool's bounded staleness). Calls on one worker run in submission order.

Under Ray the workers are actors created with ``max_restarts`` and no automatic task
retries. When a worker dies (its process killed) or comes back from a restart with
an empty store, :meth:`call_each` asks the caller's ``recover(i)`` for the calls
that rebuild worker ``i``'s store from the driver's copy (a snapshot and a replay
log), runs them on the restarted actor, then re-sends the lost call — so a step is
neither lost nor counted twice. Calls submitted before a rebuild that had not yet
been collected are re-sent once, in order, after it (a rebuilt worker has the state
just before them); if such a call still finds the wrong state it is rebuilt again.
Every wait is bounded by ``timeout_s``: a dead cluster or a hung worker raises a
one-line :class:`WorkerError`, never a hang.

With ``gpus_per_worker > 0`` each actor requests that many GPUs
(:func:`actor_options`); Ray sets its ``CUDA_VISIBLE_DEVICES``, and
:attr:`Executor.worker_device` (``"cuda"``) tells the sharded work where to compute
(inputs move there, results come back on CPU). A cluster with fewer GPUs than
requested is refused at once with a :class:`WorkerError`.

``ray`` is imported only when a :class:`RayExecutor` is made; without it the error
names the ``ray`` extra. :func:`make_executor` builds either from a config dict
``{kind: local | ray, address, num_workers, cpus_per_worker, gpus_per_worker,
max_restarts, timeout_s}``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from metaopt.errors import ConfigError, MetaoptError, MissingExtraError

__all__ = ["Executor", "LocalExecutor", "Pending", "RayExecutor", "StateLost", "WorkerError",
           "actor_options", "make_executor"]

#: ``fn(store, arg) -> result``: a stateful call on one worker.
StatefulFn = Callable[[dict, Any], Any]
#: ``recover(i) -> [(fn, arg), ...]``: the calls that rebuild worker ``i``'s store.
Recover = Callable[[int], Sequence[tuple[StatefulFn, Any]]]


class WorkerError(MetaoptError, RuntimeError):
    """A worker gave no result: timed out, died past its restarts, or the cluster is gone."""


class StateLost(MetaoptError, RuntimeError):
    """A stateful call reached a worker whose store is empty (it was restarted)."""


@dataclass
class Pending:
    """Stateful calls submitted by :meth:`Executor.submit_each`, not yet collected.

    ``handles``: per worker, the result (local) or a Ray object reference;
    ``epochs``: each worker's rebuild count when the call was submitted.
    """

    fn: StatefulFn
    args: list
    init: bool
    handles: list
    epochs: list[int]


class Executor(Protocol):
    """What the sharded algorithms need from an executor (see the module docstring)."""

    num_workers: int
    #: Where the workers compute (``"cuda"`` for GPU workers, None: on CPU).
    worker_device: str | None

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> list[Any]: ...

    def call_each(self, fn: StatefulFn, args: Sequence[Any], *,
                  recover: Recover | None = None, init: bool = False) -> list[Any]: ...

    def submit_each(self, fn: StatefulFn, args: Sequence[Any], *,
                    init: bool = False) -> Pending: ...

    def wait_each(self, pending: Pending, *, recover: Recover | None = None) -> list[Any]: ...

    def shutdown(self) -> None: ...


class _Worker:
    """One worker: a store that lives across calls (a Ray actor's class, or in-process)."""

    def __init__(self) -> None:
        self.store: dict = {}

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> bool:
        return True

    def run(self, fn: Callable[[Any], Any], shard: Any) -> Any:
        return fn(shard)

    def call(self, fn: StatefulFn, arg: Any, init: bool) -> Any:
        if not init and not self.store:
            raise StateLost(f"worker pid {os.getpid()} has no state (it was restarted); "
                            f"the driver must rebuild it")
        return fn(self.store, arg)


def _check_args(args: Sequence[Any], num_workers: int) -> None:
    if len(args) != num_workers:
        raise ValueError(f"call_each needs one argument per worker ({num_workers}), "
                         f"got {len(args)}")


class LocalExecutor:
    """Workers in this process, run one after another (the default; no Ray)."""

    worker_device: str | None = None

    def __init__(self, num_workers: int = 1) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"executor.num_workers must be an int >= 1, got {num_workers!r}")
        self.num_workers = num_workers
        self._workers = [_Worker() for _ in range(num_workers)]

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> list[Any]:
        """``[fn(shard) for shard in shards]``."""
        return [fn(s) for s in shards]

    def call_each(self, fn: StatefulFn, args: Sequence[Any], *,
                  recover: Recover | None = None, init: bool = False) -> list[Any]:
        """``fn(store_i, args[i])`` on every worker ``i``, in order."""
        _check_args(args, self.num_workers)
        return [w.call(fn, a, init) for w, a in zip(self._workers, args)]

    def submit_each(self, fn: StatefulFn, args: Sequence[Any], *,
                    init: bool = False) -> Pending:
        """Run the calls now (in-process there is nothing to overlap); collect later."""
        return Pending(fn, list(args), init, self.call_each(fn, args, init=init),
                       [0] * self.num_workers)

    def wait_each(self, pending: Pending, *, recover: Recover | None = None) -> list[Any]:
        """The results of :meth:`submit_each`."""
        return list(pending.handles)

    def shutdown(self) -> None:
        self._workers = [_Worker() for _ in range(self.num_workers)]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError("ray", "ray", "the ray executor") from e
    return ray


def _probe(address: str | None, timeout_s: float) -> None:
    """Refuse an explicit ``host:port`` that does not accept a TCP connection.

    ``ray.init`` keeps retrying an unreachable head for minutes; this bounds it.
    """
    if address is None or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"executor.address must be 'auto', None or 'host:port', "
                          f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)).close()
    except OSError as e:
        raise WorkerError(f"executor.address {address!r}: no Ray head reachable ({e})") from e


def actor_options(cpus_per_worker: float, gpus_per_worker: float,
                  max_restarts: int) -> dict[str, Any]:
    """The options of each worker actor (``ray.remote(**options)``).

    No automatic task retries: a lost stateful call is re-sent by the executor after
    the worker is rebuilt (a blind retry would run it on an empty store).
    """
    if cpus_per_worker < 0 or gpus_per_worker < 0:
        raise ConfigError("executor.cpus_per_worker and gpus_per_worker must be >= 0")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"executor.max_restarts must be an int >= 0, got {max_restarts!r}")
    return {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker,
            "max_restarts": max_restarts, "max_task_retries": 0}


def _check_gpus(cluster: Mapping[str, float], num_workers: int,
                gpus_per_worker: float) -> None:
    """Refuse GPU workers on a cluster without enough GPUs (they would never start)."""
    if gpus_per_worker <= 0:
        return
    have = float(cluster.get("GPU", 0))
    need = num_workers * gpus_per_worker
    if have < need:
        raise WorkerError(f"executor.gpus_per_worker={gpus_per_worker}: {num_workers} "
                          f"workers need {need:g} GPUs, the Ray cluster has {have:g}")


class RayExecutor:
    """Workers as Ray actors (see the module docstring for restarts and timeouts).

    Args:
        address: ``"auto"`` (a running cluster), ``"host:port"``, or None (start a
            local one). Ignored when this process already called ``ray.init``.
        num_workers: actors to start.
        cpus_per_worker, gpus_per_worker: resources each actor reserves (Ray sets
            ``CUDA_VISIBLE_DEVICES`` in a GPU worker; :attr:`worker_device` is then
            ``"cuda"`` and sharded work moves its tensors there, see
            :func:`~metaopt.distributed.sharding.sharded_task_batch`).
        max_restarts: how often Ray restarts a dead actor.
        timeout_s: the longest wait for any one result.
    """

    def __init__(self, address: str | None = "auto", num_workers: int = 2,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 max_restarts: int = 1, timeout_s: float = 120.0) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"executor.num_workers must be an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ConfigError(f"executor.timeout_s must be > 0, got {timeout_s!r}")
        options = actor_options(cpus_per_worker, gpus_per_worker, max_restarts)
        ray = _import_ray()
        self._ray = ray
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.max_restarts = int(max_restarts)
        self.worker_device = "cuda" if gpus_per_worker > 0 else None
        #: Indices of the workers rebuilt after a restart, in order (for reports/tests).
        self.rebuilds: list[int] = []
        self._epochs = [0] * num_workers
        if not ray.is_initialized():
            _probe(address, self.timeout_s)
            try:
                ray.init(address=address, include_dashboard=False)
            except ConnectionError as e:
                raise WorkerError(f"executor.address {address!r}: no Ray cluster "
                                  f"reachable ({e}); start one (`ray start --head`) or "
                                  f"set executor.address: null for one in this process"
                                  ) from e
        _check_gpus(ray.cluster_resources(), num_workers, gpus_per_worker)
        actor = ray.remote(**options)(_Worker)
        self._actors = [actor.remote() for _ in range(num_workers)]
        self._get([a.ping.remote() for a in self._actors], "start")

    # -- waiting ------------------------------------------------------------------
    def _get(self, refs: list, what: str) -> list:
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise WorkerError(f"ray executor: no result for '{what}' within "
                              f"timeout_s={self.timeout_s}") from e

    def pids(self) -> list[int]:
        """Each worker's process id (tests kill one to check recovery)."""
        return self._get([a.pid.remote() for a in self._actors], "pid")

    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> list[Any]:
        """``fn(shard)`` on worker ``i % num_workers``; results in shard order.

        A shard whose worker died is re-sent once to the restarted worker (``fn`` is
        pure, so running it again gives the same result).
        """
        refs = [self._actors[i % self.num_workers].run.remote(fn, s)
                for i, s in enumerate(shards)]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(self._get([ref], f"map shard {i}")[0])
            except self._ray.exceptions.RayActorError:
                actor = self._actors[i % self.num_workers]
                out.append(self._retry(lambda a=actor, s=shards[i]: a.run.remote(fn, s),
                                       f"map shard {i}"))
        return out

    def _retry(self, submit: Callable[[], Any], what: str) -> Any:
        """Re-submit after a restart, within the timeout (raises past ``max_restarts``)."""
        deadline = time.monotonic() + self.timeout_s
        deaths = 0
        while True:
            try:
                return self._get([submit()], what)[0]
            except self._ray.exceptions.ActorDiedError as e:
                # A call submitted while Ray still records the old death also fails;
                # a second one in a row means the restarts are used up.
                deaths += 1
                if deaths > 1:
                    raise WorkerError(f"ray executor: worker for '{what}' died and has no "
                                      f"restarts left (max_restarts={self.max_restarts})"
                                      ) from e
                time.sleep(0.5)
            except self._ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise WorkerError(f"ray executor: worker for '{what}' stayed "
                                      f"unavailable for timeout_s={self.timeout_s}") from None
                time.sleep(0.2)

    def call_each(self, fn: StatefulFn, args: Sequence[Any], *,
                  recover: Recover | None = None, init: bool = False) -> list[Any]:
        """``fn(store_i, args[i])`` on every worker; rebuilds a restarted worker first."""
        return self.wait_each(self.submit_each(fn, args, init=init), recover=recover)

    def submit_each(self, fn: StatefulFn, args: Sequence[Any], *,
                    init: bool = False) -> Pending:
        """Queue ``fn(store_i, args[i])`` on every worker; collect with :meth:`wait_each`."""
        _check_args(args, self.num_workers)
        refs = [a.call.remote(fn, x, init) for a, x in zip(self._actors, args)]
        return Pending(fn, list(args), init, refs, list(self._epochs))

    def wait_each(self, pending: Pending, *, recover: Recover | None = None) -> list[Any]:
        """The results of :meth:`submit_each`, rebuilding (or re-sending to) lost workers.

        ``recover(i)`` must give the calls that bring worker ``i``'s store to the state
        just before this call (see the module docstring).
        """
        lost = (self._ray.exceptions.RayActorError, StateLost)
        fn, init = pending.fn, pending.init
        out = []
        for i, ref in enumerate(pending.handles):
            arg = pending.args[i]
            try:
                out.append(self._get([ref], f"call on worker {i}")[0])
                continue
            except lost:
                if recover is None and not init:
                    raise WorkerError(f"ray executor: worker {i} lost its state and no "
                                      f"recover() was given") from None
            if self._epochs[i] > pending.epochs[i]:
                # Rebuilt after this call was queued: it holds the state just before it.
                actor = self._actors[i]
                try:
                    out.append(self._retry(lambda a=actor, x=arg: a.call.remote(fn, x, init),
                                           f"re-send to worker {i}"))
                    # Calls queued since reached the worker before this re-send: they
                    # are re-sent in turn (not rebuilt) when collected.
                    self._epochs[i] += 1
                    continue
                except lost:
                    pass
            out.append(self._rebuild(i, fn, arg, init, recover))
        return out

    def _rebuild(self, i: int, fn: StatefulFn, arg: Any, init: bool,
                 recover: Recover | None) -> Any:
        actor = self._actors[i]
        what = f"rebuild worker {i}"
        self.rebuilds.append(i)
        self._epochs[i] += 1
        for step, (rfn, rarg) in enumerate(recover(i) if recover is not None else []):
            self._retry(lambda f=rfn, x=rarg, first=step == 0: actor.call.remote(f, x, first),
                        what)
        return self._retry(lambda: actor.call.remote(fn, arg, init), what)

    def shutdown(self) -> None:
        """Kill the actors (the Ray session stays up)."""
        for a in self._actors:
            self._ray.kill(a, no_restart=True)
        self._actors = []


#: The keys a ``kind: ray`` executor config may have.
RAY_KEYS = frozenset({"address", "num_workers", "cpus_per_worker", "gpus_per_worker",
                      "max_restarts", "timeout_s"})


def make_executor(config: Mapping[str, Any] | None) -> Executor:
    """An executor from ``{kind: local | ray, ...}`` (None or ``{}``: local, 1 worker)."""
    config = dict(config or {})
    kind = config.pop("kind", "local")
    if kind == "local":
        unknown = sorted(set(config) - {"num_workers"})
        if unknown:
            raise ConfigError(f"executor (kind local) got unknown keys {unknown}")
        return LocalExecutor(int(config.get("num_workers", 1)))
    if kind == "ray":
        known = RAY_KEYS
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"executor (kind ray) got unknown keys {unknown}")
        return RayExecutor(**config)
    raise ConfigError(f"executor.kind must be 'local' or 'ray', got {kind!r}")
