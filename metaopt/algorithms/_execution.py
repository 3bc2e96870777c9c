"""Running a per-task function over a meta-batch: a loop or ``torch.func.vmap``.

Every algorithm in this package is written as a pure per-task function
``task_fn(phi, *task_tensors, checks) -> loss`` or ``-> (loss, metric)``
(``checks``: whether to run data-dependent checks such as finite inner losses —
False under ``vmap``, where they cannot run, and in the loop's fast pass, which
checks its results once and re-runs a failing task with checks to name the step;
the metric — e.g. Reptile's query loss — is reported, not differentiated). This module evaluates it
over the meta-batch and produces the **mean** query loss together with its
gradient with respect to φ, task by task, so the autograd graph of only one task
(or one chunk of tasks) is alive at a time — the same peak memory as the
per-task ``backward()`` loops users write with higher or learn2learn.

The result is handed to the user as a scalar whose ``backward()`` deposits the
precomputed gradient into φ's ``.grad`` (:func:`attach_gradient`). That keeps the
required API — ``loss = algo.meta_loss(...); loss.backward()`` — without holding
the whole meta-batch's graph until the user calls ``backward()``.

Strategies:

* ``"loop"``: one task at a time with ``torch.autograd`` (``create_graph=True``
  inner gradients). Always works, including for modules that update buffers in
  place. Holds one task's graph at a time: the peers' memory.
* ``"vmap"``: ``torch.func.grad`` of the mean over ``torch.func.vmap`` over tasks,
  in chunks of ``chunk_size`` tasks (default: the whole meta-batch). Much faster for
  small, overhead-bound models, but it holds ``chunk_size`` tasks' graphs at once:
  its memory grows linearly with the chunk (the adapted parameters of every inner
  step of every task in the chunk stay alive until the backward).
  Slower than the loop for convolutional nets on CPU, where per-task weights
  become grouped convolutions.
* ``"auto"`` (default): stays within a memory budget of ``chunk_size`` tasks'
  graphs — by default **one task**, what higher, learn2learn and TorchOpt hold —
  and within it picks the faster strategy. With the default budget that is the
  per-task loop (``vmap`` over one task at a time is never faster than the loop,
  so it is not even measured). Give ``chunk_size=n`` (n > 1) to allow ``n`` tasks
  at once: ``auto`` then times the loop against ``vmap`` in chunks of ``n`` on the
  first meta-batch of each shape and keeps the faster (the loop wins ties, and
  whenever ``vmap`` raises or disagrees with it).

Measured on the benchmark's sinusoid MLP (1-40-40-1, 10-shot, second order, one
CPU thread, ``scripts/bench_maml_peers.py``, meta-batch 8/32, 1/5 inner steps):
``vmap`` over the whole meta-batch is 2-7x faster than the per-task loop but takes
9-65x its peak memory (0.4-7.4 MiB against 0.05-0.11 MiB), so the default trades
that speed for the peers' memory; ``chunk_size=meta_batch`` buys it back explicitly.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.params import NonFiniteError, Params

__all__ = ["MetaBatchResult", "StrategyChooser", "attach_gradient", "run_loop", "run_vmap"]

STRATEGIES = ("auto", "loop", "vmap")

TaskFn = Callable[..., Tensor]


@dataclass
class MetaBatchResult:
    """Per-task losses (detached), the mean loss, and d(mean)/dφ when requested."""

    losses: Tensor
    grads: Params | None
    strategy: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> Tensor:
        return self.losses.mean()

    @property
    def metrics(self) -> Tensor:
        """Per-task metrics (the losses unless the task function returned its own)."""
        return self.extras.get("metrics", self.losses)


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
            raise RuntimeError("the meta-gradient of this meta_loss(...) was already "
                               "used by a backward(); call meta_loss again")
        del ctx.grads  # a second backward must not silently reuse them
        return (None, None, *(grad_output * g for g in grads))


def attach_gradient(value: Tensor, params: Params, grads: Params) -> Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is ``grads``.

    Only tensors in ``params`` that require grad are connected. The result supports
    one ``backward()`` (scaled by whatever multiplies it), not higher-order
    differentiation: the meta-gradient was already computed.
    """
    keys = [k for k, p in params.items() if p.requires_grad]
    if not keys:
        return value.detach()
    return _AttachGradient.apply(value, [grads[k] for k in keys], *(params[k] for k in keys))


def _split(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """A task function returns its loss, or ``(loss, metric)`` (metric: not differentiated)."""
    if isinstance(out, tuple):
        return out[0], out[1].detach()
    return out, out.detach()


def _check_grads(grads: Params, what: str) -> None:
    for k, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(f"{what} for '{k}' contains NaN/inf")


def run_loop(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
             check_finite: bool = True) -> MetaBatchResult:
    """Evaluate ``task_fn`` task by task; gradients of the mean loss by autograd.

    The task function sees fresh leaf aliases of φ's tensors (same storage), and each
    task's ``backward()`` accumulates into their ``.grad`` — autograd's own in-place
    accumulation, as in the per-task loops users write — so only one task's graph is
    alive at a time and nothing of the user's (``.grad`` included) is touched.

    Tasks run without their per-step checks (a host sync per inner step and task,
    ~7% of a meta-step on the sinusoid MLP); the losses and the meta-gradient are
    checked once at the end, and if they are not finite the tasks are re-run with
    checks on, so the error still names the inner step and tensor that went bad.
    """
    n_tasks = tasks[0].shape[0]
    keys = [k for k, p in phi.items() if p.requires_grad] if need_grad else []
    losses, metrics = [], []
    if not keys:
        for i in range(n_tasks):
            loss, metric = _split(task_fn(phi, *[t[i] for t in tasks], checks=check_finite))
            losses.append(loss.detach())
            metrics.append(metric)
        return MetaBatchResult(torch.stack(losses), None, "loop",
                               {"metrics": torch.stack(metrics)})
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
    with torch.enable_grad():
        for i in range(n_tasks):
            loss, metric = _split(task_fn(leaves, *[t[i] for t in tasks], checks=False))
            if loss.requires_grad:
                torch.autograd.backward(loss, inputs=inputs)
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
    grads = {k: p.grad.div_(n_tasks) for k, p in zip(keys, inputs)}
    if check_finite and not (bool(torch.isfinite(losses_t).all()) and _finite(grads)):
        _diagnose(task_fn, phi, tasks)
        _check_grads(grads, "meta-gradient")
        raise NonFiniteError("a task's query loss is NaN/inf")
    return MetaBatchResult(losses_t, grads, "loop", {"metrics": metrics_t})


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
            task_fn(phi, *[t[i] for t in tasks], checks=True)


def run_vmap(task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
             chunk_size: int | None = None, check_finite: bool = True) -> MetaBatchResult:
    """Evaluate ``task_fn`` under ``torch.func.vmap`` over tasks, in chunks.

    The meta-gradient is ``torch.func.grad`` of the chunk's summed loss (divided by
    the number of tasks), accumulated over chunks.
    """
    n_tasks = tasks[0].shape[0]
    chunk = n_tasks if not chunk_size else max(1, min(chunk_size, n_tasks))
    keys = [k for k, p in phi.items() if p.requires_grad] if need_grad else []
    plain = {k: v.detach() for k, v in phi.items()}
    in_dims = (None, *([0] * len(tasks)))

    def per_task(p: Params, *task: Tensor) -> tuple[Tensor, Tensor]:
        return _split(task_fn(p, *task, checks=False))

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
    if total is not None and check_finite:
        _check_grads(total, "meta-gradient")
    return MetaBatchResult(torch.cat(losses), total, "vmap", {"metrics": torch.cat(metrics)})


def _agree(a: MetaBatchResult, b: MetaBatchResult) -> bool:
    """Loop and vmap results equal up to rounding (relative to the largest entry)."""
    tol = 1e-9 if a.losses.dtype == torch.float64 else 1e-4
    groups = [[(a.losses, b.losses)]]
    if a.grads is not None and b.grads is not None:
        groups.append([(a.grads[k], b.grads[k]) for k in a.grads])
    for pairs in groups:
        scale = max([float(x.abs().max()) for x, _ in pairs if x.numel()] + [1e-30])
        for x, y in pairs:
            if x.numel() and not float((x - y).abs().max()) <= tol * scale:
                return False
    return True


class StrategyChooser:
    """Picks loop or vmap per input signature within a memory budget (see module doc).

    ``chunk_size``: for ``"vmap"``, tasks per vmap call (None: the whole meta-batch);
    for ``"auto"``, the memory budget in tasks whose graphs may be alive at once
    (None or 1: one task, so the per-task loop). When the budget allows a chunk of
    ``n > 1`` tasks, the first meta-batch of each signature (shapes, dtypes, device,
    grad mode, algorithm settings) runs both ways, timed — two interleaved rounds,
    then more (up to ``rounds``, within ``budget_s`` seconds) while the two are within
    2x of each other, keeping each one's fastest time; the faster is remembered. The
    returned numbers are always the loop's, and the vmap result must agree with them
    (else the loop is kept). ``vmap`` must beat the loop by ``margin`` to win, and any
    exception under ``vmap`` (in-place buffer updates, data-dependent control flow,
    unsupported ops) makes the loop the choice for that signature, with one warning.
    """

    def __init__(self, strategy: str = "auto", *, chunk_size: int | None = None,
                 margin: float = 0.9, rounds: int = 7, budget_s: float = 2.0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.margin = margin
        self.rounds = rounds
        self.budget_s = budget_s
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def signature(tasks: Sequence[Tensor], need_grad: bool, extra: tuple = ()) -> tuple:
        return (tuple((tuple(t.shape), t.dtype, t.device) for t in tasks), need_grad, *extra)

    def run(self, task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor], *, need_grad: bool,
            extra_key: tuple = (),
            vmap_unsafe: Callable[[], str | None] | None = None) -> MetaBatchResult:
        """Run the meta-batch; ``vmap_unsafe()`` returning a reason rules ``vmap`` out
        (asked only when ``vmap`` is a candidate)."""
        if self.strategy == "vmap":
            if vmap_unsafe is not None and (why := vmap_unsafe()):
                raise ValueError(f"strategy='vmap' cannot be used here: {why}; "
                                 f"use strategy='auto' or 'loop'")
            return run_vmap(task_fn, phi, tasks, need_grad=need_grad,
                            chunk_size=self.chunk_size)
        chunk = self.auto_chunk(tasks[0].shape[0])
        if (self.strategy == "loop" or chunk is None
                or (vmap_unsafe is not None and vmap_unsafe())):
            return run_loop(task_fn, phi, tasks, need_grad=need_grad)
        key = (*self.signature(tasks, need_grad, extra_key), chunk)
        choice = self.choices.get(key)
        if choice == "loop":
            return run_loop(task_fn, phi, tasks, need_grad=need_grad)
        if choice == "vmap":
            return run_vmap(task_fn, phi, tasks, need_grad=need_grad, chunk_size=chunk)
        return self._measure(key, task_fn, phi, tasks, need_grad, chunk)

    def auto_chunk(self, n_tasks: int) -> int | None:
        """The ``vmap`` chunk ``auto`` may try within the memory budget (None: only the loop).

        The budget is ``chunk_size`` tasks' graphs alive at once; the default (one
        task) is what the per-task loop already holds, and ``vmap`` over one task at
        a time is never faster than the loop, so it is not tried.
        """
        chunk = min(self.chunk_size or 1, n_tasks)
        return chunk if chunk > 1 else None

    def _measure(self, key: tuple, task_fn: TaskFn, phi: Params, tasks: Sequence[Tensor],
                 need_grad: bool, chunk: int) -> MetaBatchResult:
        t0 = time.perf_counter()
        result = run_loop(task_fn, phi, tasks, need_grad=need_grad)
        t_loop = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            check = run_vmap(task_fn, phi, tasks, need_grad=need_grad,
                             chunk_size=chunk, check_finite=False)
            t_vmap = time.perf_counter() - t0
        except Exception as err:  # vmap cannot run this model: keep the loop
            warnings.warn(f"vmap over tasks failed ({type(err).__name__}: {err}); "
                          f"using the per-task loop for this model", stacklevel=4)
            self.choices[key] = "loop"
            self.timings[key] = {"loop": t_loop, "vmap": float("nan")}
            return result
        if not _agree(result, check):
            warnings.warn("vmap over tasks gave different numbers from the per-task loop "
                          "(a batching rule that is wrong for this model, e.g. "
                          "pytorch/functorch#534); using the per-task loop", stacklevel=4)
            self.choices[key] = "loop"
            self.timings[key] = {"loop": t_loop, "vmap": float("nan")}
            return result
        # More interleaved rounds while undecided (within 2x), keeping each one's
        # minimum (the least noise-inflated estimate on a shared machine). The first
        # round also pays one-time costs (lazy initialisation of torch.func), so a
        # second round always runs; cheap models get up to ``rounds`` rounds, costly
        # ones stop once ``budget_s`` seconds have been spent measuring.
        spent = t_loop + t_vmap
        for extra in range(self.rounds - 1):
            if extra > 0 and (not 0.5 < t_vmap / t_loop < 2.0 or spent > self.budget_s):
                break
            t0 = time.perf_counter()
            run_vmap(task_fn, phi, tasks, need_grad=need_grad, chunk_size=chunk,
                     check_finite=False)
            t1 = time.perf_counter()
            result = run_loop(task_fn, phi, tasks, need_grad=need_grad)
            t2 = time.perf_counter()
            t_vmap, t_loop = min(t_vmap, t1 - t0), min(t_loop, t2 - t1)
            spent += t2 - t0
        self.timings[key] = {"loop": t_loop, "vmap": t_vmap}
        self.choices[key] = "vmap" if t_vmap < self.margin * t_loop else "loop"
        return result
