"""Valid ranges for hyperparameters, enforced by projection or rejection.

A learned hyperparameter can step out of its valid range: a learning rate below
zero, a sample weight above one. :class:`Box` states the range and what to do —
``"project"`` (clamp back, the projected-gradient step) or ``"reject"`` (raise
:class:`HyperparameterRangeError` naming the key and the offending value). NaN or
inf is never projected: it always raises :class:`~metaopt.params.NonFiniteError`,
so a broken hypergradient cannot turn silently into a NaN learning rate.

Constraints are keyed by φ's names; a key may be a glob pattern (``"lr/*"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metaopt.params import NonFiniteError, Params

__all__ = ["Box", "HyperparameterRangeError", "constrain", "constraint_for", "projection"]


class HyperparameterRangeError(ValueError):
    """A hyperparameter left its declared range and the constraint says reject."""


@dataclass(frozen=True)
class Box:
    """The interval ``[low, high]`` (either end may be open-ended: ``None``).

    Args:
        low, high: bounds; ``None`` means unbounded on that side.
        mode: ``"project"`` clamps into the box; ``"reject"`` raises.
    """

    low: float | None = None
    high: float | None = None
    mode: Literal["project", "reject"] = "project"

    def __post_init__(self) -> None:
        if self.mode not in ("project", "reject"):
            raise ValueError(f"Box mode must be 'project' or 'reject', got {self.mode!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"Box low={self.low} is above high={self.high}")

    def violations(self, value: Tensor) -> Tensor:
        """Boolean mask of the entries outside the box."""
        bad = torch.zeros_like(value, dtype=torch.bool)
        if self.low is not None:
            bad |= value < self.low
        if self.high is not None:
            bad |= value > self.high
        return bad

    def apply(self, name: str, value: Tensor) -> Tensor:
        """``value`` inside the box (projected), or raise as configured.

        The result is a new tensor without autograd history when projected, so it can
        serve as the next outer iterate.
        """
        if not bool(torch.isfinite(value).all()):
            kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
            raise NonFiniteError(f"hyperparameter '{name}' contains {kind}; refusing to "
                                 "project a non-finite value")
        bad = self.violations(value)
        if not bool(bad.any()):
            return value
        if self.mode == "reject":
            first = value.detach()[bad].reshape(-1)[0].item()
            raise HyperparameterRangeError(
                f"hyperparameter '{name}' left its range [{self.low}, {self.high}]: "
                f"{int(bad.sum())} of {value.numel()} entries outside, e.g. {first:.4g}")
        with torch.no_grad():
            return value.clamp(min=self.low, max=self.high)


def constraint_for(name: str, constraints: Mapping[str, Box]) -> Box | None:
    """The constraint whose key equals ``name`` or, failing that, the first glob matching it."""
    if name in constraints:
        return constraints[name]
    for pattern, box in constraints.items():
        if fnmatch.fnmatchcase(name, pattern):
            return box
    return None


def constrain(phi: Mapping[str, Tensor], constraints: Mapping[str, Box]) -> Params:
    """Apply each key's constraint (if any); unconstrained keys pass through unchanged.

    A constraint that matches no key of ``phi`` is an error (a typo would otherwise
    leave a hyperparameter unguarded).
    """
    for pattern in constraints:
        if pattern not in phi and not any(fnmatch.fnmatchcase(k, pattern) for k in phi):
            raise KeyError(f"constraint '{pattern}' matches no hyperparameter; "
                           f"hyperparameters are {sorted(phi)}")
    out = {}
    for k, v in phi.items():
        box = constraint_for(k, constraints)
        out[k] = v if box is None else box.apply(k, v)
    return out


def projection(constraints: Mapping[str, Box] | None) -> Callable[[Params], Params] | None:
    """The constraints as the outer loop's ``project`` argument (``None`` if there are none).

    Use it with :func:`metaopt.bilevel.hypergradient_descent`
    (``project=projection({"lr/*": Box(low=0)})``).
    """
    if not constraints:
        return None
    fixed = dict(constraints)
    return lambda phi: constrain(phi, fixed)
