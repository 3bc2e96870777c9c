"""hypergradcheck's defaults scale with φ's dtype and stay cheap for large φ.

The step and the tolerance are ``ε^(1/3)`` of the dtype (``torch.finfo``); φ with
more than 8 entries is checked along 8 random directions. A correct estimator must
pass in float32 and float64; a wrong one must fail in both; the cost at d = 30 is
counted in objective evaluations, not seconds.
"""

from __future__ import annotations

import pytest
import torch

from metaopt.bilevel import BilevelProblem, FirstOrder, Hypergradient, Unrolled, hypergradcheck
from metaopt.bilevel.check import default_rtol, default_step, finite_difference_hypergradient
from metaopt.optim import sgd

DTYPES = [torch.float32, torch.float64]


def _ridge(d: int, dtype: torch.dtype, *, inner_steps: int = 60, counter: list | None = None):
    """Per-feature ridge penalties φ (the README's example), on seeded data."""
    gen = torch.Generator().manual_seed(0)
    X, Xv = (torch.randn(40, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    y, yv = (torch.randn(40, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))

    def inner(theta, phi):
        r = X @ theta["w"] - y
        return 0.5 * (r @ r) / len(y) + 0.5 * (phi["penalty"] * theta["w"] ** 2).sum()

    def outer(theta, phi):
        if counter is not None:
            counter.append(1)
        r = Xv @ theta["w"] - yv
        return 0.5 * (r @ r) / len(yv)

    problem = BilevelProblem(inner, outer, sgd(0.1), inner_steps)
    phi = {"penalty": torch.full((d,), 0.1, dtype=dtype)}
    return problem, phi, {"w": torch.zeros(d, dtype=dtype)}


def _maml_like(dtype: torch.dtype):
    """θ₀ = φ with a few inner steps: first-order hypergradients are biased here."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dtype)
    b, c = (torch.randn(6, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))

    def inner(theta, phi):
        return 0.5 * ((A @ theta["w"] - b) ** 2).mean()

    def outer(theta, phi):
        return 0.5 * ((A @ theta["w"] - c) ** 2).mean()

    problem = BilevelProblem(inner, outer, sgd(0.5), 5)
    return problem, {"w": torch.full((4,), 0.3, dtype=dtype)}, (lambda phi: {"w": phi["w"]})


def _scaled(estimator, factor: float):
    def wrong(problem, phi, theta0, state=None) -> Hypergradient:
        hg = estimator(problem, phi, theta0, state)
        return Hypergradient({k: factor * v for k, v in hg.grad.items()}, hg.theta,
                             hg.outer_loss, diagnostics=hg.diagnostics, state=hg.state)
    return wrong


def test_defaults_come_from_the_dtype():
    for dtype in DTYPES:
        eps = torch.finfo(dtype).eps
        phi = {"a": torch.zeros(2, dtype=dtype)}
        assert default_step(phi) == pytest.approx(eps ** (1 / 3))
        assert default_rtol(phi) == pytest.approx(eps ** (1 / 3))
    mixed = {"a": torch.zeros(1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float32)}
    assert default_step(mixed) == default_step({"b": mixed["b"]})  # the least precise wins


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [5, 30])
def test_correct_estimator_passes(dtype, d):
    problem, phi, theta0 = _ridge(d, dtype)
    check = hypergradcheck(Unrolled(), problem, phi, theta0)
    assert check.ok, str(check)
    assert check.mode == ("finite-difference" if d <= 8 else "finite-difference (8 directions)")
    # well inside the tolerance, not scraping past it
    assert check.rel_error < 0.2 * check.rtol, str(check)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_estimator_passes_with_phi_dependent_theta0(dtype):
    problem, phi, theta0 = _maml_like(dtype)
    check = hypergradcheck(Unrolled(), problem, phi, theta0)
    assert check.ok, str(check)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_order_where_it_is_biased_fails(dtype):
    problem, phi, theta0 = _maml_like(dtype)
    check = hypergradcheck(FirstOrder(), problem, phi, theta0)
    assert not check.ok and check.rel_error > 10 * check.rtol, str(check)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [5, 30])
def test_scaled_gradient_fails(dtype, d):
    problem, phi, theta0 = _ridge(d, dtype)
    check = hypergradcheck(_scaled(Unrolled(), 1.05), problem, phi, theta0)
    assert not check.ok, str(check)
    assert check.rel_error == pytest.approx(0.05, rel=0.2)  # a pure rescale is seen exactly


def test_default_at_d30_costs_sixteen_objective_evaluations():
    calls: list = []
    problem, phi, theta0 = _ridge(30, torch.float32, counter=calls)
    check = hypergradcheck(Unrolled(), problem, phi, theta0)
    assert check.diagnostics["function_evaluations"] == 16
    assert check.diagnostics["n_directions"] == 8
    # the outer objective ran once per K-step evaluation plus once for the estimator
    assert len(calls) == 16 + 1
    calls.clear()
    full = hypergradcheck(Unrolled(), problem, phi, theta0, directions="coordinates")
    assert full.diagnostics["function_evaluations"] == 60 and len(calls) == 61
    assert full.ok, str(full)


def test_random_directions_are_seeded():
    problem, phi, theta0 = _ridge(12, torch.float64)
    a = hypergradcheck(Unrolled(), problem, phi, theta0, seed=3)
    b = hypergradcheck(Unrolled(), problem, phi, theta0, seed=3)
    c = hypergradcheck(Unrolled(), problem, phi, theta0, seed=4)
    assert torch.equal(a.reference, b.reference)
    assert not torch.equal(a.reference, c.reference)


def test_finite_difference_step_is_relative_for_large_entries():
    # F = ½w² with θ₀ = φ and no inner steps: dF/dφ = φ. At φ = 1e4 in float32, F ≈ 5e7
    # has a spacing of 4, so an absolute step of 5e-3 leaves ~8 % rounding error in the
    # difference; the step 5e-3·|φ| is exact for a quadratic.
    problem = BilevelProblem(lambda t, p: (t["w"] ** 2).sum(),
                             lambda t, p: 0.5 * (t["w"] ** 2).sum(), sgd(0.1), 0)
    phi = {"w": torch.tensor([1e4], dtype=torch.float32)}
    fd = finite_difference_hypergradient(problem, phi, lambda p: {"w": p["w"]})
    torch.testing.assert_close(fd["w"], phi["w"], rtol=1e-4, atol=0.0)


def test_bad_arguments_are_named():
    problem, phi, theta0 = _ridge(3, torch.float64)
    with pytest.raises(ValueError, match="directions"):
        hypergradcheck(Unrolled(), problem, phi, theta0, directions="diagonal")
    with pytest.raises(ValueError, match="n_directions"):
        hypergradcheck(Unrolled(), problem, phi, theta0, n_directions=0)
    with pytest.raises(ValueError, match="empty"):
        hypergradcheck(Unrolled(), problem, {}, theta0)
