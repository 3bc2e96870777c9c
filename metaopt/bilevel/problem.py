"""The bilevel problem, described once, and what every estimator returns.

    min_φ  F(φ) = f(θ*(φ), φ)        (outer objective)
    s.t.   θ*(φ) ≈ argmin_θ g(θ, φ)   (inner objective, solved by an optimizer)

Estimators (unrolled, implicit, first-order, F2SA, …) all take the same
:class:`BilevelProblem` and return a :class:`Hypergradient`, so switching
estimator is a one-line change. Estimators that can serve a batch of tasks
(:mod:`metaopt.bilevel.task_batch`: the MAML family) also give an :class:`Objective`:
F(φ) as a tensor whose gradient with respect to φ is their estimate, so a per-task
loop can backpropagate it task by task and ``vmap`` can differentiate it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from metaopt.optim.base import GradientTransformation
from metaopt.params import Params

__all__ = [
    "BilevelProblem",
    "Estimator",
    "Hypergradient",
    "InitialTheta",
    "Objective",
    "TaskEstimator",
]

#: Initial inner parameters: a dict, or a function of φ (MAML: θ₀ = φ).
InitialTheta = Mapping[str, Tensor] | Callable[[Params], Params]


@dataclass(frozen=True)
class BilevelProblem:
    """Inner and outer objectives plus how the inner problem is solved.

    Args:
        inner_loss: ``g(theta, phi)`` or ``g(theta, phi, batch)`` → scalar tensor.
        outer_loss: ``f(theta, phi)`` or ``f(theta, phi, batch)`` → scalar tensor.
        inner_optimizer: a :class:`GradientTransformation`, or a function of φ that
            builds one (for learned learning rates and other optimizer hyperparameters).
        inner_steps: number of inner optimizer steps K.
        inner_batches: optional ``step -> batch`` for stochastic inner objectives.
        outer_batches: optional ``step -> batch`` for stochastic outer objectives.
        name: shown in diagnostics and error messages.
    """

    inner_loss: Callable[..., Tensor]
    outer_loss: Callable[..., Tensor]
    inner_optimizer: GradientTransformation | Callable[[Params], GradientTransformation]
    inner_steps: int
    inner_batches: Callable[[int], Any] | None = None
    outer_batches: Callable[[int], Any] | None = None
    name: str = "bilevel"

    def __post_init__(self) -> None:
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"{self.name}: inner_steps must be an int >= 0, "
                             f"got {self.inner_steps!r}")
        for what in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, what)):
                raise TypeError(f"{self.name}: {what} must be callable")

    def optimizer_for(self, phi: Params) -> GradientTransformation:
        """The inner optimizer, built from φ when it is a function of φ."""
        opt = self.inner_optimizer
        return opt if isinstance(opt, GradientTransformation) else opt(phi)

    def inner_batch(self, step: int) -> Any:
        return None if self.inner_batches is None else self.inner_batches(step)

    def outer_batch(self, step: int = 0) -> Any:
        return None if self.outer_batches is None else self.outer_batches(step)

    def inner_value(self, theta: Params, phi: Params, batch: Any = None) -> Tensor:
        return _call_objective(self.inner_loss, theta, phi, batch, self.inner_batches,
                               f"{self.name}: inner_loss")

    def outer_value(self, theta: Params, phi: Params, batch: Any = None) -> Tensor:
        return _call_objective(self.outer_loss, theta, phi, batch, self.outer_batches,
                               f"{self.name}: outer_loss")


def _call_objective(fn: Callable[..., Tensor], theta: Params, phi: Params, batch: Any,
                    batches: Any, what: str) -> Tensor:
    value = fn(theta, phi, batch) if batches is not None else fn(theta, phi)
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"{what} must return a scalar, got shape {tuple(value.shape)}")
    return value


@dataclass
class Hypergradient:
    """An estimate of dF/dφ with what was learned along the way.

    Attributes:
        grad: dF/dφ, one tensor per key of φ.
        theta: the inner solution reached (detached); feed it back as θ₀ to warm-start.
        outer_loss: f(θ, φ) at that solution (detached).
        diagnostics: estimator-specific numbers (solver residual, iterations, …).
        state: estimator state to pass to the next call (F2SA's auxiliaries, …).
    """

    grad: Params
    theta: Params
    outer_loss: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    state: Any = None


class Estimator(Protocol):
    """Anything that turns a bilevel problem at φ into a :class:`Hypergradient`."""

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient: ...


@dataclass
class Objective:
    """F(φ) as a differentiable tensor, for estimators that run per task in a batch.

    Attributes:
        value: the outer loss; its gradient w.r.t. φ (by autograd, or ``torch.func``
            under ``vmap``) is the estimator's hypergradient.
        theta: the inner solution reached (may carry the autograd graph).
        diagnostics: estimator-specific numbers (empty where computing them would
            cost a host synchronisation per task).
    """

    value: Tensor
    theta: Params
    diagnostics: dict[str, Any] = field(default_factory=dict)


class TaskEstimator(Estimator, Protocol):
    """An estimator that also gives its :class:`Objective` (see the module docstring).

    ``vmappable``: whether :meth:`objective` may run under ``torch.func.vmap``
    (``functional=True``); estimators that differentiate with ``torch.autograd``
    inside (implicit, checkpointed) run only in a per-task loop.
    """

    vmappable: bool

    def objective(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta, *,
                  functional: bool = False, check_finite: bool | None = None) -> Objective: ...
