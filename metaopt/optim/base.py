"""Optimizers as pairs of pure functions over parameter dicts (optax-style).

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``
never mutate their inputs, so the same optimizer can be unrolled and differentiated
through, run under ``torch.func.vmap`` over tasks, and recomputed inside
``torch.utils.checkpoint``. States are dicts of tensors (and dicts of such), so they
serialise to safetensors without pickling.

Hyperparameters (learning rate, momentum, betas, weight decay) may be Python floats,
scalar tensors, or dicts mapping parameter names to tensors broadcastable to that
parameter; tensors that require grad receive hypergradients through ``update``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from metaopt.params import Params, StructureError

Hyper = float | Tensor | Mapping[str, Tensor | float]
State = dict[str, Any]

__all__ = [
    "GradientTransformation",
    "Hyper",
    "State",
    "apply_updates",
    "chain",
    "hyper_for",
    "validate_hyper",
]


class GradientTransformation(NamedTuple):
    """A differentiable optimizer: ``init`` builds state, ``update`` maps grads to updates.

    ``needs_loss``: the optimizer also reads the current loss (learned optimizers with
    loss features, e.g. VeLO). Its ``update`` is then called as
    ``update(grads, state, params, loss=loss)`` by every inner loop in metaopt; plain
    optimizers keep the three-argument form.
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]
    needs_loss: bool = False


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates`` leaf-wise (updates already carry the minus sign)."""
    return {k: p + updates[k] for k, p in params.items()}


def hyper_for(h: Hyper, name: str) -> float | Tensor:
    """The value of hyperparameter ``h`` for the parameter called ``name``."""
    if isinstance(h, Mapping):
        try:
            return h[name]
        except KeyError:
            raise StructureError(
                f"per-parameter hyperparameter has no entry for parameter '{name}' "
                f"(it has {sorted(h)})"
            ) from None
    return h


def validate_hyper(h: Hyper, what: str, *, low: float = 0.0, high: float | None = None,
                   inclusive_high: bool = True) -> None:
    """Reject an out-of-range hyperparameter given as a Python number, naming it.

    Tensor-valued hyperparameters are learned and are checked (or projected) by the
    code that learns them; a plain number is a user's typo and fails at construction.
    """
    values = h.values() if isinstance(h, Mapping) else [h]
    for v in values:
        if isinstance(v, (int, float)):
            bad = v < low or (high is not None and (v > high if inclusive_high else v >= high))
            if bad:
                bound = f"[{low}, {high}{']' if inclusive_high else ')'}" if high else f">= {low}"
                raise ValueError(f"{what} must be {bound}, got {v}")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transformations left to right; each sees the previous one's updates."""

    def init(params: Params) -> State:
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        new_state = {}
        for i, t in enumerate(transforms):
            grads, new_state[str(i)] = t.update(grads, state[str(i)], params)
        return grads, new_state

    return GradientTransformation(init, update)
