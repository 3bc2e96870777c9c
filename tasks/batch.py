"""The meta-batch every task family returns: support and query sets with a leading task axis.

A :class:`TaskBatch` is the one data type that flows from a task sampler into an inner
loop. Shapes (``B`` tasks, ``M`` support and ``P`` query examples per task)::

    support_x [B, M, *feature]    support_y [B, M] (class ids) | [B, M, *target]
    query_x   [B, P, *feature]    query_y   [B, P] (class ids) | [B, P, *target]

For classification ``num_classes`` is set and labels are either integer class ids in
``0..num_classes-1`` or soft labels ``[B, M, num_classes]`` (probability vectors, e.g.
after MLTI); ``torch.nn.functional.cross_entropy`` accepts both forms. For regression
``num_classes`` is ``None`` and targets are real-valued.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Task", "TaskBatch", "TaskSampler"]


class Task(NamedTuple):
    """One task of a :class:`TaskBatch`, without the task axis."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """A meta-batch of ``B`` tasks; validated on construction (see module docstring).

    ``classes`` (classification only) is ``[B, N]``: the dataset class id behind each
    episode label, so ``classes[b, j]`` is the original class of label ``j`` in task ``b``.
    ``info`` carries per-task ground truth of synthetic families (e.g. sinusoid
    ``amplitude`` and ``phase``, each ``[B]``), useful for evaluation and plots.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    num_classes: int | None = None
    classes: Tensor | None = None
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_task_batch(self)

    @property
    def batch_size(self) -> int:
        """Number of tasks ``B``."""
        return self.support_x.shape[0]

    @property
    def soft_labels(self) -> bool:
        """Whether labels are probability vectors rather than class ids."""
        return self.num_classes is not None and self.support_y.is_floating_point()

    def __len__(self) -> int:
        return self.batch_size

    def task(self, index: int) -> Task:
        """Task ``index`` as four tensors without the task axis."""
        return Task(self.support_x[index], self.support_y[index],
                    self.query_x[index], self.query_y[index])

    def tasks(self) -> Iterator[Task]:
        """Iterate over the tasks one at a time (for loops that cannot ``vmap``)."""
        for index in range(self.batch_size):
            yield self.task(index)

    def to(self, *args, **kwargs) -> TaskBatch:
        """Move/cast every tensor like ``Tensor.to`` (labels keep integer dtypes)."""

        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device") or next(
                (a for a in args if isinstance(a, (str, torch.device))), None)
            return t if device is None else t.to(device)

        changes = {f.name: move(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        changes["info"] = {k: move(v) for k, v in self.info.items()}
        return replace(self, **changes)


def check_task_batch(batch: TaskBatch) -> None:
    """Raise ``ValueError`` naming the offending tensor when shapes or labels disagree."""
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    for name, t in (("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} needs a task axis and an example axis, "
                             f"got shape {tuple(t.shape)}")
    if not (sx.shape[0] == sy.shape[0] == qx.shape[0] == qy.shape[0]):
        raise ValueError("task axis differs: support_x, support_y, query_x, query_y have "
                         f"{sx.shape[0]}, {sy.shape[0]}, {qx.shape[0]}, {qy.shape[0]} tasks")
    if sx.shape[1] != sy.shape[1]:
        raise ValueError(f"support_x has {sx.shape[1]} examples per task but support_y "
                         f"has {sy.shape[1]}")
    if qx.shape[1] != qy.shape[1]:
        raise ValueError(f"query_x has {qx.shape[1]} examples per task but query_y "
                         f"has {qy.shape[1]}")
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(f"support_x features {tuple(sx.shape[2:])} differ from query_x "
                         f"features {tuple(qx.shape[2:])}")
    if sy.shape[2:] != qy.shape[2:]:
        raise ValueError(f"support_y target shape {tuple(sy.shape[2:])} differs from query_y "
                         f"target shape {tuple(qy.shape[2:])}")
    if batch.num_classes is None:
        return
    n = batch.num_classes
    for name, y in (("support_y", sy), ("query_y", qy)):
        if y.is_floating_point():
            if y.dim() != 3 or y.shape[2] != n:
                raise ValueError(f"soft {name} must be [B, M, {n}], got {tuple(y.shape)}")
        else:
            if y.dim() != 2:
                raise ValueError(f"{name} must be [B, M] class ids, got {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
                raise ValueError(f"{name} has labels outside 0..{n - 1}: "
                                 f"min {int(y.min())}, max {int(y.max())}")


@runtime_checkable
class TaskSampler(Protocol):
    """What every task family offers: ``sample(batch_size, generator) -> TaskBatch``.

    Without ``generator`` the family's own seeded generator is used, so a family
    constructed with the same seed yields the same sequence of meta-batches.
    """

    def sample(self, batch_size: int, generator: torch.Generator | None = None
               ) -> TaskBatch: ...
