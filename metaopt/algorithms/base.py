"""The thin stateful shell every algorithm shares.

An algorithm is a pure per-task function (``task_loss``) of the meta-learned
tensors φ and one task's ``(support_x, support_y, query_x, query_y)``. The shell
owns the user's module (and any extra meta-learned tensors, e.g. Meta-SGD's
learning rates), validates inputs, runs the per-task function over the meta-batch
(loop or ``vmap``, see :mod:`metaopt.algorithms._execution`) and returns the mean
query loss with the meta-gradient attached for ``backward()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from metaopt.algorithms._checks import check_labels, check_meta_batch, check_task
from metaopt.algorithms._execution import MetaBatchResult, StrategyChooser, attach_gradient
from metaopt.algorithms._model import FunctionalModel
from metaopt.params import Params

__all__ = ["LossFn", "MetaLearner"]

#: ``loss_fn(predictions, targets) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``).
LossFn = Callable[[Tensor, Tensor], Tensor]


class MetaLearner(nn.Module):
    """Shared shell: inputs, strategy, the ``meta_loss``/``adapt`` API.

    Subclasses implement :meth:`task_loss` (one task, pure) and :meth:`adapt_task`.

    Attributes after each :meth:`meta_loss` call:
        last_task_losses: the per-task query losses (detached, shape ``(tasks,)``).
        last_strategy: ``"loop"`` or ``"vmap"`` — how the meta-batch was run.
    """

    def __init__(self, model: nn.Module, *, strategy: str = "auto",
                 chunk_size: int | None = None, rewrites: str | None = None) -> None:
        super().__init__()
        self.model = model
        self._fmodel = FunctionalModel(model, rewrites=rewrites)
        self._chooser = StrategyChooser(strategy, chunk_size=chunk_size)
        self._label_cache: dict = {}
        self.last_task_losses: Tensor | None = None
        self.last_strategy: str | None = None

    # -- what subclasses provide -------------------------------------------------
    def outer_parameters(self) -> Params:
        """The meta-learned tensors φ by name (default: the model's parameters)."""
        return self._fmodel.parameters()

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool) -> Tensor:
        """The query loss of one task as a differentiable function of φ.

        ``checks``: run data-dependent checks (finite inner losses and parameters,
        naming the step and tensor). False under ``vmap``, where they cannot run, and
        in the loop's fast pass, which checks the results itself and re-runs a
        failing task with checks on (see :func:`~metaopt.algorithms._execution.run_loop`).
        """
        raise NotImplementedError

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        """Adapted parameters for one task (differentiable w.r.t. φ if grad is on)."""
        raise NotImplementedError

    def strategy_key(self) -> tuple:
        """Settings that change the cost of a meta-batch (part of the timing cache key)."""
        return (self.model.training,)

    def vmap_unsafe(self) -> str | None:
        """Why ``vmap`` must not run this model now (None: it may).

        Second-order differentiation through the batching rules of BatchNorm/
        InstanceNorm (training mode) and LayerNorm gives wrong numbers in
        torch.func (pytorch/functorch#534; reproduced on torch 2.13), so those
        models always run in the per-task loop when the algorithm differentiates
        through inner gradients.
        """
        if not self.second_order:
            return None
        for name, mod in self.model.named_modules():
            if (isinstance(mod, _NormBase) and mod.training) or isinstance(
                    mod, nn.LayerNorm):
                return (f"second-order gradients through {type(mod).__name__} "
                        f"('{name}') are wrong under torch.func.vmap "
                        f"(pytorch/functorch#534)")
        return None

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient differentiates through inner gradients."""
        return True

    # -- the public API ------------------------------------------------------------
    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn) -> Tensor:
        """Mean query loss over the meta-batch; ``backward()`` gives the meta-gradient.

        All four tensors have a leading task axis: ``(tasks, examples, ...)``. The
        returned scalar carries the meta-gradient computed task by task (or chunk
        by chunk under ``vmap``); calling ``backward()`` on it (or on anything it is
        scaled/summed into) accumulates that gradient into the ``.grad`` of the
        model's parameters and of any other meta-learned tensors. It does not
        support higher-order differentiation.
        """
        check_meta_batch(support_x, support_y, query_x, query_y)
        self._check_labels(support_x[0], [("support_y", support_y), ("query_y", query_y)])
        result = self._run(support_x, support_y, query_x, query_y, loss_fn)
        return self._finish(result)

    def adapt(self, x: Tensor, y: Tensor, loss_fn: LossFn, *, steps: int | None = None,
              differentiable: bool = False) -> Params:
        """Parameters adapted to one task's data ``x: (examples, ...)``, ``y``.

        Returns every parameter of the model by name (use with :meth:`predict` or
        :func:`metaopt.functional_call`). Detached unless ``differentiable``.
        ``steps`` defaults to the training ``inner_steps``.
        """
        check_task(x, y)
        self._check_labels(x, [("y", y)])
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

    # -- plumbing --------------------------------------------------------------------
    def _check_labels(self, example: Tensor, labels: list[tuple[str, Tensor]]) -> None:
        model_params = self._fmodel.parameters()
        check_labels(lambda x: self._fmodel(model_params, x), example, labels,
                     self._label_cache)

    def _need_grad(self, phi: Params) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in phi.values())

    def _run(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             loss_fn: LossFn) -> MetaBatchResult:
        phi = self.outer_parameters()
        need_grad = self._need_grad(phi)

        def task_fn(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *,
                    checks: bool) -> Tensor:
            return self.task_loss(p, sx, sy, qx, qy, loss_fn, checks=checks)

        result = self._chooser.run(task_fn, phi, (support_x, support_y, query_x, query_y),
                                   need_grad=need_grad, extra_key=self.strategy_key(),
                                   vmap_unsafe=self.vmap_unsafe if need_grad else None)
        result.extras["phi"] = phi
        return result

    def _finish(self, result: MetaBatchResult) -> Tensor:
        self.last_task_losses = result.metrics
        self.last_strategy = result.strategy
        value = result.mean
        if result.grads is None:
            return value
        return attach_gradient(value, result.extras["phi"], result.grads)

    @property
    def strategy_timings(self) -> dict:
        """Seconds measured per strategy, per input signature (``strategy="auto"``)."""
        return dict(self._chooser.timings)
