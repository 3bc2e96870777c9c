"""Hypergradient descent on per-layer learning rates (Baydin et al. 2018)."""

import torch
from torch import nn

from metaopt.algorithms.hyper import HypergradientSGD, per_layer_groups


def _quadratic(seed=0, d=20):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 10.0, d, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T, torch.randn(d, generator=g, dtype=torch.float64)


def _train(opt_factory, steps=100):
    a, x0 = _quadratic()
    x = nn.Parameter(x0.clone())
    opt = opt_factory([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
    return float(0.5 * x.detach() @ a @ x.detach()), opt


def test_finds_better_lr_than_bad_small_one():
    bad = 1e-3  # far too small for curvature in [1, 10]: optimal constant lr ≈ 2/11
    plain, _ = _train(lambda p: torch.optim.SGD(p, lr=bad))
    adapted, opt = _train(lambda p: HypergradientSGD(p, lr=bad, hyper_lr=3e-5))
    lr = opt.param_groups[0]["lr"]
    assert lr > 20 * bad, lr            # learned a much larger rate …
    assert lr < 2.0 / 10.0 + 1e-9, lr   # … that is still stable (below 2/λ_max)
    assert adapted < 1e-3 * plain, (adapted, plain)


def test_shrinks_divergent_lr():
    bad = 0.25  # above 2/λ_max = 0.2: plain SGD diverges
    plain, _ = _train(lambda p: torch.optim.SGD(p, lr=bad), steps=60)
    adapted, opt = _train(lambda p: HypergradientSGD(p, lr=bad, hyper_lr=1e-5,
                                                     multiplicative=False), steps=60)
    assert plain > 1e3
    assert opt.param_groups[0]["lr"] < 0.2
    assert adapted < 1e-2


def test_multiplicative_variant_improves_too():
    bad = 1e-3
    plain, _ = _train(lambda p: torch.optim.SGD(p, lr=bad))
    adapted, opt = _train(lambda p: HypergradientSGD(p, lr=bad, hyper_lr=0.05,
                                                     multiplicative=True))
    assert opt.param_groups[0]["lr"] > 10 * bad
    assert adapted < 0.1 * plain


def test_per_layer_groups_adapt_separately_in_a_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1)
    groups = per_layer_groups(model, lr=1e-3)
    assert [g["name"] for g in groups] == ["0", "2"]
    opt = HypergradientSGD(groups, hyper_lr=1e-2, momentum=0.5)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] != lrs[1]
    assert all(lr > 1e-3 for lr in lrs)
    assert float(loss.detach()) < 0.2 * first
    assert len(opt.param_groups[0]["lr_history"]) == 200
