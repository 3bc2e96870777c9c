"""BOME: a first-order, value-function method (Ye, Liu, Wright, Stone & Liu 2022,
"BOME! Bilevel Optimization Made Easy: A Simple First-Order Approach").

The bilevel problem is rewritten as a single-level one with a constraint,

    min_{φ,θ} f(θ, φ)   s.t.   q(θ, φ) = g(θ, φ) − g(θ*(φ), φ) ≤ 0,

where θ*(φ) is approximated by T steps of the inner optimizer from the current
iterate: θ̂ = θ_k^{(T)}. With θ̂ held constant (Danskin), ∇q needs only first-order
oracles: ∇_θ q = ∇_θ g(θ_k, φ), ∇_φ q = ∇_φ g(θ_k, φ) − ∇_φ g(θ̂, φ).
The joint direction over (φ, θ) is ``d = ∇f + λ ∇q`` with the dynamic barrier

    λ = max((η‖∇q‖² − ⟨∇f, ∇q⟩) / ‖∇q‖², 0),

which is the smallest λ for which ⟨d, ∇q⟩ ≥ η‖∇q‖² (so q decreases at rate η).

Interface: like every estimator, ``BOME(...)(problem, phi, theta0, state)`` returns
a :class:`Hypergradient` whose ``grad`` is d's φ-part — the outer optimizer steps φ
along it. BOME also moves θ: it steps θ_{k+1} = θ_k − ``theta_lr``·d_θ itself and
carries θ_{k+1} in ``state`` (pass ``state=previous.state`` back on each call; the
first call starts from ``theta0``). ``Hypergradient.theta`` is θ̂, the inner
approximation at the current φ. Only gradients are used: no Hessian products.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import initial_theta, outer_leaves, step_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta
from metaopt.params import (
    NonFiniteError,
    Params,
    check_finite,
    tree_detach,
    tree_dot,
    tree_requires_grad,
)

__all__ = ["BOME"]


@dataclass(frozen=True)
class BOME:
    """The BOME estimator (first-order, value-function based, dynamic barrier).

    Args:
        theta_lr: step size BOME uses for its own θ update (ξ in the paper for θ; the
            φ step size is the outer optimizer's).
        eta: barrier coefficient η > 0 (the paper's default is 0.5).
        inner_steps: T, inner steps for θ̂ (None: the problem's ``inner_steps``).
    """

    theta_lr: float
    eta: float = 0.5
    inner_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.theta_lr > 0:
            raise ValueError(f"BOME theta_lr must be > 0, got {self.theta_lr}")
        if not self.eta > 0:
            raise ValueError(f"BOME eta must be > 0, got {self.eta}")
        if self.inner_steps is not None and self.inner_steps < 0:
            raise ValueError(f"BOME inner_steps must be >= 0, got {self.inner_steps}")

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        phi = {k: v.detach() for k, v in outer_leaves(phi).items()}
        if state is not None and "theta" in state:
            theta_k = tree_detach(state["theta"])
        else:
            theta_k = tree_detach(initial_theta(theta0, phi))
        T = problem.inner_steps if self.inner_steps is None else self.inner_steps
        optimizer = problem.optimizer_for(phi)
        with torch.no_grad():
            trace = unroll(step_loss(problem, phi), optimizer, theta_k, T, stop_gradient=True)
        theta_hat = tree_detach(trace.theta)

        batch = problem.inner_batch(0)
        th = tree_requires_grad(theta_k)
        ph = tree_requires_grad(phi)
        grad_f = _grads(problem.outer_value(th, ph, problem.outer_batch(0)), ph, th)
        g_here = problem.inner_value(th, ph, batch)
        g_hat = problem.inner_value(theta_hat, ph, batch)
        grad_q = _grads(g_here - g_hat, ph, th)
        check_finite(grad_q, "in BOME's ∇q")
        check_finite(grad_f, "in BOME's ∇f")

        q_sq = tree_dot(grad_q, grad_q)
        f_dot_q = tree_dot(grad_f, grad_q)
        if float(q_sq) > 0.0:
            lam = torch.clamp((self.eta * q_sq - f_dot_q) / q_sq, min=0.0)
        else:
            lam = torch.zeros_like(q_sq)
        direction = {k: grad_f[k] + lam * grad_q[k] for k in grad_f}
        grad_phi = {k: direction[f"phi:{k}"] for k in phi}
        theta_next = {k: theta_k[k] - self.theta_lr * direction[f"theta:{k}"] for k in theta_k}
        if not all(bool(torch.isfinite(v).all()) for v in theta_next.values()):
            raise NonFiniteError("BOME's θ update produced NaN/inf; lower theta_lr")
        with torch.no_grad():
            q_value = float(g_here - g_hat)
            outer = problem.outer_value(theta_hat, phi, problem.outer_batch(0))
        return Hypergradient(
            grad=grad_phi,
            theta=theta_hat,
            outer_loss=outer.detach(),
            diagnostics={
                "estimator": "bome",
                "inner_steps": T,
                "lambda": float(lam),
                "q": q_value,
                "grad_q_norm": float(q_sq.sqrt()),
                "final_inner_loss": float(trace.losses[-1]) if trace.losses else float("nan"),
            },
            state={"theta": theta_next},
        )


def _grads(value: Tensor, phi: Params, theta: Params) -> Params:
    """∇ of ``value`` w.r.t. φ and θ, keyed ``phi:<k>`` / ``theta:<k>`` (zeros if unused)."""
    keys = [("phi", k, v) for k, v in phi.items()] + [("theta", k, v) for k, v in theta.items()]
    if not value.requires_grad:
        return {f"{w}:{k}": torch.zeros_like(v) for w, k, v in keys}
    gs = torch.autograd.grad(value, [v for _, _, v in keys], allow_unused=True)
    return {f"{w}:{k}": (torch.zeros_like(v) if g is None else g.detach())
            for (w, k, v), g in zip(keys, gs)}

