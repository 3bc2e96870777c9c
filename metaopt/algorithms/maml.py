"""MAML and first-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning").

For each task: θ₀ = φ, K inner steps θ_{k+1} = θ_k − α ∇L_support(θ_k), and the
meta-objective is the mean over tasks of L_query(θ_K). Each task is a
:class:`~metaopt.bilevel.BilevelProblem` (θ₀ = φ restricted to the adapted
parameters, inner = support loss, outer = query loss) and its meta-gradient comes
from an estimator of :mod:`metaopt.bilevel`:

* :class:`~metaopt.bilevel.Unrolled` (default): second-order MAML, through the K
  inner steps; ``Unrolled(checkpoint_segment=S)`` gives the same numbers with
  memory growing like K/S + S instead of K; ``Unrolled(truncate=T)``
  differentiates only the last T steps;
* :class:`~metaopt.bilevel.FirstOrder` (``first_order=True``): FOMAML, dθ_K/dφ = I;
* :class:`~metaopt.bilevel.Implicit`: iMAML's implicit meta-gradient of the
  proximal inner objective (``proximal=λ``, see :mod:`metaopt.algorithms.imaml`).

The tasks of a meta-batch run through :class:`metaopt.bilevel.task_batch.TaskBatcher`
(per-task loop or ``vmap`` chunks within ``memory_budget``).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from metaopt.algorithms.base import LossFn, MetaLearner
from metaopt.bilevel._common import step_loss
from metaopt.bilevel.first_order import FirstOrder
from metaopt.bilevel.implicit import Implicit
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, TaskEstimator
from metaopt.bilevel.task_batch import DEFAULT_MEMORY_BUDGET
from metaopt.bilevel.unrolled import Unrolled
from metaopt.optim import GradientTransformation, sgd
from metaopt.params import Params

__all__ = ["FOMAML", "MAML"]

#: iMAML's default proximal strength λ when ``MAML`` is given an ``Implicit`` estimator.
DEFAULT_PROXIMAL = 1.0


class MAML(MetaLearner):
    """Model-agnostic meta-learning on any unmodified ``nn.Module``.

    Args:
        model: the network; its parameters are the meta-learned initialisation φ.
        inner_lr: inner SGD step size α (ignored when ``inner_optimizer`` is given).
        inner_steps: inner steps K used by :meth:`meta_loss` (and by :meth:`adapt`
            unless it is given ``steps``).
        first_order: FOMAML — drop second-order terms (the estimator ``FirstOrder()``).
        estimator: how each task's meta-gradient is estimated: ``Unrolled()``
            (default), ``Unrolled(checkpoint_segment=S)``, ``Unrolled(truncate=T)``,
            ``FirstOrder()`` or ``Implicit(...)`` (with the proximal inner objective).
        proximal: λ of the proximal term (λ/2)‖θ − φ‖² added to the support loss
            (default: none; with an ``Implicit`` estimator, λ = 1).
        inner_optimizer: a differentiable :class:`~metaopt.optim.GradientTransformation`
            for the inner loop instead of SGD.
        inner_params: names of the parameters adapted in the inner loop (default:
            all). The others stay at φ inside the inner loop but are still
            meta-learned (this is ANIL's "adapt the head only").
        strategy: ``"auto"`` (default: chosen from ``memory_budget``), ``"loop"``
            (one task at a time) or ``"vmap"`` (``torch.func.vmap`` over chunks).
        memory_budget: bytes a ``vmap`` chunk's autograd graph may take under
            ``"auto"`` (an int or a string such as ``"256MiB"``, the default). The
            first meta-batch of each input shape runs the per-task loop and measures
            one task's footprint (bytes saved for backward); later ones run ``vmap``
            over as many tasks as fit, or the loop if fewer than two fit. Models vmap
            would get wrong (second order through normalisation layers) or make slower
            (convolutions on CPU), models with modules of the user's own classes and
            estimators that run one task at a time (``Implicit``, checkpointed) always
            use the loop under ``"auto"``. See :mod:`metaopt.bilevel.task_batch`.
        chunk_size: the most tasks per ``vmap`` call (with ``"vmap"``, default the
            whole meta-batch; with ``"auto"``, a further cap on the budget's chunk).
        rewrites: exact rewrites of the model's traced forward
            (:mod:`metaopt.algorithms._trace`): ``"exact"`` (default: max-pooling before
            the ReLU that feeds it, meta-gradients bit-identical to ``functional_call``
            and to higher/TorchOpt) or ``"none"`` (the plain trace).
        trace: run models built from ``torch.nn``'s own layers as a verified
            ``torch.fx`` trace (default True; False always uses ``functional_call``).

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
                 estimator: TaskEstimator | None = None,
                 proximal: float | None = None,
                 inner_optimizer: GradientTransformation | None = None,
                 inner_params: Collection[str] | None = None,
                 strategy: str = "auto", memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
                 chunk_size: int | None = None, rewrites: str | None = None,
                 trace: bool = True) -> None:
        super().__init__(model, strategy=strategy, memory_budget=memory_budget,
                         chunk_size=chunk_size, rewrites=rewrites, trace=trace)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if inner_optimizer is None and not (isinstance(inner_lr, (int, float)) and inner_lr >= 0):
            raise ValueError(f"inner_lr must be a number >= 0, got {inner_lr!r}")
        if estimator is None:
            estimator = FirstOrder() if first_order else Unrolled()
        elif not callable(getattr(estimator, "objective", None)):
            raise TypeError(f"estimator must give a per-task objective (Unrolled, FirstOrder, "
                            f"Implicit), got {type(estimator).__name__}")
        elif first_order and not _is_first_order(estimator):
            raise ValueError(f"first_order=True conflicts with estimator "
                             f"{estimator!r}; give one of them")
        self.estimator = estimator
        if proximal is None and isinstance(estimator, Implicit):
            proximal = DEFAULT_PROXIMAL
        if proximal is not None and not proximal > 0:
            raise ValueError(f"proximal must be > 0, got {proximal!r}")
        self.proximal = None if proximal is None else float(proximal)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = _is_first_order(estimator)
        self.inner_optimizer = inner_optimizer
        self._optimizer = inner_optimizer if inner_optimizer is not None else sgd(inner_lr)
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
        inner = set(self.inner_params)
        self._fixed_names = [n for n in names if n not in inner]

    def optimizer_for(self, phi: Params) -> GradientTransformation:
        """The inner optimizer (a function of φ in subclasses such as Meta-SGD)."""
        return self._optimizer

    def inner_optimizer_of_problem(self) -> GradientTransformation | object:
        """What the task problems get as ``inner_optimizer``: the optimizer, or a
        function of φ that builds it (Meta-SGD overrides :meth:`optimizer_for`)."""
        if type(self).optimizer_for is MAML.optimizer_for:
            return self._optimizer
        return self.optimizer_for

    def strategy_key(self) -> tuple:
        return (self.model.training, self.inner_steps, self.first_order)

    @property
    def second_order(self) -> bool:
        return not self.first_order and self.inner_steps > 0

    def theta0(self, phi: Params) -> Params:
        """θ₀ = φ restricted to the adapted parameters."""
        return {k: phi[k] for k in self.inner_params}

    def _full(self, theta: Params, phi: Params) -> Params:
        """Every model parameter: the adapted ones from θ, the others from φ."""
        return {**{k: phi[k] for k in self._fixed_names}, **theta}

    def _inner_objective(self, x: Tensor, y: Tensor, loss_fn: LossFn):
        fmodel, buffers, lam = self._fmodel, self._fmodel.buffers(), self.proximal
        full = self._full

        def inner_loss(theta: Params, phi: Params) -> Tensor:
            fit = loss_fn(fmodel(full(theta, phi), x, buffers), y)
            if lam is None:
                return fit
            return fit + 0.5 * lam * sum((theta[k] - phi[k]).square().sum() for k in theta)

        return inner_loss

    def query_loss(self, theta: Params, phi: Params, x: Tensor, y: Tensor,
                   loss_fn: LossFn) -> Tensor:
        """The loss of the adapted parameters θ (with φ for the rest) on ``(x, y)``."""
        return loss_fn(self._fmodel(self._full(theta, phi), x, self._fmodel.buffers()), y)

    def problem(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor, loss_fn: LossFn) -> BilevelProblem:
        """One task: inner = support loss (+ proximal term), outer = query loss."""
        query_loss = self.query_loss

        def outer_loss(theta: Params, phi: Params) -> Tensor:
            return query_loss(theta, phi, query_x, query_y, loss_fn)

        return BilevelProblem(self._inner_objective(support_x, support_y, loss_fn), outer_loss,
                              self.inner_optimizer_of_problem(), self.inner_steps,
                              name=type(self).__name__)

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        """K inner steps of the task's inner objective on ``(x, y)`` from θ₀(φ)."""
        problem = BilevelProblem(self._inner_objective(x, y, loss_fn), _no_outer,
                                 self.inner_optimizer_of_problem(), steps,
                                 name=type(self).__name__)
        trace = unroll(step_loss(problem, phi), problem.optimizer_for(phi), self.theta0(phi),
                       steps, stop_gradient=self.first_order)
        return self._full(trace.theta, phi)


def _no_outer(theta: Params, phi: Params) -> Tensor:
    raise RuntimeError("adaptation has no outer objective")


def _is_first_order(estimator: object) -> bool:
    return isinstance(estimator, FirstOrder) or (
        isinstance(estimator, Unrolled) and estimator.first_order)


class FOMAML(MAML):
    """First-order MAML: ``MAML(..., first_order=True)``."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 **kwargs) -> None:
        if not kwargs.pop("first_order", True):
            raise ValueError("FOMAML is first-order; use MAML(first_order=False) for MAML")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
