"""The ``executor:`` section of a run config: where an experiment's meta-steps run.

One switch distributes a run; the rest of the config is unchanged::

    executor: {kind: ray, address: auto, num_workers: 2, cpus_per_worker: 1}

Absent (or ``kind: local`` with one worker) the run is the plain in-process one.
``kind: local`` with ``num_workers > 1`` shards in this process (the same numbers as
Ray with as many workers; useful to check a config without a cluster). The section
only says *where* work runs — the results are the same up to float rounding
(bitwise for PES) — so it is not part of a run's identity: ``metaopt resume RUN_DIR
executor.kind=ray`` continues a local run on a cluster.

An experiment that cannot distribute its meta-step refuses a non-default executor
when the config is read (:meth:`~metaopt.runner.experiment.Experiment.check_executor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ExecutorConfig"]


@dataclass
class ExecutorConfig:
    """Settings of :func:`metaopt.distributed.make_executor`, checked when read.

    Attributes:
        kind: ``local`` (this process) or ``ray`` (actors; needs the ``ray`` extra).
        address: ``ray``: ``auto`` (the running cluster, e.g. from ``ray start
            --head``; none is an error), ``host:port`` of a head node, or null (a
            running one if any, else a new Ray in this process).
        num_workers: workers the meta-batch or PES tasks are split over (default:
            1 for ``local``, 2 for ``ray``).
        cpus_per_worker, gpus_per_worker: resources each Ray worker reserves; with
            GPUs the workers compute on their CUDA device.
        max_restarts: how often Ray restarts a dead worker (its share is recomputed).
        timeout_s: the longest wait for any one result before a clear error.
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = "auto"
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_restarts: int = 1
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.num_workers is None:
            self.num_workers = 1 if self.kind == "local" else 2
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.kind == "local" and self.gpus_per_worker > 0:
            raise ValueError("gpus_per_worker needs kind: ray (local workers run in this "
                             "process, on the run's device)")
        if self.address is not None and self.address != "auto" and "://" not in self.address:
            host, sep, port = self.address.rpartition(":")
            if not (sep and host and port.isdigit()):
                raise ValueError(f"address must be 'auto', null or 'host:port', got "
                                 f"{self.address!r}")

    @property
    def is_default(self) -> bool:
        """The plain in-process run (no executor is built)."""
        return self.kind == "local" and self.num_workers == 1

    def options(self) -> dict[str, Any]:
        """The mapping :func:`metaopt.distributed.make_executor` takes."""
        if self.kind == "local":
            return {"kind": "local", "num_workers": self.num_workers}
        return {"kind": "ray", "address": self.address, "num_workers": self.num_workers,
                "cpus_per_worker": self.cpus_per_worker,
                "gpus_per_worker": self.gpus_per_worker,
                "max_restarts": self.max_restarts, "timeout_s": self.timeout_s}
