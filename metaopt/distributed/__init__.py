"""Distributed meta-training: executors (local, Ray), meta-batch sharding, PES pools.

The estimators and algorithms stay distribution-agnostic: they see a task-batch map
(:mod:`metaopt.distributed.sharding`) or a particle pool
(:mod:`metaopt.distributed.pes_pool`), never Ray. Ray is imported lazily.
"""

from metaopt.distributed.executor import (
    Executor,
    LocalExecutor,
    RayExecutor,
    StateLost,
    WorkerError,
    make_executor,
)

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "StateLost", "WorkerError",
           "make_executor"]
