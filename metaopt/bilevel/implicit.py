"""Implicit hypergradients from the implicit function theorem (IFT).

If θ*(φ) satisfies an optimality condition ``F(θ*, φ) = 0`` (default: ``∇θ g = 0``),
then ``dθ*/dφ = −(∂F/∂θ)⁻¹ ∂F/∂φ``, so the hypergradient needs one linear solve
``(∂F/∂θ)ᵀ u = ∂f/∂θ`` — with Hessian-vector products, never a materialised Hessian.

Three separate pieces, as in JAXopt: the *optimality condition*, the *solver* that
found θ* (any function; differentiation never looks inside it) and the *linear solve*
(:mod:`metaopt.bilevel.linear_solve`). :func:`custom_root` joins them around any
solver; :class:`Implicit` is the estimator built from it for a :class:`BilevelProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel._common import collect_grad, initial_theta, outer_leaves, step_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.linear_solve import SOLVERS, SolveInfo, power_iteration
from metaopt.bilevel.problem import BilevelProblem, Hypergradient, InitialTheta, Objective
from metaopt.bilevel.task_batch import attach_gradient
from metaopt.params import NonFiniteError, Params, check_same_structure, tree_detach, tree_norm

__all__ = ["Implicit", "custom_fixed_point", "custom_root", "default_tol"]

Optimality = Callable[[Params, Params], Params]


def default_tol(dtype: torch.dtype) -> float:
    """The default relative-residual target of the linear solve for ``dtype``.

    ``1e-10`` in float64; ``sqrt(eps)`` in lower precision (float32: 3.5e-4), where a
    residual of 1e-10 is below rounding and the solve would never report convergence.
    """
    eps = torch.finfo(dtype).eps
    return 1e-10 if eps <= torch.finfo(torch.float64).eps else math.sqrt(eps)


@dataclass
class _RootSpec:
    optimality: Optimality
    theta_keys: list[str]
    phi_keys: list[str]
    solve: Callable[..., tuple[Params, SolveInfo]]
    solve_options: dict[str, Any]
    fixed_point: bool
    info: dict[str, Any] = field(default_factory=dict)


class _ImplicitRoot(torch.autograd.Function):
    """Identity on θ* in forward; the IFT linear solve in backward."""

    @staticmethod
    def forward(ctx: Any, spec: _RootSpec, *tensors: Tensor) -> tuple[Tensor, ...]:
        n = len(spec.theta_keys)
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grad_theta: Tensor) -> tuple[Tensor | None, ...]:
        spec: _RootSpec = ctx.spec
        saved = ctx.saved_tensors
        n = len(spec.theta_keys)
        with torch.enable_grad():
            theta = {k: t.detach().requires_grad_() for k, t in zip(spec.theta_keys, saved[:n])}
            phi = {k: t.detach().requires_grad_() for k, t in zip(spec.phi_keys, saved[n:])}
            residual_map = spec.optimality(theta, phi)
            check_same_structure(theta, residual_map, ("theta", "optimality condition output"))
            keys = spec.theta_keys
            outs = [residual_map[k] for k in keys]
            v = {k: (g if g is not None else torch.zeros_like(theta[k]))
                 for k, g in zip(keys, grad_theta)}

            def vjp_theta(u: Params) -> Params:
                gs = torch.autograd.grad(outs, [theta[k] for k in keys],
                                         grad_outputs=[u[k] for k in keys],
                                         retain_graph=True, allow_unused=True)
                return {k: (torch.zeros_like(theta[k]) if g is None else g)
                        for k, g in zip(keys, gs)}

            if spec.fixed_point:
                # F = T(θ) − θ is given as T; the system is (I − ∂Tᵀ) w = v.
                def matvec(u: Params) -> Params:
                    jt = vjp_theta(u)
                    return {k: u[k] - jt[k] for k in keys}
            else:
                matvec = vjp_theta

            options = dict(spec.solve_options)
            if spec.solve.__name__ == "normal_cg":
                options["rmatvec"] = _forward_product(outs, theta, keys)
            if spec.solve.__name__ in ("neumann", "fixed_point") and options.get(
                    "step_size") is None:
                if spec.fixed_point:
                    options["step_size"] = 1.0
                else:
                    lam = power_iteration(matvec, v)
                    options["step_size"] = 1.0 / lam if lam > 0 else 1.0
                    spec.info["estimated_lambda_max"] = lam
            u, info = spec.solve(matvec, v, **options)
            spec.info.update(info.as_dict())
            sign = 1.0 if spec.fixed_point else -1.0
            phi_list = [phi[k] for k in spec.phi_keys]
            gphi = torch.autograd.grad(outs, phi_list, grad_outputs=[u[k] for k in keys],
                                       allow_unused=True)
        grads_phi = [None if g is None else sign * g for g in gphi]
        return (None, *([None] * n), *grads_phi)


def _forward_product(outs: list[Tensor], theta: Params, keys: list[str]):
    """``w ↦ (∂F/∂θ) w`` from two reverse passes (the double-vjp trick)."""

    def jvp(w: Params) -> Params:
        dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
        vj = torch.autograd.grad(outs, [theta[k] for k in keys], grad_outputs=dummies,
                                 create_graph=True, retain_graph=True, allow_unused=True)
        pairs = [(g, w[k]) for g, k in zip(vj, keys) if g is not None]
        jw = torch.autograd.grad([g for g, _ in pairs], dummies, grad_outputs=[x for _, x in pairs],
                                 retain_graph=True, allow_unused=True)
        return {k: (torch.zeros_like(theta[k]) if g is None else g) for k, g in zip(keys, jw)}

    return jvp


def _root_layer(theta_star: Params, phi: Params, spec: _RootSpec) -> Params:
    outs = _ImplicitRoot.apply(spec, *(theta_star[k].detach() for k in spec.theta_keys),
                               *(phi[k] for k in spec.phi_keys))
    return dict(zip(spec.theta_keys, outs))


def _make_spec(optimality: Optimality, theta: Params, phi: Params, solve: str | Callable,
               options: dict[str, Any], fixed_point: bool) -> _RootSpec:
    solve_fn = SOLVERS[solve] if isinstance(solve, str) else solve
    if isinstance(solve, str) and solve not in SOLVERS:
        raise KeyError(f"unknown linear solver '{solve}'; known: {sorted(SOLVERS)}")
    return _RootSpec(optimality, list(theta), list(phi), solve_fn, options, fixed_point)


def custom_root(optimality: Optimality, *, solve: str | Callable = "cg",
                **solve_options: Any) -> Callable[[Callable[..., Params]], Callable[..., Params]]:
    """Make any solver differentiable by the implicit function theorem.

    ``optimality(theta, phi) -> dict`` is zero at the solution (same keys as θ).
    The decorated ``solver(theta_init, phi) -> theta_star`` may be anything — a loop
    of optimizer steps, L-BFGS, a closed form; its internals are never differentiated.
    The returned function has the same signature, and gradients flow to ``phi``::

        @custom_root(lambda th, ph: torch.func.grad(inner)(th, ph), solve="cg")
        def solve_inner(theta_init, phi): ...
    """

    return _implicit_decorator(optimality, solve, solve_options, fixed_point=False)


def custom_fixed_point(fixed_point_map: Callable[[Params, Params], Params], *,
                       solve: str | Callable = "fixed_point",
                       **solve_options: Any
                       ) -> Callable[[Callable[..., Params]], Callable[..., Params]]:
    """Like :func:`custom_root` for solutions of ``θ = T(θ, φ)``."""
    return _implicit_decorator(fixed_point_map, solve, solve_options, fixed_point=True)


def _implicit_decorator(condition: Callable[[Params, Params], Params], solve: str | Callable,
                        solve_options: dict[str, Any], *, fixed_point: bool
                        ) -> Callable[[Callable[..., Params]], Callable[..., Params]]:
    """Wrap a solver so its output is differentiated through ``condition`` by the IFT."""

    def decorate(solver: Callable[..., Params]) -> Callable[..., Params]:
        def wrapped(theta_init: Params, phi: Params, *args: Any, **kwargs: Any) -> Params:
            with torch.no_grad():
                theta_star = solver(tree_detach(theta_init), tree_detach(phi), *args, **kwargs)
            spec = _make_spec(condition, theta_star, phi, solve, solve_options, fixed_point)
            return _root_layer(theta_star, phi, spec)

        wrapped.__doc__ = solver.__doc__
        wrapped.__name__ = getattr(solver, "__name__", "implicit_solver")
        return wrapped

    return decorate


@dataclass(frozen=True)
class Implicit:
    """IFT hypergradient for a :class:`BilevelProblem`.

    The inner problem is solved by the problem's optimizer (``inner_steps`` steps,
    no graph kept), then one linear solve gives dF/dφ. Memory is independent of the
    number of inner steps.

    Args:
        solver: ``"cg"`` (symmetric positive-definite systems, the default ∇θg = 0
            condition at a minimum), ``"lanczos"`` (symmetric systems that may be
            indefinite: solved with |curvature| floored at ``solver_options["min_eig"]``,
            see :func:`~metaopt.bilevel.linear_solve.lanczos`), ``"normal_cg"`` (any
            non-singular system), ``"neumann"``, ``"fixed_point"``, or a callable with
            the :mod:`~metaopt.bilevel.linear_solve` signature.
        max_iter, tol: linear-solve budget and relative-residual target (default
            :func:`default_tol` of the inner parameters' dtype: 1e-10 in float64,
            3.5e-4 in float32).
        damping: solve ``(A + damping·I)ᵀ u = v`` (Tikhonov); biases the answer.
        step_size: α for Neumann/Richardson (default: 1/λ_max by power iteration).
        optimality: custom condition ``F(theta, phi) -> dict`` (default ∇θ g).
        fixed_point: a map ``T(theta, phi) -> dict`` whose fixed point is θ*; then the
            system is ``(I − ∂T/∂θ)ᵀ w = v``.
        warn: emit :class:`LinearSolveWarning` when the solve misses ``tol``.
        solver_options: further keyword arguments for the solver (``lanczos``:
            ``min_eig``).
    """

    solver: str | Callable = "cg"
    max_iter: int = 100
    tol: float | None = None
    damping: float = 0.0
    step_size: float | None = None
    optimality: Optimality | None = None
    fixed_point: Callable[[Params, Params], Params] | None = None
    warn: bool = True
    check_finite: bool = True
    solver_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.optimality is not None and self.fixed_point is not None:
            raise ValueError("give either optimality or fixed_point, not both")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0 (or None for the dtype's default), "
                             f"got {self.tol}")

    @property
    def vmappable(self) -> bool:
        """False: the linear solve runs in ``torch.autograd``, one task at a time."""
        return False

    def __call__(self, problem: BilevelProblem, phi: Mapping[str, Tensor],
                 theta0: InitialTheta, state: Any = None) -> Hypergradient:
        return self._estimate(problem, outer_leaves(phi), theta0, state, self.check_finite)

    def objective(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta, *,
                  functional: bool = False, check_finite: bool | None = None) -> Objective:
        """F(φ) carrying this estimate (attached: one backward), for per-task loops.

        Under ``torch.no_grad()`` only the inner problem is solved and F evaluated.
        """
        if functional:
            raise ValueError("Implicit cannot run under torch.func.vmap; run tasks in a loop")
        checks = self.check_finite if check_finite is None else check_finite
        if not torch.is_grad_enabled():
            theta = self._solve_inner(problem, tree_detach(phi), theta0, checks).theta
            return Objective(problem.outer_value(theta, phi, problem.outer_batch(0)), theta)
        hg = self._estimate(problem, phi, theta0, None, checks)
        return Objective(attach_gradient(hg.outer_loss, phi, hg.grad), hg.theta,
                         hg.diagnostics)

    def _solve_inner(self, problem: BilevelProblem, detached_phi: Params,
                     theta0: InitialTheta, checks: bool) -> Any:
        theta_init = tree_detach(initial_theta(theta0, detached_phi))
        with torch.no_grad():
            return unroll(step_loss(problem, detached_phi), problem.optimizer_for(detached_phi),
                          theta_init, problem.inner_steps, check_finite=checks)

    def _estimate(self, problem: BilevelProblem, phi: Params, theta0: InitialTheta,
                  state: Any, checks: bool) -> Hypergradient:
        detached_phi = tree_detach(phi)
        trace = self._solve_inner(problem, detached_phi, theta0, checks)
        theta_star = tree_detach(trace.theta)

        batch = problem.inner_batch(problem.inner_steps)
        if self.fixed_point is not None:
            condition, is_fixed = self.fixed_point, True
        elif self.optimality is not None:
            condition, is_fixed = self.optimality, False
        else:
            def condition(theta: Params, ph: Params) -> Params:
                value = problem.inner_value(theta, ph, batch)
                keys = list(theta)
                gs = torch.autograd.grad(value, [theta[k] for k in keys], create_graph=True,
                                         allow_unused=True)
                return {k: (torch.zeros_like(theta[k]) if g is None else g)
                        for k, g in zip(keys, gs)}
            is_fixed = False

        tol = default_tol(next(iter(theta_star.values())).dtype) if self.tol is None \
            else self.tol
        options: dict[str, Any] = {"max_iter": self.max_iter, "tol": tol,
                                   "damping": self.damping, "warn": self.warn}
        if self.step_size is not None:
            options["step_size"] = self.step_size
        options.update(self.solver_options or {})
        spec = _make_spec(condition, theta_star, phi, self.solver, options, is_fixed)
        theta_diff = _root_layer(theta_star, phi, spec)
        outer = problem.outer_value(theta_diff, phi, problem.outer_batch(0))
        if checks and not math.isfinite(float(outer.detach())):
            raise NonFiniteError(f"{problem.name}: outer loss is {float(outer.detach())} "
                                 "at the inner solution")
        grad = collect_grad(outer, phi)
        with torch.enable_grad():
            th = {k: v.clone().requires_grad_() for k, v in theta_star.items()}
            condition_value = tree_detach(condition(th, detached_phi))
        if is_fixed:
            condition_value = {k: v - theta_star[k] for k, v in condition_value.items()}
        optimality_norm = float(tree_norm(condition_value))
        diagnostics = {"estimator": "implicit", "inner_steps": problem.inner_steps,
                       "optimality_residual": optimality_norm,
                       "final_inner_loss": float(trace.losses[-1]) if trace.losses else math.nan}
        diagnostics.update({f"linear_{k}": v for k, v in spec.info.items()})
        return Hypergradient(grad=grad, theta=theta_star, outer_loss=outer.detach(),
                             diagnostics=diagnostics, state=state)
