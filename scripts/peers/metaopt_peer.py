"""metaopt's contender: ``metaopt.algorithms.MAML`` through its public face.

While ``metaopt.algorithms.MAML`` is not importable, :func:`resolve` hands back the plain
reference implementation as a stand-in and says so.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import reference
from .common import LossFn, MakeStep, StepFn, Tasks


def metaopt_available() -> tuple[bool, str]:
    """``(True, "")`` when ``from metaopt.algorithms import MAML`` works, else the reason."""
    try:
        from metaopt.algorithms import MAML  # noqa: F401
    except Exception as exc:  # any import-time failure means "not available"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def configured(chunk_size: int | None = None, rewrites: str | None = None) -> MakeStep:
    """metaopt's ``make_step`` with explicit settings: ``MAML(..., chunk_size=chunk_size,
    rewrites=rewrites)`` (None: the library's defaults)."""

    def make(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
        from metaopt.algorithms import MAML

        kwargs = {} if rewrites is None else {"rewrites": rewrites}
        maml = MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=False,
                    chunk_size=chunk_size, **kwargs)

        def step(tasks: Tasks) -> Tensor:
            model.zero_grad(set_to_none=True)
            loss = maml.meta_loss(*tasks, loss_fn)
            loss.backward()
            return loss.detach()

        return step

    return make


def make_step(model: nn.Module, inner_steps: int, inner_lr: float, loss_fn: LossFn) -> StepFn:
    """``MAML(model, ...).meta_loss(*tasks, loss_fn).backward()`` with the defaults."""
    return configured()(model, inner_steps, inner_lr, loss_fn)


def resolve() -> tuple[MakeStep, str]:
    """The metaopt ``make_step`` and its label, or the reference stand-in and why."""
    ok, why = metaopt_available()
    if ok:
        return make_step, "metaopt.algorithms.MAML"
    return reference.make_step, f"reference stand-in (metaopt.algorithms.MAML unavailable: {why})"
