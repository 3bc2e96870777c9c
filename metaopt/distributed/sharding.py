"""Meta-batch sharding: slices of a task batch on workers, merged on the driver.

The gradient of a mean over ``N`` tasks is the ``n_i / N``-weighted sum of the mean
gradients of disjoint slices (:func:`metaopt.bilevel.task_batch.merge_results`), so
splitting a meta-batch into contiguous slices, running each with
:func:`~metaopt.bilevel.task_batch.run_tasks` on a worker and merging the results in
order gives the single-process meta-gradient up to float rounding (one extra
rounding per slice weight: exact to ~1e-15 relative in float64).

The work shipped to a worker is a :class:`SliceJob`: the task function, φ (detached,
with its ``requires_grad`` flags) and the slice's tensors. The task function must be
picklable by Ray's serializer — :class:`LearnerTaskFn` wraps a factory of a
:class:`~metaopt.algorithms.base.MetaLearner` and its loss function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.bilevel.task_batch import TaskBatchResult, TaskFn, merge_results, run_tasks
from metaopt.distributed.executor import Executor
from metaopt.params import Params

__all__ = ["LearnerTaskFn", "SliceJob", "learner_meta_gradient", "run_slice",
           "shard_slices", "sharded_task_batch"]


def shard_slices(n: int, shards: int) -> list[slice]:
    """``shards`` contiguous slices covering ``range(n)``, sizes differing by at most 1.

    Empty slices are dropped (fewer tasks than shards).
    """
    if n < 1 or shards < 1:
        raise ValueError(f"shard_slices needs n >= 1 and shards >= 1, got {n}, {shards}")
    base, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        if size:
            out.append(slice(start, start + size))
        start += size
    return out


@dataclass
class SliceJob:
    """One slice of a meta-batch: what a worker needs to compute its result."""

    task_fn: TaskFn
    phi: Params
    tasks: tuple[Tensor, ...]
    need_grad: bool
    strategy: str = "loop"
    device: str | None = None


def run_slice(job: SliceJob) -> TaskBatchResult:
    """The :class:`TaskBatchResult` of one slice (runs on a worker; results on CPU)."""
    phi, tasks = job.phi, job.tasks
    if job.device is not None:
        phi = {k: v.detach().to(job.device).requires_grad_(v.requires_grad)
               for k, v in phi.items()}
        tasks = tuple(t.to(job.device) for t in tasks)
    result = run_tasks(job.task_fn, phi, tasks, need_grad=job.need_grad,
                       strategy=job.strategy)
    if job.device is None:
        return result
    return TaskBatchResult(result.losses.cpu(), result.metrics.cpu(),
                           None if result.grads is None
                           else {k: g.cpu() for k, g in result.grads.items()},
                           result.strategy)


def sharded_task_batch(executor: Executor, task_fn: TaskFn, phi: Params,
                       tasks: Sequence[Tensor], *, need_grad: bool,
                       strategy: str = "loop", shards: int | None = None,
                       device: str | None = None) -> TaskBatchResult:
    """The result of the whole meta-batch ``tasks``, its slices computed by ``executor``.

    ``shards`` defaults to the executor's worker count; ``strategy`` is each slice's
    (``"loop"`` or ``"vmap"``); ``device``: where workers compute (None: where the
    tensors are).
    """
    n = int(tasks[0].shape[0])
    plain = {k: v.detach().requires_grad_(v.requires_grad) for k, v in phi.items()}
    jobs = [SliceJob(task_fn, plain, tuple(t[sl] for t in tasks), need_grad, strategy, device)
            for sl in shard_slices(n, shards or executor.num_workers)]
    return merge_results(executor.map(run_slice, jobs))


class LearnerTaskFn:
    """A picklable task function: ``learner.task_loss`` with a fixed loss function.

    A :class:`~metaopt.algorithms.base.MetaLearner` holds a traced (FX) model that
    does not pickle, so what travels is ``make_learner``, a picklable zero-argument
    factory (e.g. ``functools.partial(MAML, model, inner_lr=0.05)``); the learner is
    built on the worker at its first call. Its own parameters are not used: every
    meta-learned tensor comes in as φ.
    """

    def __init__(self, make_learner: Callable[[], torch.nn.Module],
                 loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.make_learner = make_learner
        self.loss_fn = loss_fn
        self._learner: torch.nn.Module | None = None

    def __getstate__(self) -> dict:
        return {"make_learner": self.make_learner, "loss_fn": self.loss_fn}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["make_learner"], state["loss_fn"])

    def __call__(self, p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *,
                 functional: bool, checks: bool) -> Tensor | tuple[Tensor, Tensor]:
        if self._learner is None:
            self._learner = self.make_learner()
        self._learner.last_diagnostics = []
        return self._learner.task_loss(p, sx, sy, qx, qy, self.loss_fn, checks=checks,
                                       functional=functional)


def learner_meta_gradient(executor: Executor, make_learner: Callable[[], torch.nn.Module],
                          phi: Params, support_x: Tensor, support_y: Tensor,
                          query_x: Tensor, query_y: Tensor,
                          loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                          strategy: str = "loop", device: str | None = None
                          ) -> TaskBatchResult:
    """A MetaLearner's meta-batch result with the meta-batch sharded over the workers.

    ``phi``: the driver learner's ``outer_parameters()`` (the gradients are keyed as
    it); ``make_learner`` builds the same learner on a worker (see
    :class:`LearnerTaskFn`).
    """
    return sharded_task_batch(executor, LearnerTaskFn(make_learner, loss_fn), phi,
                              (support_x, support_y, query_x, query_y),
                              need_grad=True, strategy=strategy, device=device)
