"""Warm vs cold start of the inner solve can change the answer (over-parameterised inner).

Inner: g(θ, φ) = ½(a(φ)ᵀθ − 1)² with a(φ) = (cos φ, sin φ) — a line of minimisers
whose direction turns with φ. Gradient descent from θ₀ reaches the minimiser nearest
θ₀, so a cold start always lands on θ₀ − a(aᵀθ₀ − 1), while a warm start carries the
previous solution's component along the old line into the new one.
"""

import math

import torch

from metaopt.bilevel import BilevelProblem, Unrolled, hypergradient_descent
from metaopt.optim import sgd


def _a(phi):
    return torch.stack([torch.cos(phi["angle"]), torch.sin(phi["angle"])])


def test_warm_and_cold_start_reach_different_solutions():
    def inner(theta, phi):
        return 0.5 * (_a(phi) @ theta["w"] - 1.0) ** 2

    target = torch.tensor([0.0, 2.0], dtype=torch.float64)

    def outer(theta, phi):
        return 0.5 * ((theta["w"] - target) ** 2).sum()

    prob = BilevelProblem(inner, outer, sgd(0.9), inner_steps=60)
    theta0 = {"w": torch.tensor([1.5, -1.0], dtype=torch.float64)}
    phi0 = {"angle": torch.tensor(0.3, dtype=torch.float64)}
    runs = {ws: hypergradient_descent(prob, Unrolled(), phi0, theta0, outer_optimizer=sgd(0.2),
                                      steps=40, warm_start=ws) for ws in (False, True)}
    cold, warm = runs[False], runs[True]
    a = _a(cold.phi)
    nearest = theta0["w"] - a * (a @ theta0["w"] - 1.0)
    torch.testing.assert_close(cold.theta["w"], nearest, rtol=0, atol=1e-8)
    assert abs(float(warm.phi["angle"] - cold.phi["angle"])) > 1e-2
    # Both are inner minimisers for their own φ; they are different points.
    for run in (cold, warm):
        assert math.isclose(float(_a(run.phi) @ run.theta["w"]), 1.0, abs_tol=1e-8)
    assert float((warm.theta["w"] - cold.theta["w"]).norm()) > 1e-2
