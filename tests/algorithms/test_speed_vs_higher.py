"""Timing of MAML against higher on the benchmark's two models (slow; run with -m slow).

    .venv/bin/python -m pytest -m slow tests/algorithms/test_speed_vs_higher.py -s

Interleaved repeats, medians, one intra-op thread (set by conftest). Asserts the
strategy the library picks and the measured ratios: the MLP with the default memory
budget (auto picks vmap over the meta-batch) at most 0.5x higher, the MLP in the
per-task loop (a budget of one byte) no slower than higher, and the BatchNorm conv net
(always the loop) no slower than 1.2x higher (parity is what we measured; see the
report in metaopt.algorithms).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import MAML


def _conv_net() -> nn.Module:
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 5))


def _problem(which: str, tasks: int):
    if which == "mlp":
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                              nn.Linear(40, 1))
        xs = torch.rand(tasks, 20, 1) * 10 - 5
        ys = torch.sin(xs)
        return model, (xs[:, :10], ys[:, :10], xs[:, 10:], ys[:, 10:]), F.mse_loss, 0.01
    sy = torch.arange(5).repeat(tasks, 1)
    qy = torch.arange(5).repeat_interleave(15).repeat(tasks, 1)
    batch = (torch.randn(tasks, 5, 1, 28, 28), sy, torch.randn(tasks, 75, 1, 28, 28), qy)
    return _conv_net(), batch, F.cross_entropy, 0.4


def _higher_step(model, batch, loss_fn, lr, steps):
    import higher

    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = batch[0].shape[0]
    for i in range(n):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fm(batch[0][i]), batch[1][i]))
            (loss_fn(fm(batch[2][i]), batch[3][i]) / n).backward()


@pytest.mark.slow
@pytest.mark.parametrize("which,budget,limit,strategy,repeats", [
    ("mlp", "256MiB", 0.5, "vmap", 9), ("mlp", 1, 1.0, "loop", 9),
    ("conv", "256MiB", 1.2, "loop", 3)])
def test_maml_time_vs_higher(which, budget, limit, strategy, repeats):
    model, batch, loss_fn, lr = _problem(which, 8)
    maml = MAML(model, inner_lr=lr, inner_steps=1, memory_budget=budget)

    def ours():
        model.zero_grad()
        maml.meta_loss(*batch, loss_fn).backward()

    def peer():
        _higher_step(model, batch, loss_fn, lr, 1)

    ours()
    peer()
    times = {"ours": [], "higher": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("higher", peer)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{which}: metaopt {med['ours'] * 1e3:.1f} ms ({maml.last_strategy}), "
          f"higher {med['higher'] * 1e3:.1f} ms, ratio {med['ours'] / med['higher']:.2f}")
    assert maml.last_strategy == strategy
    assert med["ours"] / med["higher"] <= limit
