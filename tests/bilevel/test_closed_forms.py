"""Estimators against exact answers: ridge (scalar + per-feature), logistic, quadratic."""

import itertools

import pytest
import torch

from metaopt.bilevel import (
    F2SA,
    FirstOrder,
    Implicit,
    Unrolled,
    hypergradcheck,
    hypergradient_descent,
)
from metaopt.bilevel.reference_problems import logistic_problem, quadratic_problem, ridge_problem
from metaopt.optim import sgd
from metaopt.params import tree_flatten


def rel_error(a, b):
    a, b = tree_flatten(a), tree_flatten(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("solver", ["cg", "normal_cg", "neumann", "fixed_point"])
def test_ift_matches_ridge_closed_form_float64(per_feature, solver):
    ref = ridge_problem(d=15, per_feature=per_feature, inner_steps=600)
    hg = Implicit(solver=solver, max_iter=300, tol=1e-12)(ref.problem, ref.phi, ref.theta0)
    err = rel_error(hg.grad, ref.exact_hypergradient(ref.phi))
    assert err <= 1e-6, (solver, err)
    assert hg.diagnostics["linear_converged"]


def test_ift_cg_matches_logistic_exact_hessian_solve():
    ref = logistic_problem(d=8, inner_steps=3000)
    hg = Implicit(solver="cg", tol=1e-12)(ref.problem, ref.phi, ref.theta0)
    assert rel_error(hg.grad, ref.exact_hypergradient(ref.phi)) <= 1e-6


def test_unrolled_approaches_closed_form_as_K_grows():
    errors = []
    for K in (5, 20, 80, 320):
        ref = ridge_problem(d=15, inner_steps=K)
        hg = Unrolled()(ref.problem, ref.phi, ref.theta0)
        errors.append(rel_error(hg.grad, ref.exact_hypergradient(ref.phi)))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-6 < errors[0]


def test_unrolled_equals_finite_differences_of_the_K_step_objective():
    ref = ridge_problem(d=6, inner_steps=15)
    check = hypergradcheck(Unrolled(), ref.problem, ref.phi, ref.theta0, rtol=1e-7)
    assert check.ok, str(check)


def test_checkpointed_unrolling_agrees_with_plain():
    ref = ridge_problem(d=10, inner_steps=100)
    plain = Unrolled()(ref.problem, ref.phi, ref.theta0).grad
    ckpt = Unrolled(checkpoint_segment=7)(ref.problem, ref.phi, ref.theta0).grad
    assert torch.allclose(plain["penalty"], ckpt["penalty"], rtol=1e-12, atol=0)


def test_truncated_unrolling_is_biased_for_short_horizons_and_exact_for_full():
    ref = ridge_problem(d=10, inner_steps=40)
    full = Unrolled()(ref.problem, ref.phi, ref.theta0).grad
    same = Unrolled(truncate=40)(ref.problem, ref.phi, ref.theta0).grad
    short = Unrolled(truncate=3)(ref.problem, ref.phi, ref.theta0).grad
    assert torch.equal(full["penalty"], same["penalty"])
    assert rel_error(short, full) > 1e-3
    # The truncated estimate still points downhill.
    assert float(tree_flatten(short) @ tree_flatten(full)) > 0


def test_first_order_keeps_only_direct_paths():
    # Learning-rate hyperparameter: θ_K = θ_0 − Σ lr·g_k. Dropping second-order terms
    # gives dθ_K/dlr = −Σ g_k, computed here by hand.
    X = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    from metaopt.bilevel import BilevelProblem

    prob = BilevelProblem(lambda th, ph: ((X @ th["w"] - y) ** 2).mean() / 2,
                          lambda th, ph: (th["w"] ** 2).sum() / 2,
                          lambda ph: sgd(ph["lr"]), inner_steps=5)
    lr = torch.tensor(0.1, dtype=torch.float64)
    hg = FirstOrder()(prob, {"lr": lr}, {"w": torch.ones(4, dtype=torch.float64)})
    w = torch.ones(4, dtype=torch.float64)
    grads = []
    for _ in range(5):
        g = X.T @ (X @ w - y) / 30
        grads.append(g)
        w = w - lr * g
    expected = w @ (-torch.stack(grads).sum(0))
    assert torch.allclose(hg.grad["lr"], expected, rtol=1e-12)


def test_f2sa_reaches_outer_optimum_of_quadratic_problem():
    ref = quadratic_problem(inner_steps=30)
    out = hypergradient_descent(ref.problem, F2SA(lam_init=1.0, lam_growth=10.0, lam_max=1e3),
                                ref.phi, ref.theta0, outer_optimizer=sgd(0.05), steps=400)
    assert rel_error(out.phi, ref.optimum) <= 1e-2


def test_ift_hypergradient_descent_reaches_quadratic_optimum():
    ref = quadratic_problem(inner_steps=200)
    out = hypergradient_descent(ref.problem, Implicit(), ref.phi, ref.theta0,
                                outer_optimizer=sgd(0.2, momentum=0.5), steps=150,
                                warm_start=True)
    assert rel_error(out.phi, ref.optimum) <= 1e-3
    assert out.history[-1]["outer_loss"] < out.history[0]["outer_loss"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
def test_estimators_follow_dtype(dtype, tol):
    ref = ridge_problem(d=8, inner_steps=400, dtype=dtype)
    for est in (Unrolled(), Implicit(tol=1e-6 if dtype == torch.float32 else 1e-12)):
        hg = est(ref.problem, ref.phi, ref.theta0)
        assert hg.grad["penalty"].dtype == dtype
        assert hg.theta["w"].dtype == dtype
        exact = {k: v.double() for k, v in ref.exact_hypergradient(ref.phi).items()}
        assert rel_error({k: v.double() for k, v in hg.grad.items()}, exact) < tol


def test_hypergradcheck_reports_a_wrong_estimator():
    ref = ridge_problem(d=5, inner_steps=10)
    check = hypergradcheck(Unrolled(truncate=1), ref.problem, ref.phi, ref.theta0, rtol=1e-6)
    assert not check.ok and check.rel_error > 1e-3
    exact = hypergradcheck(Implicit(), ridge_problem(d=5, inner_steps=500).problem, ref.phi,
                           ref.theta0, reference=ref.exact_hypergradient)
    assert exact.ok and exact.mode == "exact"


@pytest.mark.parametrize("truncate", [None, 13])
def test_checkpointed_matches_plain_with_adam_state_and_phi_dependent_init(truncate):
    from metaopt.bilevel import BilevelProblem
    from metaopt.optim import adam

    ref = ridge_problem(d=6, inner_steps=30)
    prob = BilevelProblem(ref.problem.inner_loss, ref.problem.outer_loss, adam(0.01), 30)

    def theta0(phi):  # θ₀ depends on φ, as in MAML
        return {"w": 0.5 * phi["penalty"]}

    plain = Unrolled(truncate=truncate)(prob, ref.phi, theta0).grad["penalty"]
    ckpt = Unrolled(truncate=truncate, checkpoint_segment=4)(prob, ref.phi, theta0).grad["penalty"]
    torch.testing.assert_close(ckpt, plain, rtol=1e-12, atol=1e-15)


def test_custom_root_and_fixed_point_around_a_closed_form_solver():
    # The solver is an exact linear solve (never differentiated); the IFT supplies dθ*/dφ.
    from metaopt.bilevel import custom_fixed_point, custom_root

    ref = ridge_problem(d=8, inner_steps=1)
    inner = ref.problem.inner_loss

    def gradient_condition(theta, phi):
        (g,) = torch.autograd.grad(inner(theta, phi), theta["w"], create_graph=True)
        return {"w": g}

    def gd_map(theta, phi):
        return {"w": theta["w"] - (1.0 / ref.lipschitz) * gradient_condition(theta, phi)["w"]}

    def exact(theta_init, phi):
        return ref.exact_solution(phi)

    for solver in (custom_root(gradient_condition, solve="cg", tol=1e-12)(exact),
                   custom_fixed_point(gd_map, max_iter=5000, tol=1e-12)(exact)):
        phi = {"penalty": ref.phi["penalty"].clone().requires_grad_()}
        outer = ref.problem.outer_loss(solver(ref.theta0, phi), phi)
        (grad,) = torch.autograd.grad(outer, phi["penalty"])
        assert rel_error({"penalty": grad}, ref.exact_hypergradient(ref.phi)) <= 1e-8
