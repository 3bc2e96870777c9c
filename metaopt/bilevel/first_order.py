"""First-order hypergradients: drop the second-order terms of the unrolled estimate.

Inner gradients are treated as constants, so dθ_K/dφ keeps only the paths that do
not go through a Hessian. For MAML (θ₀ = φ) this is exactly FOMAML: dθ_K/dθ₀ ≈ I.
For hyperparameters inside the optimizer (e.g. a learning rate) it keeps the direct
effect of φ on each update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta, Objective
from metaopt.bilevel.unrolled import Unrolled
from metaopt.params import Params

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder:
    """Unrolling with stop-gradient on every inner gradient (FOMAML-style)."""

    check_finite: bool = True
    vmappable: bool = field(default=True, init=False)

    @property
    def unrolled(self) -> Unrolled:
        """The same estimate as :class:`Unrolled` with ``first_order=True``."""
        return Unrolled(first_order=True, check_finite=self.check_finite)

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        return self.unrolled(problem, phi, theta0, state)

    def objective(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta, *,
                  functional: bool = False, check_finite: bool | None = None) -> Objective:
        """F(φ) whose gradient is the first-order estimate (see :meth:`Unrolled.objective`)."""
        return self.unrolled.objective(problem, phi, theta0, functional=functional,
                                       check_finite=check_finite)
