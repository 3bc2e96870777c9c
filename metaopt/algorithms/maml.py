"""MAML and first-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning").

For each task: θ₀ = φ, K inner steps θ_{k+1} = θ_k − α ∇L_support(θ_k), and the
meta-objective is the mean over tasks of L_query(θ_K). Second-order MAML
differentiates through the inner gradients (Hessian-vector products); FOMAML
(``first_order=True``) treats them as constants, so dθ_K/dφ = I.

The inner loop is :func:`metaopt.bilevel.unroll` — the one unrolling
implementation — with the differentiable SGD of :mod:`metaopt.optim` (or any
other inner optimizer you pass).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from metaopt.algorithms.base import LossFn, MetaLearner
from metaopt.bilevel.unroll import unroll
from metaopt.optim import GradientTransformation, sgd
from metaopt.params import Params

__all__ = ["FOMAML", "MAML"]


class MAML(MetaLearner):
    """Model-agnostic meta-learning on any unmodified ``nn.Module``.

    Args:
        model: the network; its parameters are the meta-learned initialisation φ.
        inner_lr: inner SGD step size α (ignored when ``inner_optimizer`` is given).
        inner_steps: inner steps K used by :meth:`meta_loss` (and by :meth:`adapt`
            unless it is given ``steps``).
        first_order: FOMAML — drop second-order terms.
        inner_optimizer: a differentiable :class:`~metaopt.optim.GradientTransformation`
            for the inner loop instead of SGD.
        inner_params: names of the parameters adapted in the inner loop (default:
            all). The others stay at φ inside the inner loop but are still
            meta-learned (this is ANIL's "adapt the head only").
        strategy: ``"auto"`` (the fastest way within the memory budget
            ``chunk_size``), ``"loop"`` (one task at a time) or ``"vmap"``.
        chunk_size: the memory knob — how many tasks' autograd graphs may be alive
            at once. With ``"auto"`` the default is one task (the per-task loop, the
            memory of higher/learn2learn/TorchOpt); ``chunk_size=n`` lets ``auto``
            time ``vmap`` over chunks of ``n`` tasks against the loop and keep the
            faster (on the sinusoid MLP, ``n`` = the meta-batch is 2-7x faster
            at 9-65x the peak memory). With ``"vmap"``: tasks per vmap call
            (default: the whole meta-batch).
        rewrites: speed rewrites of the model's traced forward
            (:mod:`metaopt.algorithms._rewrites`): ``"exact"`` (default, unless
            ``METAOPT_GRAPH_REWRITES`` says otherwise: meta-gradients bit-identical to
            ``functional_call`` and to higher/TorchOpt/learn2learn), ``"all"`` (adds
            im2col-GEMM thin convolutions: ~0.7x the time of a conv MAML meta-step with
            one inner step on CPU, meta-gradients equal up to float32 rounding, which
            the second-order unroll amplifies to ~1e-4-4e-3 relative) or ``"none"``.

    Example::

        maml = MAML(model, inner_lr=0.4, inner_steps=1)
        loss = maml.meta_loss(support_x, support_y, query_x, query_y, F.cross_entropy)
        loss.backward()                      # meta-gradient in model's .grad
        outer_opt.step()
        adapted = maml.adapt(x, y, F.cross_entropy)
        logits = maml.predict(adapted, x_test)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, *,
                 inner_optimizer: GradientTransformation | None = None,
                 inner_params: Collection[str] | None = None,
                 strategy: str = "auto", chunk_size: int | None = None,
                 rewrites: str | None = None) -> None:
        super().__init__(model, strategy=strategy, chunk_size=chunk_size, rewrites=rewrites)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if inner_optimizer is None and not (isinstance(inner_lr, (int, float)) and inner_lr >= 0):
            raise ValueError(f"inner_lr must be a number >= 0, got {inner_lr!r}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = bool(first_order)
        self.inner_optimizer = inner_optimizer
        names = self._fmodel.param_names
        if inner_params is None:
            self.inner_params = list(names)
        else:
            unknown = sorted(set(inner_params) - set(names))
            if unknown:
                raise ValueError(f"inner_params {unknown} are not parameters of "
                                 f"{type(model).__name__} (it has {names})")
            self.inner_params = [n for n in names if n in set(inner_params)]
            if not self.inner_params:
                raise ValueError("inner_params is empty: nothing would be adapted")

    def optimizer_for(self, phi: Params) -> GradientTransformation:
        """The inner optimizer (a function of φ in subclasses such as Meta-SGD)."""
        return self.inner_optimizer if self.inner_optimizer is not None else sgd(self.inner_lr)

    def strategy_key(self) -> tuple:
        return (self.model.training, self.inner_steps, self.first_order)

    @property
    def second_order(self) -> bool:
        return not self.first_order and self.inner_steps > 0

    def _unroll(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn, steps: int,
                checks: bool) -> Params:
        fixed = {k: v for k, v in phi.items() if k not in self.inner_params
                 and k in self._fmodel.param_names}
        fmodel = self._fmodel
        buffers = fmodel.buffers()

        def inner(theta: Params, step: int) -> Tensor:
            return loss_fn(fmodel({**fixed, **theta}, x, buffers), y)

        theta0 = {k: phi[k] for k in self.inner_params}
        trace = unroll(inner, self.optimizer_for(phi), theta0, steps,
                       stop_gradient=self.first_order, check_finite=checks)
        return {**fixed, **trace.theta}

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool) -> Tensor:
        theta = self._unroll(phi, support_x, support_y, loss_fn, self.inner_steps, checks)
        return loss_fn(self._fmodel(theta, query_x), query_y)

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        return self._unroll(phi, x, y, loss_fn, steps, checks=True)


class FOMAML(MAML):
    """First-order MAML: ``MAML(..., first_order=True)``."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 **kwargs) -> None:
        if not kwargs.pop("first_order", True):
            raise ValueError("FOMAML is first-order; use MAML(first_order=False) for MAML")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
