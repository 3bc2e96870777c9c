"""A learned optimizer training a task as an inner system of the truncated estimators."""

from __future__ import annotations

import torch

from metaopt.algorithms.lopt_training import LearnedOptimizerSystem, meta_parameters
from metaopt.bilevel import ES, PES, ConstantLength, LogUniformLength, TruncatedBPTT
from metaopt.lopt import SmallFCLOpt
from metaopt.lopt.mulo import MuSmallFC
from tasks.lopt_tasks import mlp_task, teacher_task


def test_batched_rows_equal_the_per_row_loop():
    lopt, task = SmallFCLOpt(), teacher_task(batch_size=32)
    phi = meta_parameters(lopt)
    outs = []
    for batched in (True, False):
        system = LearnedOptimizerSystem(lopt, task, num_steps=100, batched=batched)
        est = PES(num_tasks=3, truncation=6, sigma=0.01, schedule=ConstantLength(10),
                  seed=4)
        hg = est(system, phi, None, None)
        hg = est(system, phi, None, hg.state)
        outs.append(hg)
    # (the PES estimate itself divides float32 loss differences by 2σ² = 2e-4, which
    # amplifies last-bit differences between the two paths; compare what they compute)
    torch.testing.assert_close(outs[0].outer_loss, outs[1].outer_loss, rtol=1e-6, atol=0)
    for a, b in zip(outs[0].state.accumulator.values(), outs[1].state.accumulator.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].state.unroll.inner["theta"]["w0"],
                               outs[1].state.unroll.inner["theta"]["w0"], rtol=1e-5,
                               atol=1e-6)


def test_rows_step_like_the_guarded_optimizer():
    lopt, task = SmallFCLOpt(), teacher_task(batch_size=16)
    system = LearnedOptimizerSystem(lopt, task, num_steps=50)
    phi = meta_parameters(lopt)
    seeds = torch.tensor([11, 12])
    state = system.init({k: v.expand(2, *v.shape) for k, v in phi.items()}, seeds)
    new, loss = system.step({k: v.expand(2, *v.shape) for k, v in phi.items()}, state,
                            seeds, torch.zeros(2, dtype=torch.long))
    row = system._init_row(12)
    batch = system._batches(seeds[1:], torch.zeros(1, dtype=torch.long))
    batch = tuple(b[0] for b in batch)
    theta = {k: v.clone().requires_grad_() for k, v in row["theta"].items()}
    ref_loss = task.loss(theta, batch)
    grads = dict(zip(theta, torch.autograd.grad(ref_loss, list(theta.values()))))
    ref_theta, _ = lopt.update(grads, row["opt"], row["theta"])
    torch.testing.assert_close(loss[1], ref_loss.detach())
    for k in ref_theta:
        torch.testing.assert_close(new["theta"][k][1], ref_theta[k], rtol=1e-5, atol=1e-7)


def test_every_estimator_gives_a_finite_meta_gradient_for_mu_small_fc():
    lopt = MuSmallFC()
    task = mlp_task(param="mup", width=32, depth=2, dataset="digits", seed=1, batch_size=16)
    system = LearnedOptimizerSystem(lopt, task, num_steps=40, max_loss=10.0)
    phi = meta_parameters(lopt)
    for est in (PES(num_tasks=2, truncation=4, schedule=LogUniformLength(5, 20)),
                ES(num_tasks=2, truncation=4, schedule=ConstantLength(8)),
                TruncatedBPTT(num_tasks=2, truncation=4, schedule=ConstantLength(8))):
        hg = est(system, phi, None, None)
        assert set(hg.grad) == set(phi)
        assert all(bool(torch.isfinite(g).all()) for g in hg.grad.values())
        assert any(float(g.abs().sum()) > 0 for g in hg.grad.values())
