"""First-order hypergradients: drop the second-order terms of the unrolled estimate.

Inner gradients are treated as constants, so dθ_K/dφ keeps only the paths that do
not go through a Hessian. For MAML (θ₀ = φ) this is exactly FOMAML: dθ_K/dθ₀ ≈ I.
For hyperparameters inside the optimizer (e.g. a learning rate) it keeps the direct
effect of φ on each update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.bilevel.unrolled import Unrolled

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder:
    """Unrolling with stop-gradient on every inner gradient (FOMAML-style)."""

    check_finite: bool = True

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        return Unrolled(first_order=True, check_finite=self.check_finite)(
            problem, phi, theta0, state)
