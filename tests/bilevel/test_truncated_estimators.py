"""Truncated estimators (TBPTT, ES, PES) against exact gradients.

The influence-balancing system (PES paper's toy) has a loss quadratic in θ, so the
Gaussian-smoothed objective has the same gradient as the exact one: ES/PES estimates
must match the exact episode gradient in expectation (checked against the standard
error of repeated, independently seeded runs), while truncated BPTT with short
truncations must be measurably off.
"""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.bilevel import BilevelProblem
from metaopt.bilevel.es import ES
from metaopt.bilevel.pes import PES, PESLossDiffs, advance_particles, combine
from metaopt.bilevel.reference_problems import InfluenceBalancing
from metaopt.bilevel.truncated_bptt import TruncatedBPTT
from metaopt.bilevel.truncation import (
    ConstantLength,
    LogUniformLength,
    TruncatedState,
    TruncationRecord,
    UnrollState,
    per_task_sums,
)
from metaopt.optim import sgd

SYSTEM = InfluenceBalancing()
THETA = torch.tensor([0.5], dtype=torch.float64)


def exact_grad(steps: int, truncation: int) -> float:
    th = THETA.clone().requires_grad_()
    return float(torch.autograd.grad(SYSTEM.episode_loss(th, steps) / truncation, th)[0])


def summed_estimates(make, calls: int, repeats: int) -> tuple[float, float]:
    """Mean and standard error of the sum of ``calls`` consecutive estimates."""
    sums = []
    for r in range(repeats):
        est, state, total = make(r), None, 0.0
        for _ in range(calls):
            hg = est(SYSTEM, {"theta": THETA}, None, state)
            state, total = hg.state, total + float(hg.grad["theta"])
        sums.append(total)
    t = torch.tensor(sums, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(sums))) if len(sums) > 1 else 0.0
    return float(t.mean()), se


def test_pes_is_unbiased_where_truncated_bptt_is_not():
    H, K = 20, 2
    exact = exact_grad(H, K)
    mean, se = summed_estimates(lambda r: PES(num_tasks=500, truncation=K, sigma=0.1,
                                              schedule=ConstantLength(H), stagger=False,
                                              seed=r), H // K, 16)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.1 * abs(exact)
    tbptt, _ = summed_estimates(lambda r: TruncatedBPTT(
        num_tasks=1, truncation=K, schedule=ConstantLength(H), stagger=False), H // K, 1)
    assert abs(tbptt - exact) > 20 * se  # the short-horizon bias, far outside PES's noise


def test_pes_accumulator_resets_inside_a_truncation():
    # episodes of 7 steps, truncations of 3: 7 truncations cover exactly 3 episodes, and
    # resets fall inside truncations; the sum is 3 episode gradients.
    H, K = 7, 3
    exact = 3 * exact_grad(H, K)
    mean, se = summed_estimates(lambda r: PES(num_tasks=400, truncation=K, sigma=0.1,
                                              schedule=ConstantLength(H), stagger=False,
                                              seed=100 + r), 7, 16)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def log_mean_objective(theta: torch.Tensor, steps: int, truncation: int) -> torch.Tensor:
    """Σ over truncations of log(mean step loss): the ``"log_mean"`` objective of one
    episode of ``steps`` steps cut into truncations of ``truncation`` (which divides it)."""
    state = {"s": torch.ones(1, SYSTEM.n, dtype=SYSTEM.dtype)}
    losses = []
    for _ in range(steps):
        state, loss = SYSTEM.step({"theta": theta.reshape(1, 1)}, state, None, None)
        losses.append(loss.sum())
    return sum(torch.stack(losses[i:i + truncation]).mean().log()
               for i in range(0, steps, truncation))


def test_log_mean_segments_by_hand():
    # 4 steps (rows of ``losses``) of 2 tasks x 2 copies (columns, copy-major); task 1
    # resets before step 2, task 0 never does.
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 5.0, 4.0],
                           [1.0, 0.0, 1.0, 0.0], [3.0, 4.0, 1.0, 8.0]], dtype=torch.float64)
    after = torch.tensor([[False, False], [False, False], [False, True], [False, True]])
    record = TruncationRecord(losses=losses, after_reset=after, reset=after[-1],
                              nonfinite=torch.zeros(2, dtype=torch.long))
    before, post = per_task_sums(record, 2, 4, "log_mean")
    ln = math.log
    torch.testing.assert_close(before, torch.tensor(
        [[ln(2.0), 2 / 4 * ln(2.0)], [ln(2.5), 2 / 4 * ln(4.0)]], dtype=torch.float64))
    torch.testing.assert_close(post, torch.tensor(
        [[0.0, 2 / 4 * ln(2.0)], [0.0, 2 / 4 * ln(4.0)]], dtype=torch.float64))
    # a segment whose losses are all zero is floored, not -inf
    zero = TruncationRecord(losses=torch.zeros(2, 2, dtype=torch.float64),
                            after_reset=torch.zeros(2, 1, dtype=torch.bool),
                            reset=torch.zeros(1, dtype=torch.bool),
                            nonfinite=torch.zeros(1, dtype=torch.long))
    b0, _ = per_task_sums(zero, 2, 2, "log_mean")
    assert torch.isfinite(b0).all() and float(b0.max()) < -18
    mean_b, mean_a = per_task_sums(record, 2, 4)  # the default: plain sums / length
    torch.testing.assert_close(mean_b + mean_a, losses.reshape(4, 2, 2).sum(0) / 4)


def test_truncated_bptt_log_mean_equals_autograd_of_the_objective():
    H = 12
    th = THETA.clone().requires_grad_()
    ref = torch.autograd.grad(log_mean_objective(th, H, H), th)[0]
    hg = TruncatedBPTT(num_tasks=1, truncation=H, schedule=ConstantLength(H),
                       stagger=False, segment_objective="log_mean")(SYSTEM, {"theta": THETA})
    torch.testing.assert_close(hg.grad["theta"], ref, rtol=1e-10, atol=1e-12)
    th = THETA.clone().requires_grad_()
    torch.testing.assert_close(hg.outer_loss, log_mean_objective(th, H, H).detach())


def test_pes_is_unbiased_for_the_log_mean_objective():
    # not quadratic in θ: smoothing adds O(σ²) bias, far below the tolerance at σ = 0.01
    H, K = 20, 2
    th = THETA.clone().requires_grad_()
    exact = float(torch.autograd.grad(log_mean_objective(th, H, K), th)[0])
    mean, se = summed_estimates(lambda r: PES(num_tasks=500, truncation=K, sigma=0.01,
                                              schedule=ConstantLength(H), stagger=False,
                                              seed=r, segment_objective="log_mean"),
                                H // K, 16)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.1 * abs(exact)


def test_full_episode_es_matches_exact_gradient_in_expectation():
    H = 12
    exact = exact_grad(H, H)
    mean, se = summed_estimates(lambda r: ES(num_tasks=500, truncation=H, sigma=0.1,
                                             schedule=ConstantLength(H), full_episode=True,
                                             seed=r), 1, 16)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_truncated_bptt_equals_full_bptt_when_one_truncation_covers_the_episode():
    torch.manual_seed(0)
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, dtype=torch.float64)

    def inner(theta, phi):
        r = X @ theta["w"] - y
        return 0.5 * (r @ r) / len(y) + 0.5 * (phi["penalty"] * theta["w"] ** 2).sum()

    def outer(theta, phi):
        return ((X[:10] @ theta["w"] - y[:10]) ** 2).mean()

    K = 15
    problem = BilevelProblem(inner, outer, inner_optimizer=sgd(0.3), inner_steps=K)
    phi = {"penalty": torch.full((4,), 0.2, dtype=torch.float64)}
    theta0 = {"w": torch.zeros(4, dtype=torch.float64)}
    hg = TruncatedBPTT(num_tasks=1, truncation=K, stagger=False)(problem, phi, theta0)

    p = phi["penalty"].clone().requires_grad_()
    theta, total = {"w": theta0["w"].clone().requires_grad_()}, 0.0
    for _ in range(K):  # the same objective by hand: mean outer loss after each step
        g = torch.autograd.grad(inner(theta, {"penalty": p}), theta["w"],
                                create_graph=True)[0]
        theta = {"w": theta["w"] - 0.3 * g}
        total = total + outer(theta, None)
    ref = torch.autograd.grad(total / K, p)[0]
    torch.testing.assert_close(hg.grad["penalty"], ref, rtol=1e-10, atol=1e-12)


class Exploding(InfluenceBalancing):
    """Influence balancing whose task seeds divisible by 3 blow up after 2 steps."""

    def step(self, phi, state, seeds, steps):
        new, loss = super().step(phi, state, seeds, steps)
        bad = (seeds % 3 == 0) & (steps >= 2)
        return new, torch.where(bad, torch.full_like(loss, float("nan")), loss)


@pytest.mark.parametrize("make", [
    lambda: PES(num_tasks=12, truncation=5, sigma=0.1, schedule=ConstantLength(8)),
    lambda: ES(num_tasks=12, truncation=5, sigma=0.1, schedule=ConstantLength(8)),
    lambda: TruncatedBPTT(num_tasks=12, truncation=5, schedule=ConstantLength(8)),
])
def test_nonfinite_runs_are_reset_and_never_reach_the_gradient(make):
    est, state, resets = make(), None, 0
    for _ in range(4):
        hg = est(Exploding(), {"theta": THETA}, None, state)
        state = hg.state
        resets += hg.diagnostics["nonfinite_resets"]
        assert torch.isfinite(hg.grad["theta"]).all()
        assert torch.isfinite(hg.outer_loss)
    assert resets > 0


def test_log_uniform_horizons_and_staggered_starts():
    sched = LogUniformLength(100, 1000)
    est = PES(num_tasks=64, truncation=10, schedule=sched, seed=3)
    st = est.start(SYSTEM, {"theta": THETA}, None)
    h = st.unroll.horizon
    assert int(h.min()) >= 100 and int(h.max()) <= 1000
    assert float(torch.log(h.double()).std()) > 0.4  # spread on the log scale
    assert len(set(st.unroll.step.tolist())) > 32  # not in lockstep
    assert bool((st.unroll.step < h).all())


def test_sharded_particles_equal_one_process():
    est = PES(num_tasks=6, truncation=4, sigma=0.1, schedule=ConstantLength(5), seed=1)
    phi = {"theta": THETA}
    st = est.start(SYSTEM, phi, None)
    seed = est.perturbation_seed(st)
    whole_state, whole = advance_particles(SYSTEM, phi, st.unroll, seed, 0.1, 4,
                                           ConstantLength(5))
    parts = [advance_particles(SYSTEM, phi, st.unroll.rows(sl), seed, 0.1, 4,
                               ConstantLength(5), num_tasks=6, tasks=sl)
             for sl in (slice(0, 2), slice(2, 6))]
    diffs = PESLossDiffs.cat([p[1] for p in parts])
    joined = UnrollState.cat([p[0] for p in parts])
    torch.testing.assert_close(diffs.before, whole.before, rtol=0, atol=0)
    torch.testing.assert_close(joined.inner["s"], whole_state.inner["s"], rtol=0, atol=0)
    g1, _ = combine(phi, None, seed, whole, 0.1)
    g2 = est.finish(phi, st, joined, seed, diffs).grad
    torch.testing.assert_close(g1["theta"], g2["theta"], rtol=0, atol=0)


def test_state_round_trips_through_state_dict():
    est = PES(num_tasks=4, truncation=3, sigma=0.1, schedule=ConstantLength(5))
    hg = est(SYSTEM, {"theta": THETA}, None, None)
    st2 = TruncatedState.from_state_dict(hg.state.state_dict())
    a = est(SYSTEM, {"theta": THETA}, None, hg.state)
    b = est(SYSTEM, {"theta": THETA}, None, st2)
    torch.testing.assert_close(a.grad["theta"], b.grad["theta"], rtol=0, atol=0)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="sigma"):
        PES(sigma=0.0)
    with pytest.raises(ValueError, match="truncation"):
        TruncatedBPTT(truncation=0)
    with pytest.raises(ValueError, match="ConstantLength"):
        ES(full_episode=True, schedule=LogUniformLength(2, 5))
    with pytest.raises(ValueError, match="segment_objective"):
        PES(segment_objective="median")
