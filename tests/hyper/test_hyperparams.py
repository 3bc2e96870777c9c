"""Hyperparameters as outer parameters: learned lrs/weight decay, L2 strength, a net."""

import torch
from torch import nn

from metaopt.algorithms.hyper import (
    LossWeightNet,
    l2_penalty,
    learned_sgd,
    net_params,
    net_weights,
    prefixed,
    sample_weights,
    unprefixed,
    weighted_mean,
)
from metaopt.bilevel import BilevelProblem, Unrolled, hypergradcheck


def test_prefix_round_trip():
    d = {"a": torch.ones(1), "b.c": torch.zeros(2)}
    phi = {**prefixed(d, "lr"), "w": torch.ones(3)}
    assert set(phi) == {"lr/a", "lr/b.c", "w"}
    assert unprefixed(phi, "lr").keys() == d.keys()


def test_weighted_mean_and_sample_weights():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = sample_weights(torch.tensor([0.0, 0.0, 100.0, -100.0]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.0, 0.0]))
    assert weighted_mean(losses, w) == torch.tensor((0.5 + 1.0 + 3.0) / 4)
    assert torch.allclose(weighted_mean(losses, w, normalise=True), torch.tensor(4.5 / 2))


def _regression(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=dtype)
    y = x @ torch.randn(4, generator=g, dtype=dtype)
    return x[:20], y[:20], x[20:], y[20:]


def test_per_layer_lr_and_weight_decay_hypergradients_match_finite_differences():
    xt, yt, xv, yv = _regression()
    theta0 = {"w": torch.zeros(4, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}

    def inner(theta, phi):
        return 0.5 * ((xt @ theta["w"] + theta["b"] - yt) ** 2).mean()

    def outer(theta, phi):
        return 0.5 * ((xv @ theta["w"] + theta["b"] - yv) ** 2).mean()

    problem = BilevelProblem(inner, outer, learned_sgd("lr", "wd"), inner_steps=15)
    phi = {"lr/w": torch.tensor(-2.0, dtype=torch.float64),
           "lr/b": torch.tensor(-1.0, dtype=torch.float64),
           "wd/w": torch.tensor(-3.0, dtype=torch.float64),
           "wd/b": torch.tensor(-3.0, dtype=torch.float64)}
    hg = Unrolled()(problem, phi, theta0)
    assert all(float(v.abs()) > 0 for v in hg.grad.values())
    report = hypergradcheck(Unrolled(), problem, phi, theta0)
    assert report.rel_error < 1e-5, report


def test_l2_strength_in_log_space_learns_by_unrolling():
    xt, yt, xv, yv = _regression()
    theta0 = {"w": torch.zeros(4, dtype=torch.float64)}

    def inner(theta, phi):
        return 0.5 * ((xt @ theta["w"] - yt) ** 2).mean() + l2_penalty(theta, phi["log_l2"])

    def outer(theta, phi):
        return 0.5 * ((xv @ theta["w"] - yv) ** 2).mean()

    from metaopt.optim import sgd
    problem = BilevelProblem(inner, outer, sgd(0.2), inner_steps=100)
    phi = {"log_l2": torch.tensor(1.0, dtype=torch.float64)}  # λ = e: far too strong
    first = None
    for _ in range(30):
        hg = Unrolled()(problem, phi, theta0)
        first = float(hg.outer_loss) if first is None else first
        phi = {"log_l2": phi["log_l2"] - 0.5 * hg.grad["log_l2"]}
    assert float(phi["log_l2"]) < 0.0
    assert float(hg.outer_loss) < 0.5 * first


def test_loss_weight_net_as_hyperparameter():
    torch.manual_seed(0)
    net = LossWeightNet(hidden=4).double()
    phi = net_params(net, "net")
    assert all(k.startswith("net/") for k in phi)
    losses = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    w = net_weights(net, phi, losses, "net")
    assert w.shape == (3,) and bool(((w > 0) & (w < 1)).all())
    assert torch.allclose(w, net(losses))

    # gradients flow to the net's parameters through a weighted inner loss
    xt, yt, xv, yv = _regression()
    theta0 = {"w": torch.zeros(4, dtype=torch.float64)}

    def inner(theta, phi):
        per_sample = 0.5 * (xt @ theta["w"] - yt) ** 2
        return weighted_mean(per_sample, net_weights(net, phi, per_sample.detach(), "net"))

    def outer(theta, phi):
        return 0.5 * ((xv @ theta["w"] - yv) ** 2).mean()

    from metaopt.optim import sgd
    problem = BilevelProblem(inner, outer, sgd(0.3), inner_steps=5)
    hg = Unrolled()(problem, phi, theta0)
    assert set(hg.grad) == set(phi)
    assert sum(float(g.abs().sum()) for g in hg.grad.values()) > 0
    assert isinstance(net, nn.Module)
