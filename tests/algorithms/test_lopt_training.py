"""A learned optimizer training a task as an inner system of the truncated estimators."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.lopt_training import LearnedOptimizerSystem, meta_parameters
from metaopt.bilevel import ES, PES, ConstantLength, LogUniformLength, TruncatedBPTT
from metaopt.lopt import SmallFCLOpt, cpu_kernels
from metaopt.lopt.base import LearnedOptimizer
from metaopt.lopt.mulo import MuSmallFC
from metaopt.tree import tree_leaves
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


# -- the fused batched-rows step (backend="cpu_kernels") ----------------------------------
needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                   reason="no C compiler for the fused kernels")


def _perturbed_rows(phi: dict, rows: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(rows, *v.shape, generator=gen) for k, v in phi.items()}


@needs_kernels
@pytest.mark.parametrize("kind", ["small_fc", "mu_small_fc_square"])
def test_fused_rows_equal_the_vmapped_reference_step(kind):
    # 12 steps of 5 rows with different (perturbed) meta-parameters, staggered
    # iterations; every leaf of the carried state (parameters, momenta, rms, factored
    # row/column statistics, diagonal second moments) agrees to float32 rounding. The
    # μP case has a square hidden matrix (the factored axis d0 of an (a, a) matrix) and
    # per-tensor step scales.
    if kind == "small_fc":
        lopt, task = SmallFCLOpt(), teacher_task(batch_size=16)
    else:
        torch.manual_seed(3)
        lopt = MuSmallFC()
        task = mlp_task(param="mup", width=24, depth=2, dataset="digits", seed=2,
                        batch_size=16)
    phi = _perturbed_rows(meta_parameters(lopt), 5, seed=1)
    seeds = torch.tensor([3, 3, 8, 9, 10])
    ref = LearnedOptimizerSystem(lopt, task, num_steps=60)
    fast = LearnedOptimizerSystem(lopt, task, num_steps=60, backend="cpu_kernels")
    with torch.no_grad():
        s_ref, s_fast = ref.init(phi, seeds), fast.init(phi, seeds)
        assert lopt.rows_supported(fast._kern, s_fast["theta"], s_fast["opt"])
        for k in range(12):
            steps = torch.tensor([k, k, k + 7, k + 30, k])
            s_ref, l_ref = ref.step(phi, s_ref, seeds, steps)
            s_fast, l_fast = fast.step(phi, s_fast, seeds, steps)
            torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
    _, ref_leaves = tree_leaves(s_ref)
    _, fast_leaves = tree_leaves(s_fast)
    assert len(ref_leaves) == len(fast_leaves)
    for a, b in zip(ref_leaves, fast_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.is_floating_point and a.numel():
            scale = float(a.abs().max()) or 1.0
            assert float((a - b).abs().max()) <= 2e-5 * scale
        else:
            assert torch.equal(a, b)
    # the fused step really ran (it moved the parameters by the learned step)
    assert not torch.equal(s_fast["theta"]["w0"], ref.init(phi, seeds)["theta"]["w0"])


@needs_kernels
def test_fused_rows_only_where_the_structure_allows():
    lopt, task = SmallFCLOpt(), teacher_task(batch_size=8)
    fast = LearnedOptimizerSystem(lopt, task, num_steps=20, backend="cpu_kernels")
    phi = _perturbed_rows(meta_parameters(lopt), 2, seed=0)
    state = fast.init(phi, torch.tensor([1, 2]))
    kern = fast._kern
    with torch.no_grad():
        assert lopt.rows_supported(kern, state["theta"], state["opt"])
        assert not lopt.rows_supported(None, state["theta"], state["opt"])
        as64 = {k: v.double() for k, v in state["theta"].items()}
        assert not lopt.rows_supported(kern, as64, state["opt"])
    # an autograd graph (truncated BPTT) takes the reference step
    assert not lopt.rows_supported(kern, state["theta"], state["opt"])
    with pytest.raises(ValueError, match="update_rows needs the fused kernels"):
        lopt.update_rows(phi, state["theta"], state["opt"], state["theta"], kern)
    # a learned optimizer without a fused rows step says so
    assert not LearnedOptimizer.rows_supported(lopt, kern, state["theta"], state["opt"])


@needs_kernels
def test_pes_with_fused_rows_matches_the_reference_estimate():
    lopt, task = SmallFCLOpt(), teacher_task(batch_size=16)
    phi = meta_parameters(lopt)
    outs = []
    for backend in ("reference", "cpu_kernels"):
        system = LearnedOptimizerSystem(lopt, task, num_steps=100, backend=backend)
        est = PES(num_tasks=3, truncation=6, sigma=0.01, schedule=ConstantLength(10), seed=4)
        hg = est(system, phi, None, None)
        hg = est(system, phi, None, hg.state)
        outs.append(hg)
    torch.testing.assert_close(outs[1].outer_loss, outs[0].outer_loss, rtol=1e-6, atol=0)
    for a, b in zip(outs[0].state.accumulator.values(), outs[1].state.accumulator.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same perturbations
    torch.testing.assert_close(outs[1].state.unroll.inner["theta"]["w0"],
                               outs[0].state.unroll.inner["theta"]["w0"], rtol=1e-5, atol=1e-6)
    # truncated BPTT differentiates through the steps: the reference path, bit for bit
    grads = []
    for backend in ("reference", "cpu_kernels"):
        system = LearnedOptimizerSystem(lopt, task, num_steps=100, backend=backend)
        est = TruncatedBPTT(num_tasks=2, truncation=3, schedule=ConstantLength(10), seed=1)
        grads.append(est(system, phi, None, None).grad)
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k])


def test_row_gradients_of_the_summed_losses_equal_per_row_gradients():
    # d(sum_r L_r(theta_r)) / d theta_r = dL_r / d theta_r: the fused path's one backward
    # pass gives what vmap(grad_and_value(loss)) gives, bit for bit here
    lopt, task = SmallFCLOpt(), teacher_task(batch_size=16)
    system = LearnedOptimizerSystem(lopt, task, num_steps=20)
    phi = _perturbed_rows(meta_parameters(lopt), 3, seed=0)
    seeds = torch.tensor([1, 2, 3])
    with torch.no_grad():
        state = system.init(phi, seeds)
        batch = system._batches(seeds, torch.tensor([0, 4, 9]))
        grads, loss = system._row_grads(state["theta"], batch)
        ref_g, ref_l = torch.func.vmap(torch.func.grad_and_value(task.loss))(state["theta"],
                                                                             batch)
    assert torch.equal(loss, ref_l)
    for k in ref_g:
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-6, atol=1e-7)
        assert not grads[k].requires_grad


@pytest.mark.parametrize("backend", ["reference", "cpu_kernels"])
def test_log_meta_loss_is_the_log_of_each_step_loss_and_leaves_the_inner_run_alone(backend):
    """meta_loss="log": every step's term is log(min(loss, max_loss)) floored at 1e-8;
    the inner trajectory (what the optimizer sees) is unchanged."""
    from metaopt.algorithms.lopt_training import LOG_LOSS_FLOOR

    lopt, task = SmallFCLOpt(), teacher_task(batch_size=16)
    phi = {k: v.expand(2, *v.shape).clone() for k, v in meta_parameters(lopt).items()}
    seeds, steps = torch.tensor([3, 4]), torch.tensor([0, 0])
    out = {}
    for kind in ("loss", "log"):
        system = LearnedOptimizerSystem(lopt, task, num_steps=20, max_loss=2.0,
                                        backend=backend, meta_loss=kind)
        state = system.init(phi, seeds)
        terms = []
        for k in range(3):
            state, term = system.step(phi, state, seeds, steps + k)
            terms.append(term)
        out[kind] = (state, torch.stack(terms))
    raw, logged = out["loss"][1], out["log"][1]
    assert bool((raw <= 2.0).all())
    torch.testing.assert_close(logged, raw.clamp_min(LOG_LOSS_FLOOR).log(), rtol=0, atol=0)
    for a, b in zip(tree_leaves(out["loss"][0])[1], tree_leaves(out["log"][0])[1]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="meta_loss"):
        LearnedOptimizerSystem(lopt, task, num_steps=20, meta_loss="sqrt")
