"""Step-scale calibration: the schedule's step weights, the rescaled optimizer, and the
objective against a direct loop over the pure update."""

from __future__ import annotations

import math
import random

import pytest
import torch

from metaopt.algorithms.lopt_calibration import (
    calibrate_step_scale,
    final_window_weights,
    rescale_step,
    schedule_step_weights,
    step_scale_objective,
)
from metaopt.algorithms.lopt_training import init_kwargs
from metaopt.bilevel.truncation import LogUniformLength, mix_seed
from metaopt.lopt import SmallFCLOpt
from metaopt.lopt.mulo import MuSmallFC
from metaopt.lopt.velo import VeLO
from tasks.lopt_tasks import mlp_task


def _perturbed(lopt, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lopt


def test_step_weights_are_the_schedules_survival_function():
    sched = LogUniformLength(10, 200)
    w = schedule_step_weights(sched)
    assert w.shape == (200,) and bool((w[:10] == 1).all())
    assert bool((w[1:] <= w[:-1]).all()) and 0 < float(w[-1]) < 0.02
    rng = random.Random(0)
    lengths = torch.tensor([sched.length_at(rng.random()) for _ in range(20000)])
    empirical = (lengths[None, :] > torch.arange(200)[:, None]).double().mean(1)
    assert float((empirical - w).abs().max()) < 0.02
    assert bool((schedule_step_weights(LogUniformLength(5, 5)) == 1).all())


class _NoStepMult(SmallFCLOpt):
    def config(self):
        return {k: v for k, v in super().config().items() if k != "step_mult"}


@pytest.mark.parametrize("cls", [SmallFCLOpt, MuSmallFC, VeLO])
def test_rescaled_step_equals_the_shell_lr(cls):
    lopt = _perturbed(cls())
    task = mlp_task("mup", 16, 1, "relu", "digits")
    theta = task.init_params(torch.Generator().manual_seed(0))
    grads = {k: torch.randn_like(v) for k, v in theta.items()}
    state = lopt.init(theta, 10, **init_kwargs(lopt, task))
    loss = torch.tensor(1.5)
    new, _ = lopt.update(grads, state, theta, loss=loss)
    half = rescale_step(lopt, 0.5)
    new_half, _ = half.update(grads, half.init(theta, 10, **init_kwargs(half, task)), theta,
                              loss=loss)
    for k in theta:
        torch.testing.assert_close(new_half[k], theta[k] + 0.5 * (new[k] - theta[k]),
                                   rtol=1e-5, atol=1e-7)
    assert half.config()["step_mult"] == pytest.approx(0.5 * lopt.config()["step_mult"])
    with pytest.raises(ValueError, match="step_mult"):
        rescale_step(_NoStepMult(), 0.5)
    with pytest.raises(ValueError, match="scale"):
        rescale_step(lopt, -1.0)


def _direct_objective(lopt, tasks, w, num_steps, rows, seed, max_loss):
    """The same objective from the pure per-row update, one row at a time."""
    per_task = []
    for i, task in enumerate(tasks):
        acc = 0.0
        for r in range(rows):
            s = mix_seed(seed, i, r)
            theta = task.init_params(torch.Generator().manual_seed(s))
            state = lopt.init(theta, num_steps, **init_kwargs(lopt, task))
            for t in range(len(w)):
                batch = task.sample_batch(torch.Generator().manual_seed(mix_seed(s, 5, t)),
                                          "train")
                th = {k: v.detach().requires_grad_() for k, v in theta.items()}
                loss = task.loss(th, batch)
                g = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
                theta, state = lopt.update(g, state, theta, loss=loss.detach())
                acc += float(w[t]) * math.log(max(min(float(loss.detach()), max_loss), 1e-8)) / rows
        per_task.append(acc / float(w.sum()))
    return per_task


def _direct_mean_loss(lopt, task, w, num_steps, rows, seed):
    """The weighted mean raw training loss over rows (task index 0), by the pure update."""
    acc = 0.0
    for r in range(rows):
        s = mix_seed(seed, 0, r)
        theta = task.init_params(torch.Generator().manual_seed(s))
        state = lopt.init(theta, num_steps, **init_kwargs(lopt, task))
        for t in range(len(w)):
            batch = task.sample_batch(torch.Generator().manual_seed(mix_seed(s, 5, t)), "train")
            th = {k: v.detach().requires_grad_() for k, v in theta.items()}
            loss = task.loss(th, batch)
            g = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
            theta, state = lopt.update(g, state, theta, loss=loss.detach())
            acc += float(w[t]) * min(float(loss.detach()), 10.0) / rows
    return acc / float(w.sum())


def test_objective_matches_a_direct_loop_and_the_grid_keeps_the_best():
    lopt = _perturbed(MuSmallFC(), seed=3)
    tasks = [mlp_task("mup", 16, 1, "relu", "digits", seed=1),
             mlp_task("mup", 16, 1, "gelu", "mnist1d", seed=2)]
    w = schedule_step_weights(LogUniformLength(3, 8))
    out = step_scale_objective(lopt, tasks, weights=w, rows=2, seed=5, max_loss=10.0)
    ref = _direct_objective(lopt, tasks, w, 8, 2, 5, 10.0)
    assert out["per_task"] == pytest.approx(ref, rel=1e-5)
    assert out["objective"] == pytest.approx(sum(ref) / 2, rel=1e-5)
    final = final_window_weights(20)
    assert final.tolist() == [0.0] * 18 + [1.0] * 2
    out20 = step_scale_objective(lopt, tasks[:1], weights=final, num_steps=50, rows=2, seed=5)
    assert out20["per_task"] == pytest.approx(
        _direct_objective(lopt, tasks[:1], final, 50, 2, 5, 10.0), rel=1e-5)
    raw = step_scale_objective(lopt, tasks[:1], weights=final, num_steps=50, rows=2, seed=5,
                               meta_loss="loss", per_task_log=True)
    assert raw["per_task"] == pytest.approx(
        [math.log(_direct_mean_loss(lopt, tasks[0], final, 50, 2, 5))], rel=1e-5)
    with pytest.raises(ValueError, match="weights"):
        step_scale_objective(lopt, tasks, weights=torch.zeros(4))
    cal = calibrate_step_scale(lopt, tasks, [0.5, 1.0, 30.0], weights=w, rows=2, seed=5)
    assert cal.objective[1.0] == pytest.approx(out["objective"], rel=1e-6)
    assert cal.scale == min(cal.objective, key=cal.objective.get)
    assert len(set(cal.objective.values())) == 3
    assert set(cal.as_dict()["objective"]) == {"0.5", "1.0", "30.0"}
    with pytest.raises(ValueError, match="empty"):
        calibrate_step_scale(lopt, tasks, [], weights=w)
