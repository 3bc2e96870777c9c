"""One outer loop: ``hyper_step`` is ``bilevel.outer.outer_step`` with Box constraints."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.hyper import Box, HyperparameterRangeError, hyper_init, hyper_step
from metaopt.algorithms.hyper.constraints import projection
from metaopt.bilevel import F2SA, BilevelProblem, Hypergradient, Unrolled, hypergradient_descent
from metaopt.bilevel.outer import OuterState, outer_init, outer_step
from metaopt.optim import adam, sgd
from metaopt.params import NonFiniteError


def _problem():
    """Per-feature ridge penalties; φ = log-penalties kept in a box."""
    gen = torch.Generator().manual_seed(0)
    X, Xv = (torch.randn(30, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randn(30, generator=gen, dtype=torch.float64) for _ in range(2))

    def inner(theta, phi):
        r = X @ theta["w"] - y
        return 0.5 * (r @ r) / len(y) + 0.5 * (torch.exp(phi["log_pen"]) * theta["w"] ** 2).sum()

    def outer(theta, phi):
        r = Xv @ theta["w"] - yv
        return 0.5 * (r @ r) / len(yv)

    problem = BilevelProblem(inner, outer, sgd(0.2), inner_steps=20)
    phi = {"log_pen": torch.full((4,), -1.0, dtype=torch.float64)}
    return problem, phi, {"w": torch.zeros(4, dtype=torch.float64)}


@pytest.mark.parametrize("estimator", [Unrolled(), F2SA(lam_init=1.0)])
@pytest.mark.parametrize("warm_start", [False, True])
def test_hyper_steps_are_hypergradient_descent(estimator, warm_start):
    problem, phi, theta0 = _problem()
    box = {"log_pen": Box(-1.5, -0.5)}  # tight enough that the projection acts
    whole = hypergradient_descent(problem, estimator, phi, theta0, outer_optimizer=adam(0.2),
                                  steps=6, warm_start=warm_start, project=projection(box))
    state = hyper_init(phi, theta0, adam(0.2), box)
    for _ in range(6):
        state, _ = hyper_step(state, estimator, problem, adam(0.2), theta0=theta0,
                              constraints=box, warm_start=warm_start)
    assert isinstance(state, OuterState) and state.step == 6
    assert torch.equal(whole.phi["log_pen"], state.phi["log_pen"])
    assert torch.equal(whole.theta["w"], state.theta["w"])
    assert float(state.phi["log_pen"].min()) >= -1.5 and float(state.phi["log_pen"].max()) <= -0.5
    assert bool((state.phi["log_pen"] == -1.5).any() | (state.phi["log_pen"] == -0.5).any())


def test_hypergradient_descent_refuses_a_nan_hypergradient():
    problem, phi, theta0 = _problem()
    calls = []

    def estimator(problem, phi, theta0, state=None):
        calls.append(1)
        value = float("nan") if len(calls) == 3 else 0.1
        return Hypergradient({"log_pen": torch.full((4,), value, dtype=torch.float64)},
                             dict(theta0) if not callable(theta0) else theta0(phi),
                             torch.tensor(0.0))

    with pytest.raises(NonFiniteError, match="'log_pen' in the hypergradient at outer step 3"):
        hypergradient_descent(problem, estimator, phi, theta0, outer_optimizer=sgd(0.1),
                              steps=5)


def test_hypergradient_descent_checks_the_initial_phi():
    problem, phi, theta0 = _problem()
    reject = projection({"log_pen": Box(0.0, 1.0, mode="reject")})
    with pytest.raises(HyperparameterRangeError, match="'log_pen'"):
        hypergradient_descent(problem, Unrolled(), phi, theta0, outer_optimizer=sgd(0.1),
                              steps=1, project=reject)


def test_outer_step_does_not_mutate_its_state():
    problem, phi, theta0 = _problem()
    state = outer_init(phi, theta0, sgd(0.5))
    before = state.phi["log_pen"].clone()
    new, hg = outer_step(state, problem, Unrolled(), sgd(0.5), theta0=theta0, warm_start=True)
    assert torch.equal(state.phi["log_pen"], before) and state.step == 0
    torch.testing.assert_close(new.phi["log_pen"], before - 0.5 * hg.grad["log_pen"])


def test_zero_steps_return_the_start():
    problem, phi, theta0 = _problem()
    out = hypergradient_descent(problem, Unrolled(), phi, theta0, outer_optimizer=sgd(0.1),
                                steps=0)
    assert torch.equal(out.phi["log_pen"], phi["log_pen"]) and out.history == []
    assert torch.equal(out.theta["w"], theta0["w"])
    with pytest.raises(ValueError, match="steps"):
        hypergradient_descent(problem, Unrolled(), phi, theta0, outer_optimizer=sgd(0.1),
                              steps=-1)


def test_projection_of_no_constraints_is_none():
    assert projection(None) is None and projection({}) is None
