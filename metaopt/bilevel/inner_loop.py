"""The inner loop: running an inner optimizer for K steps, differentiably or not.

This is the one implementation of "unrolling" in metaopt (the primitive; the
estimator that differentiates through it is :mod:`metaopt.bilevel.unrolled`). Every
estimator calls :func:`unroll`. It is a pure function of tensors, so it runs under
``torch.func.vmap`` over a meta-batch: the caller that vmaps (the task batching of
:mod:`metaopt.bilevel.task_batch`) passes ``functional=True``, which takes inner
gradients with ``torch.func`` instead of ``torch.autograd``, and
``check_finite=False`` (a data-dependent check cannot run under vmap).

Inner gradients stay connected to the outer autograd graph (θ₀ and φ), which is
what second-order meta-gradients need (see :func:`inner_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaopt.optim.base import GradientTransformation, State, apply_updates
from metaopt.params import NonFiniteError, Params

__all__ = ["InnerTrace", "inner_gradient", "unroll"]

#: ``loss_fn(theta, step) -> scalar``: the inner objective at inner step ``step``.
StepLoss = Callable[[Params, int], Tensor]


@dataclass
class InnerTrace:
    """Where an inner run ended.

    ``theta`` and ``opt_state`` carry the autograd graph when the run was
    differentiable; ``losses`` are the detached inner losses, one per step.
    """

    theta: Params
    opt_state: State
    losses: list[Tensor] = field(default_factory=list)


def inner_gradient(loss_fn: StepLoss, theta: Params, step: int, *,
                   stop_gradient: bool = False,
                   functional: bool = False) -> tuple[Params, Tensor]:
    """∇θ of the inner loss at ``theta`` and the loss itself.

    The gradient stays connected to the outer autograd graph (through θ and
    anything ``loss_fn`` closes over) when grad mode is on, which second-order
    meta-gradients need. With ``stop_gradient`` it is treated as a constant — the
    first-order (FOMAML-style) approximation. ``functional=True`` (required inside
    ``torch.func`` transforms such as ``vmap`` over a meta-batch) uses
    ``torch.func.grad_and_value``; the default uses ``torch.autograd.grad``.
    """
    if functional:
        grads, loss = torch.func.grad_and_value(lambda th: loss_fn(th, step))(dict(theta))
        if stop_gradient:
            grads = {k: g.detach() for k, g in grads.items()}
        return grads, loss
    create_graph = torch.is_grad_enabled() and not stop_gradient
    with torch.enable_grad():
        th = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
        loss = loss_fn(th, step)
        keys = list(th)
        gs = torch.autograd.grad(loss, [th[k] for k in keys], create_graph=create_graph,
                                 allow_unused=True)
    grads = {k: torch.zeros_like(th[k]) if g is None else g for k, g in zip(keys, gs)}
    if not torch.is_grad_enabled():
        loss = loss.detach()
    return grads, loss


def _step(loss_fn: StepLoss, optimizer: GradientTransformation, theta: Params,
          opt_state: State, step: int, stop_gradient: bool, functional: bool
          ) -> tuple[Params, State, Tensor]:
    grads, loss = inner_gradient(loss_fn, theta, step, stop_gradient=stop_gradient,
                                 functional=functional)
    if optimizer.needs_loss:
        updates, opt_state = optimizer.update(grads, opt_state, theta, loss=loss)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, theta)
    return apply_updates(theta, updates), opt_state, loss


def _check_step(loss: Tensor, theta: Params, step: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise NonFiniteError(f"inner loss is {float(loss.detach())} at inner step {step}")
    if not theta:
        return
    total = torch.stack([v.detach().sum() for v in theta.values()]).sum()
    if not bool(torch.isfinite(total)):
        for k, v in theta.items():
            if not bool(torch.isfinite(v).all()):
                kind = "NaN" if bool(torch.isnan(v).any()) else "inf"
                raise NonFiniteError(
                    f"{kind} in inner parameter '{k}' after inner step {step}")


def unroll(loss_fn: StepLoss, optimizer: GradientTransformation, theta: Params,
           steps: int, *, opt_state: State | None = None, start: int = 0,
           stop_gradient: bool = False, check_finite: bool = True,
           functional: bool = False) -> InnerTrace:
    """Run ``steps`` optimizer steps on ``loss_fn`` from ``theta``.

    Args:
        loss_fn: inner objective ``loss_fn(theta, step)``.
        optimizer: a differentiable :class:`GradientTransformation`.
        theta: initial inner parameters (may be part of an outer graph).
        steps: number of steps to take.
        opt_state: optimizer state to continue from (default: ``optimizer.init``).
        start: index of the first step (passed to ``loss_fn``; for minibatch schedules).
        stop_gradient: treat inner gradients as constants (first-order approximation).
        check_finite: raise :class:`NonFiniteError` naming the step and tensor if
            a NaN/inf appears (turn off under ``vmap``).
        functional: take inner gradients with ``torch.func`` (set it when calling
            from inside a ``torch.func`` transform such as ``vmap``).

    Whether the result is differentiable follows autograd's usual rules: run it under
    ``torch.no_grad()`` for a plain (non-differentiable) inner solve. (For bounded
    memory, :class:`~metaopt.bilevel.Unrolled` recomputes segments of this function.)
    """
    theta = dict(theta)
    if opt_state is None:
        opt_state = optimizer.init(theta)
    losses: list[Tensor] = []
    for k in range(start, start + steps):
        theta, opt_state, loss = _step(loss_fn, optimizer, theta, opt_state, k, stop_gradient,
                                       functional)
        losses.append(loss.detach())
        if check_finite:
            _check_step(loss, theta, k)
    return InnerTrace(theta, opt_state, losses)
