"""Plumbing shared by the estimators: preparing φ, resolving θ₀, collecting dφ."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, InitialTheta
from metaopt.params import NonFiniteError, Params

__all__ = ["collect_grad", "initial_theta", "outer_leaves", "step_loss"]


def outer_leaves(phi: Mapping[str, Tensor]) -> Params:
    """φ as tensors that require grad.

    Tensors already requiring grad are used as they are (so a θ₀ built from them
    stays connected); others become fresh leaves.
    """
    if not phi:
        raise ValueError("phi (the outer parameters) is empty")
    out = {}
    for k, v in phi.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"outer parameter '{k}' is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise TypeError(f"outer parameter '{k}' has dtype {v.dtype}; it must be floating")
        out[k] = v if v.requires_grad else v.detach().requires_grad_()
    return out


def initial_theta(theta0: InitialTheta, phi: Params) -> Params:
    """θ₀ as a dict: called with φ when it is a function of φ (MAML: θ₀ = φ)."""
    theta = theta0(phi) if callable(theta0) else dict(theta0)
    if not theta:
        raise ValueError("theta0 (the initial inner parameters) is empty")
    return theta


def step_loss(problem: BilevelProblem, phi: Params):
    """The inner objective as ``loss(theta, step)`` with the problem's minibatches."""

    def loss(theta: Params, step: int) -> Tensor:
        return problem.inner_value(theta, phi, problem.inner_batch(step))

    return loss


def collect_grad(outer: Tensor, phi: Params, *, retain_graph: bool = False,
                 what: str = "hypergradient") -> Params:
    """dF/dφ by reverse mode; zeros for φ entries the outer loss does not depend on."""
    keys = list(phi)
    if not outer.requires_grad:  # F does not depend on φ along any differentiated path
        return {k: torch.zeros_like(v) for k, v in phi.items()}
    grads = torch.autograd.grad(outer, [phi[k] for k in keys], allow_unused=True,
                                retain_graph=retain_graph)
    out = {}
    for k, g in zip(keys, grads):
        g = torch.zeros_like(phi[k]) if g is None else g.detach()
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(f"{what} for outer parameter '{k}' contains NaN/inf")
        out[k] = g
    return out
