"""BOME on a quadratic bilevel problem with a known optimum."""

import pytest
import torch

from metaopt.bilevel.bome import BOME
from metaopt.bilevel.problem import BilevelProblem
from metaopt.optim import sgd


def _problem(inner_steps=3):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    c = 0.1

    def inner(theta, phi):  # θ*(φ) = Aφ
        return 0.5 * ((theta["t"] - a @ phi["p"]) ** 2).sum()

    def outer(theta, phi):  # F(φ) = ½‖Aφ − b‖² + c/2‖φ‖²
        return 0.5 * ((theta["t"] - b) ** 2).sum() + 0.5 * c * (phi["p"] ** 2).sum()

    phi_star = torch.linalg.solve(a.T @ a + c * torch.eye(3, dtype=torch.float64), a.T @ b)
    return BilevelProblem(inner, outer, sgd(0.5), inner_steps=inner_steps), phi_star


def _run(step, iters, inner_steps=3):
    problem, phi_star = _problem(inner_steps)
    est = BOME(theta_lr=step, eta=0.5)
    phi = {"p": torch.zeros(3, dtype=torch.float64)}
    theta0 = {"t": torch.zeros(5, dtype=torch.float64)}
    state = None
    for _ in range(iters):
        hg = est(problem, phi, theta0, state)
        state = hg.state
        phi = {"p": phi["p"] - step * hg.grad["p"]}
    return float((phi["p"] - phi_star).norm() / phi_star.norm()), hg


def test_bome_converges_to_known_optimum():
    err, hg = _run(0.04, 600)
    assert err < 3e-2, err
    assert hg.diagnostics["lambda"] > 0  # the barrier is active at the solution
    assert set(hg.state) == {"theta"}


@pytest.mark.slow
def test_bome_converges_tightly_with_small_step():
    # the remaining error shrinks with the step and with T (θ̂'s distance from θ*)
    err, _ = _run(0.01, 6000, inner_steps=10)
    assert err < 6e-3, err


def test_bome_error_shrinks_with_step_size():
    # BOME's stationary error is O(step): halving the step roughly halves it.
    coarse, _ = _run(0.1, 250)
    fine, _ = _run(0.05, 500)
    assert fine < 0.7 * coarse, (coarse, fine)


def test_bome_is_first_order_and_keeps_interface():
    problem, _ = _problem()
    phi = {"p": torch.ones(3, dtype=torch.float64)}
    hg = BOME(theta_lr=0.1)(problem, phi, {"t": torch.zeros(5, dtype=torch.float64)})
    assert set(hg.grad) == {"p"} and hg.grad["p"].shape == (3,)
    assert not hg.grad["p"].requires_grad and hg.outer_loss.dim() == 0
    assert hg.diagnostics["estimator"] == "bome"


@pytest.mark.parametrize("kwargs", [{"theta_lr": 0.0}, {"theta_lr": 0.1, "eta": -1.0},
                                    {"theta_lr": 0.1, "inner_steps": -1}])
def test_bome_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        BOME(**kwargs)
