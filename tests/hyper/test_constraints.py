"""Hyperparameters that leave their valid range are projected or rejected — never NaN."""

import pytest
import torch

from metaopt.algorithms.hyper import (
    Box,
    HypergradientSGD,
    HyperparameterRangeError,
    constrain,
    hyper_init,
    hyper_step,
)
from metaopt.bilevel import BilevelProblem, Hypergradient
from metaopt.optim import sgd
from metaopt.params import NonFiniteError


def test_project_clamps_into_box():
    phi = {"lr": torch.tensor([-0.5, 0.2, 3.0]), "w": torch.tensor([1.5, -0.1])}
    out = constrain(phi, {"lr": Box(low=0.0), "w": Box(0.0, 1.0)})
    assert torch.equal(out["lr"], torch.tensor([0.0, 0.2, 3.0]))
    assert torch.equal(out["w"], torch.tensor([1.0, 0.0]))


def test_reject_names_key_and_value():
    with pytest.raises(HyperparameterRangeError, match=r"'lr/layer1'.*-0\.5"):
        constrain({"lr/layer1": torch.tensor(-0.5)}, {"lr/*": Box(low=0.0, mode="reject")})


def test_inside_box_passes_unchanged():
    v = torch.tensor([0.1, 0.9])
    assert constrain({"w": v}, {"w": Box(0, 1, mode="reject")})["w"] is v


@pytest.mark.parametrize("mode", ["project", "reject"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_always_raises(mode, bad):
    with pytest.raises(NonFiniteError, match="'w'"):
        constrain({"w": torch.tensor([0.5, bad])}, {"w": Box(0, 1, mode=mode)})


def test_unknown_constraint_key_is_an_error():
    with pytest.raises(KeyError, match="matches no hyperparameter"):
        constrain({"lr": torch.tensor(0.1)}, {"lrr": Box(low=0)})


def test_bad_box():
    with pytest.raises(ValueError):
        Box(1.0, 0.0)
    with pytest.raises(ValueError):
        Box(mode="clip")


def _lr_problem():
    """Inner: quadratic ½θ², SGD with learned lr φ; outer: (θ_K − 1)², so the
    hypergradient pushes the lr negative (moving θ away from 0 towards 1 needs lr < 0)."""
    def inner(theta, phi):
        return 0.5 * (theta["x"] ** 2).sum()

    def outer(theta, phi):
        return ((theta["x"] - 1.0) ** 2).sum()

    return BilevelProblem(inner, outer, lambda phi: sgd(phi["lr"]), inner_steps=3)


def _big_step_estimator(problem, phi, theta0, state=None):
    # a hypergradient that would take lr far below zero in one step
    return Hypergradient(grad={"lr": torch.tensor(100.0)}, theta=dict(theta0),
                         outer_loss=torch.tensor(0.0), state=state)


def test_outer_step_projects_negative_lr():
    problem = _lr_problem()
    opt = sgd(1.0)
    theta0 = {"x": torch.tensor([0.5])}
    st = hyper_init({"lr": torch.tensor(0.1)}, theta0, opt, {"lr": Box(low=0.0)})
    st, _ = hyper_step(st, _big_step_estimator, problem, opt, theta0=theta0,
                       constraints={"lr": Box(low=0.0)})
    assert float(st.phi["lr"]) == 0.0


def test_outer_step_rejects_negative_lr():
    problem = _lr_problem()
    opt = sgd(1.0)
    theta0 = {"x": torch.tensor([0.5])}
    box = {"lr": Box(low=0.0, mode="reject")}
    st = hyper_init({"lr": torch.tensor(0.1)}, theta0, opt, box)
    with pytest.raises(HyperparameterRangeError, match="'lr'"):
        hyper_step(st, _big_step_estimator, problem, opt, theta0=theta0, constraints=box)


def test_outer_step_refuses_nan_hypergradient():
    problem = _lr_problem()
    opt = sgd(1.0)
    theta0 = {"x": torch.tensor([0.5])}
    st = hyper_init({"lr": torch.tensor(0.1)}, theta0, opt)

    def nan_estimator(problem, phi, theta0, state=None):
        return Hypergradient(grad={"lr": torch.tensor(float("nan"))}, theta=dict(theta0),
                             outer_loss=torch.tensor(0.0))

    with pytest.raises(NonFiniteError, match="outer step 1"):
        hyper_step(st, nan_estimator, problem, opt, theta0=theta0)


def test_init_checks_initial_phi():
    with pytest.raises(HyperparameterRangeError):
        hyper_init({"w": torch.tensor([2.0])}, {"x": torch.zeros(1)}, sgd(1.0),
                   {"w": Box(0, 1, mode="reject")})


def test_online_lr_never_goes_negative():
    # a huge hyper-lr with a gradient sign flip would push the lr below zero
    x = torch.nn.Parameter(torch.tensor([1.0]))
    opt = HypergradientSGD([x], lr=0.5, hyper_lr=100.0)
    for _ in range(5):
        opt.zero_grad()
        (10.0 * x ** 2).sum().backward()  # lr 0.5 overshoots: gradients alternate sign
        opt.step()
        assert opt.param_groups[0]["lr"] >= 0.0
    assert torch.isfinite(x).all()


def test_online_lr_reject_mode_raises():
    x = torch.nn.Parameter(torch.tensor([1.0]))
    opt = HypergradientSGD([x], lr=0.5, hyper_lr=100.0, lr_box=Box(low=0.0, mode="reject"))
    with pytest.raises(HyperparameterRangeError):
        for _ in range(5):
            opt.zero_grad()
            (10.0 * x ** 2).sum().backward()
            opt.step()


def test_online_lr_rejects_bad_initial_lr():
    with pytest.raises(ValueError, match="outside its range"):
        HypergradientSGD([torch.nn.Parameter(torch.ones(1))], lr=-0.1)
