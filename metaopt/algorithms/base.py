"""The thin stateful shell every algorithm shares.

An algorithm states, for one task, a :class:`~metaopt.bilevel.BilevelProblem`
(:meth:`MetaLearner.problem`: θ₀ from φ, the support loss inside, the query loss
outside) and picks an estimator of :mod:`metaopt.bilevel` for its meta-gradient.
The shell owns the user's module (and any extra meta-learned tensors, e.g.
Meta-SGD's learning rates), validates inputs, runs the per-task problems over the
meta-batch with :class:`metaopt.bilevel.task_batch.TaskBatcher` (per-task loop or
``vmap`` chunks, chosen from a memory budget) and returns the mean query loss with
the meta-gradient attached for ``backward()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from metaopt.algorithms._checks import check_labels, check_meta_batch, check_outputs, check_task
from metaopt.algorithms._model import NORM_LAYERS, FunctionalModel
from metaopt.bilevel.problem import BilevelProblem, TaskEstimator
from metaopt.bilevel.task_batch import (
    DEFAULT_MEMORY_BUDGET,
    TaskBatcher,
    TaskBatchResult,
    attach_gradient,
)
from metaopt.params import Params

__all__ = ["LossFn", "MetaLearner"]

#: ``loss_fn(predictions, targets) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``).
LossFn = Callable[[Tensor, Tensor], Tensor]


class MetaLearner(nn.Module):
    """Shared shell: inputs, execution, the ``meta_loss``/``adapt`` API.

    Subclasses implement :meth:`problem`, :meth:`theta0` and :meth:`adapt_task`, and
    set ``self.estimator``.

    Attributes after each :meth:`meta_loss` call:
        last_task_losses: the per-task query losses (detached, shape ``(tasks,)``).
        last_strategy: ``"loop"`` or ``"vmap"`` — how the meta-batch was run.
        last_diagnostics: per-task estimator reports where the estimator gives them
            in the loop (``Implicit``: linear-solve residual, iterations, …).
    """

    estimator: TaskEstimator

    def __init__(self, model: nn.Module, *, strategy: str = "auto",
                 memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
                 chunk_size: int | None = None, rewrites: str | None = None,
                 trace: bool = True) -> None:
        super().__init__()
        self.model = model
        self._fmodel = FunctionalModel(model, rewrites=rewrites, trace=trace)
        self._batcher = TaskBatcher(strategy, memory_budget, chunk_size)
        self._label_cache: dict = {}
        self.last_task_losses: Tensor | None = None
        self.last_strategy: str | None = None
        self.last_diagnostics: list[dict] = []

    # -- what subclasses provide -------------------------------------------------
    def outer_parameters(self) -> Params:
        """The meta-learned tensors φ by name (default: the model's parameters)."""
        return self._fmodel.parameters()

    def problem(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor, loss_fn: LossFn) -> BilevelProblem:
        """One task's bilevel problem (inner: support loss; outer: query loss)."""
        raise NotImplementedError

    def theta0(self, phi: Params) -> Params:
        """The inner loop's starting point as a function of φ."""
        raise NotImplementedError

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        """Adapted parameters for one task (differentiable w.r.t. φ if grad is on)."""
        raise NotImplementedError

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool = True,
                  functional: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The meta-objective of one task as a differentiable function of φ.

        Its gradient w.r.t. φ is the estimator's meta-gradient of that task.
        ``checks``: run data-dependent checks (finite inner losses, naming the step);
        ``functional``: running under ``torch.func.vmap`` (see
        :mod:`metaopt.bilevel.task_batch`).
        """
        problem = self.problem(support_x, support_y, query_x, query_y, loss_fn)
        objective = self.estimator.objective(problem, phi, self.theta0, functional=functional,
                                             check_finite=checks)
        if objective.diagnostics and not functional:
            self.last_diagnostics.append(objective.diagnostics)
        return objective.value

    def vmap_unsafe(self) -> str | None:
        """Why ``vmap`` must not run this problem (None: it may).

        * the estimator differentiates with ``torch.autograd`` inside (``Implicit``,
          ``Unrolled(checkpoint_segment=...)``);
        * second-order differentiation through the batching rules of BatchNorm/
          InstanceNorm (training mode) and LayerNorm gives wrong numbers in torch.func
          (pytorch/functorch#534; reproduced on torch 2.13).
        """
        if why := self._estimator_loop_only():
            return why
        if not self.second_order:
            return None
        for name, mod in self.model.named_modules():
            if (isinstance(mod, NORM_LAYERS) and mod.training) or isinstance(
                    mod, nn.LayerNorm):
                return (f"second-order gradients through {type(mod).__name__} "
                        f"('{name}') are wrong under torch.func.vmap "
                        f"(pytorch/functorch#534)")
        return None

    def _estimator_loop_only(self) -> str | None:
        if getattr(self.estimator, "vmappable", False):
            return None
        return (f"{type(self.estimator).__name__} runs one task at a time "
                f"(it differentiates with torch.autograd inside)")

    def vmap_slow(self, device: torch.device) -> str | None:
        """Why ``strategy="auto"`` keeps the loop although ``vmap`` would be correct.

        * convolutions on CPU: under ``vmap`` per-task weights become grouped
          convolutions, slower than the loop (``scripts/bench_maml_peers.py``);
        * modules of the user's own classes: only models built from ``torch.nn``'s
          modules are known to run under ``vmap`` (no in-place buffer writes, no
          data-dependent control flow). Give ``strategy="vmap"`` to use it anyway.
        """
        for name, mod in self.model.named_modules():
            if isinstance(mod, _ConvNd) and device.type == "cpu":
                return f"convolution '{name}' on CPU"
            if not type(mod).__module__.startswith("torch.nn."):
                return f"module '{name}' is a {type(mod).__name__}, not a torch.nn module"
        return None

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient differentiates through inner gradients."""
        return True

    def strategy_key(self) -> tuple:
        """Settings that change a task's memory footprint (part of the budget's cache key)."""
        return (self.model.training,)

    # -- the public API ------------------------------------------------------------
    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn) -> Tensor:
        """Mean query loss over the meta-batch; ``backward()`` gives the meta-gradient.

        All four tensors have a leading task axis: ``(tasks, examples, ...)``. The
        meta-gradient is computed here, task by task (or chunk by chunk under
        ``vmap``), and the returned scalar carries it: it behaves as a loss —
        ``backward()`` on it, on a multiple of it, or on a sum with other terms
        (a regulariser of φ, another meta-loss) accumulates the right gradient
        into the ``.grad`` of the model's parameters and other meta-learned
        tensors. It supports one ``backward()``, not higher-order differentiation.
        """
        check_meta_batch(support_x, support_y, query_x, query_y)
        self._check_outputs(support_x[0], [("support_y", support_y), ("query_y", query_y)],
                            loss_fn)
        result, phi = self._run(support_x, support_y, query_x, query_y, loss_fn)
        self.last_task_losses = result.metrics
        self.last_strategy = result.strategy
        if result.grads is None:
            return result.mean
        return attach_gradient(result.mean, phi, result.grads)

    def adapt(self, x: Tensor, y: Tensor, loss_fn: LossFn, *, steps: int | None = None,
              differentiable: bool = False) -> Params:
        """Parameters adapted to one task's data ``x: (examples, ...)``, ``y``.

        Returns every parameter of the model by name (use with :meth:`predict` or
        :func:`metaopt.functional_call`). Detached unless ``differentiable``.
        ``steps`` defaults to the training ``inner_steps``.
        """
        check_task(x, y)
        self._check_outputs(x, [("y", y)], loss_fn, task_axis=False)
        steps = self.inner_steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        phi = self.outer_parameters()
        if differentiable:
            return self.adapt_task(phi, x, y, loss_fn, steps)
        with torch.no_grad():
            adapted = self.adapt_task(phi, x, y, loss_fn, steps)
        return {k: v.detach() for k, v in adapted.items()}

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's output on ``x`` with ``params`` (e.g. from :meth:`adapt`)."""
        return self._fmodel(params, x)

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped model's output with the meta-learned (unadapted) weights."""
        return self.model(x)

    @property
    def task_footprints(self) -> dict[tuple, int]:
        """Measured bytes saved for backward by one task, per input signature."""
        return dict(self._batcher.footprints)

    # -- plumbing --------------------------------------------------------------------
    def _check_outputs(self, example: Tensor, targets: list[tuple[str, Tensor]],
                       loss_fn: LossFn, *, task_axis: bool = True) -> None:
        model_params = self._fmodel.parameters()

        def forward(x: Tensor) -> Tensor:
            return self._fmodel(model_params, x)

        check_outputs(forward, example, targets, self._label_cache, loss_fn,
                      task_axis=task_axis)
        check_labels(forward, example, targets, self._label_cache)

    def _run(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             loss_fn: LossFn) -> tuple[TaskBatchResult, Params]:
        phi = self.outer_parameters()
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in phi.values())
        self.last_diagnostics = []

        def task_fn(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *,
                    functional: bool, checks: bool) -> Tensor | tuple[Tensor, Tensor]:
            return self.task_loss(p, sx, sy, qx, qy, loss_fn, checks=checks,
                                  functional=functional)

        batcher = self._batcher
        loop_only = self.vmap_unsafe() if need_grad else self._estimator_loop_only()
        slow = self.vmap_slow(support_x.device) if batcher.strategy == "auto" else None
        result = batcher.run(task_fn, phi, (support_x, support_y, query_x, query_y),
                             need_grad=need_grad, key=self.strategy_key(),
                             loop_only=loop_only, vmap_slow=slow)
        return result, phi
