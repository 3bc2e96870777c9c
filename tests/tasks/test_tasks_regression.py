"""Regression families: ranges, exact targets, determinism, hardness knobs, TaskBatch checks."""

import math

import pytest
import torch

from metaopt.registry import TASKS
from tasks import LinearMixtureTasks, SinusoidTasks, TaskBatch, TaskSampler, sinusoid
from tasks.linear_mixture import hard_task_scales


def test_sinusoid_shapes_ranges_and_exact_targets():
    batch = SinusoidTasks(k_shot=5, q_query=7, seed=1).sample(2000)
    assert batch.support_x.shape == (2000, 5, 1) and batch.query_y.shape == (2000, 7, 1)
    amp, phase = batch.info["amplitude"], batch.info["phase"]
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0 and phase.max() <= math.pi
    for x in (batch.support_x, batch.query_x):
        assert x.min() >= -5 and x.max() <= 5
    # y = A sin(x - φ) exactly (no noise by default)
    expected = amp[:, None, None] * torch.sin(batch.support_x - phase[:, None, None])
    torch.testing.assert_close(batch.support_y, expected)
    torch.testing.assert_close(batch.query_y, sinusoid(batch.query_x, amp[:, None, None],
                                                       phase[:, None, None]))
    # uniform: mean of U[0.1, 5] is 2.55 (std 1.41 → s.e. 0.03 at n=2000)
    assert abs(float(amp.mean()) - 2.55) < 0.15
    assert abs(float(phase.mean()) - math.pi / 2) < 0.1
    # support and query points are not the same draws
    assert not torch.equal(batch.support_x[:, :5], batch.query_x[:, :5])


def test_sinusoid_deterministic_by_seed_and_generator():
    a, b = SinusoidTasks(seed=3), SinusoidTasks(seed=3)
    for _ in range(2):
        x, y = a.sample(4), b.sample(4)
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y)
    c = SinusoidTasks(seed=4).sample(4)
    assert not torch.equal(c.support_x, SinusoidTasks(seed=3).sample(4).support_x)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(a.sample(3, g1).support_y, SinusoidTasks(seed=0).sample(3, g2).support_y)


def test_sinusoid_bad_config():
    with pytest.raises(ValueError, match="k_shot"):
        SinusoidTasks(k_shot=0)
    with pytest.raises(ValueError, match="amplitude_range"):
        SinusoidTasks(amplitude_range=(5.0, 0.1))
    with pytest.raises(ValueError, match="batch_size"):
        SinusoidTasks().sample(0)


def test_hard_task_scales_condition_number():
    s = hard_task_scales(8, 100.0)
    assert float(s.max() / s.min()) == pytest.approx(100.0, rel=1e-5)
    assert float(s.max()) == pytest.approx(1.0)
    assert torch.all(s[1:] < s[:-1])
    with pytest.raises(ValueError, match="hardness"):
        hard_task_scales(3, 0.5)


def test_linear_mixture_targets_and_knobs():
    fam = LinearMixtureTasks(dim=4, k_shot=6, q_query=6, hardness=50.0, hard_fraction=0.3,
                             noise_std=0.0, seed=2)
    batch = fam.sample(4000)
    w = batch.info["weights"]
    torch.testing.assert_close(batch.support_y[..., 0],
                               torch.einsum("bmd,bd->bm", batch.support_x, w))
    hard = batch.info["is_hard"]
    # hard_fraction: Bernoulli(0.3) over 4000 tasks, s.e. 0.007
    assert abs(float(hard.float().mean()) - 0.3) < 0.03
    # input variances: easy tasks 1 in every direction, hard ones 1 … 1/50
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    var_easy = x[~hard].pow(2).mean(dim=(0, 1))
    var_hard = x[hard].pow(2).mean(dim=(0, 1))
    torch.testing.assert_close(var_easy, torch.ones(4), atol=0.05, rtol=0)
    torch.testing.assert_close(var_hard, hard_task_scales(4, 50.0), rtol=0.1, atol=0)
    # optima centres: 0 for easy, center_gap / sqrt(d) per coordinate for hard
    torch.testing.assert_close(w[hard].mean(0), torch.full((4,), 1.0), atol=0.1, rtol=0)
    torch.testing.assert_close(w[~hard].mean(0), torch.zeros(4), atol=0.1, rtol=0)


def test_linear_mixture_extremes_and_errors():
    assert not LinearMixtureTasks(hard_fraction=0.0).sample(50).info["is_hard"].any()
    assert LinearMixtureTasks(hard_fraction=1.0).sample(50).info["is_hard"].all()
    with pytest.raises(ValueError, match="hard_fraction"):
        LinearMixtureTasks(hard_fraction=1.5)
    with pytest.raises(ValueError, match="hardness"):
        LinearMixtureTasks(hardness=0.1)


def test_task_batch_rejects_mismatched_shapes():
    x, y = torch.zeros(2, 5, 3), torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match="support_x has 5 examples per task but support_y"):
        TaskBatch(x, torch.zeros(2, 4, 1), x, y)
    with pytest.raises(ValueError, match=r"support_x features .* differ from query_x"):
        TaskBatch(x, y, torch.zeros(2, 5, 4), y)
    with pytest.raises(ValueError, match="task axis"):
        TaskBatch(x, y, torch.zeros(3, 5, 3), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match=r"query_y has labels outside 0\.\.2"):
        TaskBatch(x, torch.zeros(2, 5, dtype=torch.long), x,
                  torch.full((2, 5), 3, dtype=torch.long), num_classes=3)


def test_registered_and_protocol():
    assert TASKS.get("sinusoid") is SinusoidTasks
    assert TASKS.get("linear_mixture") is LinearMixtureTasks
    for name in ("glyphs", "omniglot", "mnist", "digits"):
        assert name in TASKS
    assert isinstance(SinusoidTasks(), TaskSampler)
    assert isinstance(LinearMixtureTasks(), TaskSampler)
