"""Unrolled hypergradients: backpropagate through K inner optimizer steps.

Full unrolling is exact for the K-step inner solver (not for the limit θ*).
``truncate=T`` differentiates only the last T steps (Shaban et al. 2019, truncated
back-propagation). ``checkpoint_segment=S`` keeps only the inner state at every S-th
step during the forward pass and, going backwards, recomputes one segment at a time
and pulls the adjoint through it with a vector-Jacobian product, so peak memory grows
like K/S + S instead of K for about one extra forward pass. The numbers are the same
as plain unrolling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import collect_grad, initial_theta, outer_leaves, step_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta, Objective
from metaopt.bilevel.task_batch import attach_gradient
from metaopt.params import NonFiniteError, Params, tree_detach
from metaopt.tree import tree_leaves, tree_map_nested, tree_rebuild

__all__ = ["Unrolled"]


@dataclass(frozen=True)
class Unrolled:
    """Reverse-mode differentiation through the inner optimization.

    Args:
        truncate: differentiate only the last ``truncate`` inner steps (None: all).
        checkpoint_segment: recompute segments of this many steps in backward.
        first_order: treat inner gradients as constants (see :class:`FirstOrder`).
        check_finite: stop with the step and tensor named when NaN/inf appears.

    As a per-task estimator (:meth:`objective`, used by the MAML family through
    :mod:`metaopt.bilevel.task_batch`) it runs under ``vmap`` except with
    ``checkpoint_segment``, whose backward is its own.
    """

    truncate: int | None = None
    checkpoint_segment: int | None = None
    first_order: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.truncate is not None and self.truncate < 0:
            raise ValueError(f"truncate must be >= 0, got {self.truncate}")
        if self.checkpoint_segment is not None and self.checkpoint_segment < 1:
            raise ValueError(f"checkpoint_segment must be >= 1, got {self.checkpoint_segment}")

    @property
    def vmappable(self) -> bool:
        """Whether :meth:`objective` runs under ``torch.func.vmap``."""
        return self.checkpoint_segment is None

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        phi = outer_leaves(phi)
        grad, outer, final_theta, losses = self._hypergradient(problem, phi, theta0,
                                                               self.check_finite)
        return Hypergradient(
            grad=grad,
            theta=tree_detach(final_theta),
            outer_loss=outer.detach(),
            diagnostics=self._diagnostics(problem, losses),
            state=state,
        )

    def objective(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta, *,
                  functional: bool = False, check_finite: bool | None = None) -> Objective:
        """F(φ) whose gradient is this estimate (φ: tensors, e.g. leaves that require grad).

        Plain and truncated unrolling return the outer loss with its autograd graph
        (``functional=True`` inside ``torch.func.vmap``); the checkpointed estimate is
        computed here and attached to the returned value (one backward, see
        :func:`~metaopt.bilevel.task_batch.attach_gradient`).
        """
        checks = self.check_finite if check_finite is None else check_finite
        if self.checkpoint_segment is None or not torch.is_grad_enabled():
            outer, theta, _ = self._forward(problem, phi, theta0, checks, functional)
            return Objective(outer, theta)
        if functional:
            raise ValueError("Unrolled(checkpoint_segment=...) cannot run under "
                             "torch.func.vmap; run tasks in a loop")
        grad, outer, theta, losses = self._hypergradient(problem, phi, theta0, checks)
        return Objective(attach_gradient(outer, phi, grad), theta,
                         self._diagnostics(problem, losses))

    def _diagnostics(self, problem: BilevelProblem, losses: list[Tensor]) -> dict[str, Any]:
        K = problem.inner_steps
        return {"estimator": "first_order" if self.first_order else "unrolled",
                "inner_steps": K,
                "differentiated_steps": K if self.truncate is None else min(self.truncate, K),
                "final_inner_loss": float(losses[-1]) if losses else float("nan")}

    def _prefix(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta,
                checks: bool, functional: bool) -> tuple[Params, Any, list[Tensor], int, int]:
        """θ₀, and the K − T undifferentiated steps of truncated unrolling."""
        theta = initial_theta(theta0, phi)
        K = problem.inner_steps
        T = K if self.truncate is None else min(self.truncate, K)
        if K - T == 0:
            return theta, None, [], K, T
        with torch.no_grad():
            prefix = unroll(step_loss(problem, phi), problem.optimizer_for(phi), theta, K - T,
                            check_finite=checks, stop_gradient=True, functional=functional)
        return (tree_detach(prefix.theta), tree_map_nested(torch.Tensor.detach, prefix.opt_state),
                prefix.losses, K, T)

    def _forward(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta,
                 checks: bool, functional: bool) -> tuple[Tensor, Params, list[Tensor]]:
        """The outer loss after K inner steps, differentiable through the last T."""
        theta, opt_state, losses, K, T = self._prefix(problem, phi, theta0, checks, functional)
        trace = unroll(step_loss(problem, phi), problem.optimizer_for(phi), theta, T,
                       opt_state=opt_state, start=K - T, stop_gradient=self.first_order,
                       check_finite=checks, functional=functional)
        outer = problem.outer_value(trace.theta, phi, problem.outer_batch(0))
        return outer, trace.theta, losses + trace.losses

    def _hypergradient(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta,
                       checks: bool) -> tuple[Params, Tensor, Params, list[Tensor]]:
        if self.checkpoint_segment is None:
            outer, theta, losses = self._forward(problem, phi, theta0, checks, False)
            return collect_grad(outer, phi), outer.detach(), theta, losses
        theta, opt_state, losses, K, T = self._prefix(problem, phi, theta0, checks, False)
        if T == 0:
            outer = problem.outer_value(theta, phi, problem.outer_batch(0))
            return collect_grad(outer, phi), outer.detach(), theta, losses
        grad, outer, theta, seg_losses = self._checkpointed(
            problem, phi, theta, problem.optimizer_for(phi), step_loss(problem, phi), K - T, T,
            opt_state, checks)
        return grad, outer, theta, losses + seg_losses

    def _checkpointed(self, problem: BilevelProblem, phi: Params, theta: Params, optimizer: Any,
                      loss_fn: Any, start: int, steps: int, opt_state: Any, checks: bool
                      ) -> tuple[Params, Tensor, Params, list[Tensor]]:
        """Reverse mode through ``steps`` inner steps, storing only segment boundaries."""
        S = self.checkpoint_segment
        phi_keys = list(phi)
        theta_keys = list(theta)
        th = tree_detach(theta)
        st = (optimizer.init(th) if opt_state is None
              else tree_map_nested(torch.Tensor.detach, opt_state))
        boundaries = []
        losses: list[Tensor] = []
        with torch.no_grad():
            for seg_start in range(start, start + steps, S):
                n = min(S, start + steps - seg_start)
                boundaries.append((seg_start, n, th, st))
                trace = unroll(loss_fn, optimizer, th, n, opt_state=st, start=seg_start,
                               stop_gradient=self.first_order, check_finite=checks)
                th, st = trace.theta, trace.opt_state
                losses += trace.losses
        with torch.enable_grad():
            th_last = {k: v.detach().requires_grad_() for k, v in th.items()}
            outer = problem.outer_value(th_last, phi, problem.outer_batch(0))
            gs = torch.autograd.grad(outer, [th_last[k] for k in theta_keys]
                                     + [phi[k] for k in phi_keys], allow_unused=True)
        adj_theta = [_or_zeros(g, th_last[k]) for g, k in zip(gs, theta_keys)]
        grad = {k: _or_zeros(g, phi[k]) for g, k in zip(gs[len(theta_keys):], phi_keys)}
        adj_state: list[Tensor] | None = None
        for seg_start, n, th0, st0 in reversed(boundaries):
            with torch.enable_grad():
                th_in = {k: v.detach().requires_grad_() for k, v in th0.items()}
                _, st_values = tree_leaves(st0)
                st_in_values = [v.detach().requires_grad_(v.is_floating_point())
                                for v in st_values]
                st_in = tree_rebuild(st0, st_in_values)
                trace = unroll(loss_fn, optimizer, th_in, n, opt_state=st_in, start=seg_start,
                               stop_gradient=self.first_order, check_finite=False)
                _, st_out = tree_leaves(trace.opt_state)
                outs = [trace.theta[k] for k in theta_keys] + st_out
                cots = adj_theta + (adj_state if adj_state is not None
                                    else [torch.zeros_like(v) for v in st_out])
                pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
                inputs = ([th_in[k] for k in theta_keys]
                          + [v for v in st_in_values if v.requires_grad]
                          + [phi[k] for k in phi_keys])
                gs = torch.autograd.grad([o for o, _ in pairs], inputs,
                                         grad_outputs=[c for _, c in pairs], allow_unused=True)
            nt = len(theta_keys)
            adj_theta = [_or_zeros(g, th_in[k]) for g, k in zip(gs[:nt], theta_keys)]
            it = iter(gs[nt:nt + sum(v.requires_grad for v in st_in_values)])
            adj_state = [_or_zeros(next(it), v) if v.requires_grad else torch.zeros_like(v)
                         for v in st_in_values]
            for g, k in zip(gs[len(gs) - len(phi_keys):], phi_keys):
                if g is not None:
                    grad[k] = grad[k] + g
        # θ₀ may itself be a function of φ (MAML-style initialisations).
        linked = [(theta[k], a) for k, a in zip(theta_keys, adj_theta) if theta[k].requires_grad]
        if linked:
            gs = torch.autograd.grad([t for t, _ in linked], [phi[k] for k in phi_keys],
                                     grad_outputs=[a for _, a in linked], allow_unused=True)
            for g, k in zip(gs, phi_keys):
                if g is not None:
                    grad[k] = grad[k] + g
        for k, g in grad.items():
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteError(f"hypergradient for outer parameter '{k}' contains NaN/inf")
        return grad, outer.detach(), th, losses


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.detach()

