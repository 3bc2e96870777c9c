"""Running one bilevel problem per task over a batch of tasks: the one place that does it.

A multi-task problem (the MAML family today; hyperparameter problems, CaMeLS and
sharded runs later) is written as a pure per-task function

    task_fn(phi, *task_tensors, functional: bool, checks: bool) -> loss | (loss, metric)

whose gradient with respect to φ is that task's meta-gradient — typically
``estimator.objective(problem, phi, theta0, ...).value`` of an estimator of
:mod:`metaopt.bilevel`. ``functional`` is True when the function runs inside
``torch.func.vmap`` (pass it on to :func:`~metaopt.bilevel.inner_loop.unroll`);
``checks`` asks for data-dependent checks (finite inner losses, naming the step) —
False under ``vmap`` and in the loop's fast pass. The metric (e.g. Reptile's query
loss) is reported, not differentiated.

This module evaluates it over the ``(tasks, ...)`` tensors and returns the per-task
losses, their mean and d(mean)/dφ (:class:`TaskBatchResult`):

* ``"loop"`` (:func:`run_loop`): one task at a time, each task's ``backward()``
  accumulating into leaf aliases of φ, so only one task's graph is alive at a time
  (the peak memory of the per-task loops written with higher or learn2learn);
* ``"vmap"`` (:func:`run_vmap`): ``torch.func.grad`` of the summed loss of a chunk of
  tasks under ``torch.func.vmap``; a chunk holds that many tasks' graphs at once.

:class:`TaskBatcher` chooses between them **from a memory budget in bytes, never from
timing**. On the first meta-batch of each input signature it runs the loop and
measures the first task's footprint: the bytes of every tensor autograd saves for
backward during that task (counted with ``torch.autograd.graph.saved_tensors_hooks``:
deterministic for given shapes, dtypes and settings). A ``vmap`` chunk of ``n`` tasks
saves about ``n`` times that, so later meta-batches of the signature run under
``vmap`` in chunks of ``min(tasks, chunk_size, budget // footprint)`` tasks when that
is at least 2, and in the loop otherwise. Deterministic structural rules come first
(the caller passes them): a problem whose meta-gradient is wrong or impossible under
``vmap`` (second order through normalisation layers, pytorch/functorch#534; an
estimator that differentiates with ``torch.autograd`` inside, such as ``Implicit``)
always loops, and so does a model ``vmap`` would make slower (convolutions on CPU,
where per-task weights become grouped convolutions).

Sharding: :func:`merge_results` joins results of disjoint slices of a meta-batch
(say, computed by remote workers calling :func:`run_loop` / :class:`TaskBatcher` on
their slice) into exactly the result of the whole batch: the gradient of a mean over
``N`` tasks is the ``n_i / N``-weighted sum of the slices' mean gradients.

:func:`attach_gradient` hands a precomputed meta-gradient to the user as a scalar
loss whose ``backward()`` deposits it into φ's ``.grad``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.errors import NonFiniteError
from metaopt.params import Params

__all__ = [
    "STRATEGIES",
    "TaskBatchResult",
    "TaskBatcher",
    "attach_gradient",
    "merge_results",
    "parse_bytes",
    "run_loop",
    "run_tasks",
    "run_vmap",
    "saved_tensor_bytes",
]

#: Strategies :class:`TaskBatcher` accepts.
STRATEGIES = ("auto", "loop", "vmap")
#: The default memory budget of ``strategy="auto"``.
DEFAULT_MEMORY_BUDGET = "256MiB"

#: ``task_fn(phi, *task, functional, checks) -> loss`` or ``-> (loss, metric)``.
TaskFn = Callable[..., Tensor | tuple[Tensor, Tensor]]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(budget: int | str) -> int:
    """A memory budget in bytes: an int, or a string such as ``"256MiB"``, ``"1.5GB"``.

    Units: B, kB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (powers of 2), case-insensitive.
    A fraction of free memory is not accepted: it would make the choice depend on the
    machine's load.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise TypeError(f"memory_budget must be an int of bytes or a string like '256MiB', "
                        f"got {budget!r}")
    if isinstance(budget, int):
        value = budget
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory_budget {budget!r} is not a size such as '256MiB', "
                             f"'1GB' or an int of bytes")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes, got {budget!r}")
    return value


@dataclass
class TaskBatchResult:
    """Per-task losses and metrics, and the gradient of their mean w.r.t. φ.

    Attributes:
        losses: the per-task losses (detached, shape ``(tasks,)``).
        metrics: per-task metrics (the losses unless the task function returned its own).
        grads: d(mean loss)/dφ for the φ entries that require grad (None: not asked).
        strategy: ``"loop"`` or ``"vmap"``.
    """

    losses: Tensor
    metrics: Tensor
    grads: Params | None
    strategy: str

    @property
    def n_tasks(self) -> int:
        return int(self.losses.shape[0])

    @property
    def mean(self) -> Tensor:
        return self.losses.mean()


def merge_results(results: Sequence[TaskBatchResult]) -> TaskBatchResult:
    """The result of a whole meta-batch from results of its disjoint slices, in order.

    Exact up to float rounding: the gradient of the mean over ``N`` tasks is
    ``Σ_i (n_i / N) · grad_i`` where ``grad_i`` is slice ``i``'s mean gradient.
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    total = sum(r.n_tasks for r in results)
    grads: Params | None = None
    if any(r.grads is not None for r in results):
        if any(r.grads is None for r in results):
            raise ValueError("merge_results: some slices have gradients and some do not")
        keys = list(results[0].grads)
        for r in results[1:]:
            if list(r.grads) != keys:
                raise ValueError(f"merge_results: slices have different gradient keys "
                                 f"({sorted(keys)} vs {sorted(r.grads)})")
        grads = {k: sum(r.grads[k] * (r.n_tasks / total) for r in results) for k in keys}
    strategies = {r.strategy for r in results}
    return TaskBatchResult(torch.cat([r.losses for r in results]),
                           torch.cat([r.metrics for r in results]), grads,
                           strategies.pop() if len(strategies) == 1 else "mixed")


# --------------------------------------------------------------------------- the meta-loss


class _AttachGradient(torch.autograd.Function):
    """Forward: the given value. Backward: ``grad_output *`` precomputed gradients."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError("the meta-gradient of this meta-loss was already used by a "
                               "backward(); compute the meta-loss again")
        if torch.is_grad_enabled():
            raise RuntimeError("a meta-loss does not support higher-order differentiation "
                               "(create_graph=True): its meta-gradient was precomputed")
        del ctx.grads  # a second backward must not silently reuse them
        return (None, None, *(grad_output * g for g in grads))


def attach_gradient(value: Tensor, params: Params, grads: Params) -> Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is ``grads``.

    It behaves as a loss: anything computed from it (scaled, summed with terms that
    depend on ``params``, with another such loss) backpropagates by the chain rule,
    the precomputed gradient multiplied by the incoming ``grad_output``. Only tensors
    of ``params`` that require grad and have an entry in ``grads`` are connected. It
    supports one ``backward()``, not higher-order differentiation.
    """
    keys = [k for k, p in params.items() if p.requires_grad and k in grads]
    if not keys:
        return value.detach()
    return _AttachGradient.apply(value, [grads[k] for k in keys], *(params[k] for k in keys))


# --------------------------------------------------------------------------- footprint


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for backward.

    Every tensor saved during the call (forward and any backward it runs, including
    double-backward graphs) is counted once per save, by ``numel × element_size``:
    a deterministic upper bound of the graph memory that call holds.
    """
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


# --------------------------------------------------------------------------- strategies


def _split(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """A task function returns its loss, or ``(loss, metric)`` (metric: not differentiated)."""
    if isinstance(out, tuple):
        return out[0], out[1].detach()
    return out, out.detach()


def _check_grads(grads: Params, what: str) -> None:
    for k, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(f"{what} for '{k}' contains NaN/inf")


def _finite(grads: Params) -> bool:
    """All entries finite, with one host sync (one per tensor costs more on small nets)."""
    flat = [g.reshape(-1) for g in grads.values()]
    if len({g.device for g in flat}) > 1:
        return all(bool(torch.isfinite(g).all()) for g in flat)
    return bool(torch.isfinite(torch.cat(flat)).all())


def _diagnose(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor]) -> None:
    """Re-run every task with its checks on; the first bad inner step raises."""
    with torch.no_grad():
        for i in range(tasks[0].shape[0]):
            task_fn(phi, *[t[i] for t in tasks], functional=False, checks=True)


def run_loop(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
             check_finite: bool = True, measure: dict | None = None) -> TaskBatchResult:
    """Evaluate ``task_fn`` task by task; the gradient of the mean loss by autograd.

    The task function sees fresh leaf aliases of φ's tensors (same storage), and each
    task's ``backward()`` accumulates into their ``.grad`` — autograd's own in-place
    accumulation — so only one task's graph is alive at a time and nothing of the
    user's (``.grad`` included) is touched.

    Tasks run without their per-step checks (a host sync per inner step and task);
    the losses and the meta-gradient are checked once at the end, and if they are
    not finite the tasks are re-run with checks on, so the error still names the
    inner step and tensor that went bad. ``measure``: a dict that receives
    ``"task_bytes"``, the :func:`saved_tensor_bytes` of the first task.
    """
    n_tasks = tasks[0].shape[0]
    keys = [k for k, p in phi.items() if p.requires_grad] if need_grad else []
    losses, metrics = [], []
    if not keys:
        for i in range(n_tasks):
            loss, metric = _split(task_fn(phi, *[t[i] for t in tasks], functional=False,
                                          checks=check_finite))
            losses.append(loss.detach())
            metrics.append(metric)
        return TaskBatchResult(torch.stack(losses), torch.stack(metrics), None, "loop")
    leaves = dict(phi)
    for k in keys:
        leaves[k] = phi[k].detach().requires_grad_()
        leaves[k].grad = torch.zeros_like(phi[k])
    inputs = [leaves[k] for k in keys]
    # Everything that outlives a task is allocated before the first one (the gradient
    # accumulators above, the loss slots here): a small tensor allocated while a task's
    # graph is alive would pin the heap there, and the next task would touch fresh pages.
    values = torch.empty(2, n_tasks, dtype=inputs[0].dtype, device=inputs[0].device)
    slotted: bool | None = None  # scalar losses and metrics of values' dtype (decided once)
    # each task back-propagates d(mean)/d(loss_i) = 1/N, as `(loss_i / N).backward()` does
    weight = torch.full((), 1.0 / n_tasks, dtype=values.dtype, device=values.device)

    def one_task(i: int) -> tuple[Tensor, Tensor]:
        loss, metric = _split(task_fn(leaves, *[t[i] for t in tasks], functional=False,
                                      checks=False))
        if loss.requires_grad:
            torch.autograd.backward(loss, weight, inputs=inputs)
        return loss, metric

    with torch.enable_grad():
        for i in range(n_tasks):
            if i == 0 and measure is not None:
                (loss, metric), measure["task_bytes"] = saved_tensor_bytes(lambda: one_task(0))
            else:
                loss, metric = one_task(i)
            if slotted is None:
                slotted = all(v.dim() == 0 and v.dtype == values.dtype for v in (loss, metric))
            if slotted:
                with torch.no_grad():
                    values[0, i] = loss
                    values[1, i] = metric
            else:
                losses.append(loss.detach())
                metrics.append(metric)
            del loss, metric
    losses_t = values[0] if slotted else torch.stack(losses)
    metrics_t = values[1] if slotted else torch.stack(metrics)
    grads = {k: p.grad for k, p in zip(keys, inputs)}
    if check_finite and not (bool(torch.isfinite(losses_t).all()) and _finite(grads)):
        _diagnose(task_fn, phi, tasks)
        _check_grads(grads, "meta-gradient")
        raise NonFiniteError("a task's query loss is NaN/inf")
    return TaskBatchResult(losses_t, metrics_t, grads, "loop")


def run_vmap(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
             chunk_size: int | None = None, check_finite: bool = True) -> TaskBatchResult:
    """Evaluate ``task_fn`` under ``torch.func.vmap`` over tasks, in chunks.

    The meta-gradient is ``torch.func.grad`` of the chunk's summed loss (divided by
    the number of tasks), accumulated over chunks. The task function is called with
    ``functional=True, checks=False``.
    """
    n_tasks = tasks[0].shape[0]
    chunk = n_tasks if not chunk_size else max(1, min(chunk_size, n_tasks))
    keys = [k for k, p in phi.items() if p.requires_grad] if need_grad else []
    plain = {k: v.detach() for k, v in phi.items()}
    in_dims = (None, *([0] * len(tasks)))

    def per_task(p: Params, *task: Tensor) -> tuple[Tensor, Tensor]:
        return _split(task_fn(p, *task, functional=True, checks=False))

    batched = torch.func.vmap(per_task, in_dims=in_dims)
    losses, metrics, total = [], [], None
    for start in range(0, n_tasks, chunk):
        part = [t[start:start + chunk] for t in tasks]
        if keys:
            fixed = {k: v for k, v in plain.items() if k not in keys}

            def chunk_loss(learned: Params, part: list[Tensor] = part,
                           fixed: Params = fixed) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                values, metric = batched({**fixed, **learned}, *part)
                return values.sum() / n_tasks, (values, metric)

            g, (_, (values, metric)) = torch.func.grad_and_value(chunk_loss, has_aux=True)(
                {k: plain[k] for k in keys})
            total = g if total is None else {k: total[k] + g[k] for k in keys}
        else:
            values, metric = batched(plain, *part)
        losses.append(values.detach())
        metrics.append(metric.detach())
    if total is not None and check_finite and not _finite(total):
        _check_grads(total, "meta-gradient")  # names the tensor
    return TaskBatchResult(torch.cat(losses), torch.cat(metrics), total, "vmap")


def run_tasks(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
              strategy: str = "loop", chunk_size: int | None = None) -> TaskBatchResult:
    """Run a meta-batch with an explicit strategy (``"loop"`` or ``"vmap"``)."""
    if strategy == "loop":
        return run_loop(task_fn, phi, tasks, need_grad=need_grad)
    if strategy == "vmap":
        return run_vmap(task_fn, phi, tasks, need_grad=need_grad, chunk_size=chunk_size)
    raise ValueError(f"strategy must be 'loop' or 'vmap', got {strategy!r}")


@dataclass
class TaskBatcher:
    """Runs meta-batches, choosing loop or vmap from a memory budget (see module doc).

    Args:
        strategy: ``"auto"`` (the budget decides), ``"loop"`` or ``"vmap"``.
        memory_budget: bytes that one ``vmap`` chunk's saved tensors may take (an int,
            or a string like ``"256MiB"``); only read by ``"auto"``.
        chunk_size: the most tasks per ``vmap`` call (None: no limit beyond the budget;
            with ``"vmap"``, None means the whole meta-batch).

    ``footprints`` maps each signature to its measured per-task bytes and ``chunks``
    to the chosen chunk (None: loop), so the choice can be inspected. The measuring
    ``saved_tensors_hooks`` are innermost during that one task, so saved-tensor hooks
    of the caller (e.g. ``save_on_cpu``) do not apply to it; numbers are unaffected.
    """

    strategy: str = "auto"
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET
    chunk_size: int | None = None
    footprints: dict[tuple, int] = field(default_factory=dict)
    chunks: dict[tuple, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.chunk_size is not None and not (
                isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool)
                and self.chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        self.budget_bytes = parse_bytes(self.memory_budget)

    @staticmethod
    def signature(tasks: Sequence[Tensor], need_grad: bool, extra: tuple = ()) -> tuple:
        """What the footprint depends on: shapes, dtypes, devices, grad mode, settings."""
        return (tuple((tuple(t.shape), t.dtype, t.device) for t in tasks), need_grad, *extra)

    def choose_chunk(self, n_tasks: int, task_bytes: int) -> int | None:
        """The ``vmap`` chunk within the budget for this footprint (None: the loop)."""
        fit = self.budget_bytes // max(task_bytes, 1)
        chunk = min(n_tasks, fit, self.chunk_size or n_tasks)
        return chunk if chunk >= 2 else None

    def run(self, task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
            key: tuple = (), loop_only: str | None = None,
            vmap_slow: str | None = None) -> TaskBatchResult:
        """Run the meta-batch ``tasks`` (tensors with a leading task axis).

        ``loop_only``: why ``vmap`` cannot run this problem correctly (``"vmap"``
        raises, ``"auto"`` loops); ``vmap_slow``: why ``vmap`` would be slower
        (``"auto"`` loops). ``key``: settings that change the footprint.
        """
        if self.strategy == "vmap":
            if loop_only:
                raise ValueError(f"strategy='vmap' cannot be used here: {loop_only}; "
                                 f"use strategy='auto' or 'loop'")
            return run_vmap(task_fn, phi, tasks, need_grad=need_grad,
                            chunk_size=self.chunk_size)
        if self.strategy == "loop" or loop_only or vmap_slow or not need_grad:
            return run_loop(task_fn, phi, tasks, need_grad=need_grad)
        sig = self.signature(tasks, need_grad, key)
        if sig in self.chunks:
            chunk = self.chunks[sig]
            if chunk is None:
                return run_loop(task_fn, phi, tasks, need_grad=need_grad)
            return run_vmap(task_fn, phi, tasks, need_grad=need_grad, chunk_size=chunk)
        measured: dict = {}
        result = run_loop(task_fn, phi, tasks, need_grad=need_grad, measure=measured)
        self.footprints[sig] = measured["task_bytes"]
        self.chunks[sig] = self.choose_chunk(tasks[0].shape[0], measured["task_bytes"])
        return result
