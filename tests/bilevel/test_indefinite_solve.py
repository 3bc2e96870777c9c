"""Linear solves on symmetric indefinite systems (iMAML with a non-convex inner loss).

``cg`` assumes positive definiteness: on negative curvature it stops with the iterate
reached (truncated Newton-CG), falling back to ``c·b`` when asked if that happens on
the first direction. ``lanczos`` must equal CG on positive-definite systems and, on
indefinite ones, return the saddle-free solution ``|A|₊⁻¹ b`` (eigenvalues replaced
by ``max(|e|, min_eig)``); ``normal_cg`` solves them exactly.
"""

import warnings

import pytest
import torch

from metaopt.bilevel import Implicit, LinearSolveWarning
from metaopt.bilevel.linear_solve import SOLVERS, cg, lanczos, normal_cg
from metaopt.bilevel.reference_problems import ridge_problem
from metaopt.params import tree_flatten


def symmetric(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    ev = torch.tensor(eigenvalues, dtype=torch.float64)
    b = {"x": torch.randn(n, dtype=torch.float64, generator=g)}
    return Q @ torch.diag(ev) @ Q.T, Q, ev, b


def matvec(A):
    return lambda v: {"x": A @ v["x"]}


def rel(a, b):
    return float((a - b).norm() / b.norm())


# Spectrum of iMAML's H + λI on the glyph net, in miniature: negative curvature much
# larger than the positive floor, a cluster near zero, positive curvature up to 30.
INDEFINITE = [-20.0, -7.0, -3.0, -0.5, 0.02, 0.3, *torch.linspace(1.0, 30.0, 24).tolist()]


def test_lanczos_is_cg_on_positive_definite_systems():
    A, _, _, b = symmetric(torch.linspace(0.5, 10.0, 30).tolist())
    for k in (1, 3, 8):
        x_l, _ = lanczos(matvec(A), b, min_eig=0.1, max_iter=k, tol=0.0, warn=False)
        x_c, _ = cg(matvec(A), b, max_iter=k, tol=0.0, warn=False)
        assert rel(x_l["x"], x_c["x"]) < 1e-10, k
    x, info = lanczos(matvec(A), b, min_eig=0.1, max_iter=100, tol=1e-12)
    assert info.converged and info.extra["modified"] == 0
    assert rel(x["x"], torch.linalg.solve(A, b["x"])) < 1e-10
    assert info.extra["true_residual"] < 1e-10


def test_cg_breaks_down_on_indefinite_system_and_lanczos_returns_saddle_free_solve():
    A, Q, ev, b = symmetric(INDEFINITE)
    saddle_free = Q @ ((Q.T @ b["x"]) / ev.abs().clamp_min(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_cg, info_cg = cg(matvec(A), b, max_iter=100, tol=1e-12)
    assert any("not positive definite" in str(w.message) for w in caught
               if issubclass(w.category, LinearSolveWarning))
    assert not info_cg.converged
    assert rel(x_cg["x"], saddle_free) > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lanczos converges: no warning
        x, info = lanczos(matvec(A), b, min_eig=0.1, max_iter=100, tol=1e-12)
    assert info.converged
    assert rel(x["x"], saddle_free) < 1e-10
    assert info.extra["modified"] == 5  # four negative Ritz values and 0.02 < min_eig
    assert info.extra["ritz_min"] == pytest.approx(-20.0)
    assert info.extra["true_residual"] > 0.1  # by design not A⁻¹b
    assert float(x["x"].norm()) <= float(b["x"].norm()) / 0.1


def test_lanczos_in_float32_matches_the_float64_saddle_free_solve():
    A, Q, ev, b = symmetric(INDEFINITE, seed=3)
    saddle_free = Q @ ((Q.T @ b["x"]) / ev.abs().clamp_min(1.0))
    A32, b32 = A.float(), {"x": b["x"].float()}
    x, info = lanczos(matvec(A32), b32, min_eig=1.0, max_iter=60, tol=1e-6)
    assert info.converged
    assert rel(x["x"].double(), saddle_free) < 1e-5


def test_normal_cg_solves_the_indefinite_system_exactly():
    A, _, _, b = symmetric(INDEFINITE)
    x, info = normal_cg(matvec(A), b, rmatvec=matvec(A), max_iter=400, tol=1e-8)
    assert info.converged
    assert rel(x["x"], torch.linalg.solve(A, b["x"])) < 1e-6


def test_lanczos_needs_a_positive_floor():
    A, _, _, b = symmetric([1.0, 2.0])
    with pytest.raises(ValueError, match="min_eig > 0"):
        lanczos(matvec(A), b)
    with pytest.raises(ValueError, match="min_eig > 0"):
        lanczos(matvec(A), b, min_eig=0.0)
    assert "lanczos" in SOLVERS


def test_implicit_with_lanczos_matches_ridge_closed_form():
    ref = ridge_problem(d=15, per_feature=True, inner_steps=600)
    hg = Implicit(solver="lanczos", max_iter=300, tol=1e-12,
                  solver_options={"min_eig": 1e-6})(ref.problem, ref.phi, ref.theta0)
    exact = tree_flatten(ref.exact_hypergradient(ref.phi))
    assert rel(tree_flatten(hg.grad), exact) <= 1e-6
    assert hg.diagnostics["linear_converged"]
    assert hg.diagnostics["linear_modified"] == 0


def test_cg_truncates_at_negative_curvature_with_first_step_fallback():
    A = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    b = {"x": torch.tensor([1.0, 0.1, 0.1], dtype=torch.float64)}  # bᵀAb < 0
    x, info = cg(matvec(A), b, max_iter=10, warn=False)
    assert torch.equal(x["x"], torch.zeros(3, dtype=torch.float64))  # nothing reached
    assert info.extra["negative_curvature_at"] == 1
    x, info = cg(matvec(A), b, max_iter=10, warn=False, first_step_fallback=0.5)
    assert torch.equal(x["x"], 0.5 * b["x"])
    # negative curvature later on: the iterate reached is kept, the fallback unused
    # (2-d: one CG step spans half the space; the next direction must see the -1)
    A2 = A[:2, :2]
    b2 = {"x": torch.tensor([0.3, 1.0], dtype=torch.float64)}  # b2ᵀA2b2 > 0
    x, info = cg(matvec(A2), b2, max_iter=10, warn=False, first_step_fallback=0.5)
    assert info.extra["negative_curvature_at"] == 2
    step = float(b2["x"] @ b2["x"]) / float(b2["x"] @ A2 @ b2["x"])
    assert torch.allclose(x["x"], step * b2["x"], rtol=1e-14)
    _, info = cg(matvec(torch.eye(2, dtype=torch.float64)), b2, max_iter=10)
    assert info.extra["negative_curvature_at"] == 0
