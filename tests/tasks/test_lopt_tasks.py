"""Learned-optimizer tasks: shapes, determinism, vmap-ability, μP scales, held-out seeds."""

import pytest
import torch

from tasks.lopt_tasks import (
    HELDOUT_SEED_BASE,
    LoptTask,
    MLPFamily,
    conv_task,
    default_families,
    get_task,
    heldout_suite,
    init_stacked,
    is_heldout,
    logreg_task,
    mlp_task,
    sample_stacked,
    task_sampler,
    teacher_task,
    transformer_task,
)


def _tasks() -> list[LoptTask]:
    return [teacher_task(), mlp_task("mup", 64, 2, "relu", "digits"),
            mlp_task("sp", 32, 1, "tanh", "mnist1d"), conv_task(8, "relu", "digits"),
            transformer_task(16, 1, vocab=8, seq_len=8), logreg_task("digits")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_teacher_task_shapes_and_labels():
    task = get_task("teacher_mlp_64_32_10")
    params = task.init_params(_gen(0))
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "w0": (32, 64), "b0": (32,), "w1": (10, 32), "b1": (10,)}
    x, y = task.sample_batch(_gen(1), "train")
    assert x.shape == (128, 64) and y.shape == (128,)
    assert task.family == "teacher"
    # labels are the argmax of one fixed linear teacher: the same input gets the same label
    x2, y2 = task.sample_batch(_gen(1), "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert 1.5 < float(task.loss(params, (x, y))) < 4.0


@pytest.mark.parametrize("task", _tasks(), ids=lambda t: t.name)
def test_deterministic_given_generator(task):
    a, b = task.init_params(_gen(3)), task.init_params(_gen(3))
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
    ba, bb = task.sample_batch(_gen(4), "train"), task.sample_batch(_gen(4), "train")
    assert all(torch.equal(u, v) for u, v in zip(ba, bb))
    assert not torch.equal(task.sample_batch(_gen(5), "train")[0], ba[0])
    with pytest.raises(ValueError, match="split"):
        task.sample_batch(_gen(4), "val")


@pytest.mark.parametrize("task", _tasks(), ids=lambda t: t.name)
def test_vmap_grad_equals_per_task_loop(task):
    n = 3
    params = [task.init_params(_gen(10 + i)) for i in range(n)]
    # non-zero readouts so every gradient is informative
    params = [{k: v + 0.01 * torch.randn(v.shape, generator=_gen(20 + i))
               for k, v in p.items()} for i, p in enumerate(params)]
    batches = [task.sample_batch(_gen(30 + i), "train") for i in range(n)]
    stacked_p = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    stacked_b = tuple(torch.stack([b[j] for b in batches]) for j in range(len(batches[0])))
    grads, losses = torch.func.vmap(torch.func.grad_and_value(task.loss))(stacked_p, stacked_b)
    for i in range(n):
        g, loss = torch.func.grad_and_value(task.loss)(params[i], batches[i])
        torch.testing.assert_close(losses[i], loss, rtol=1e-5, atol=1e-6)
        for k in g:
            torch.testing.assert_close(grads[k][i], g[k], rtol=1e-4, atol=1e-6)


def test_mup_scales_follow_width():
    """Hidden weights get 1/width_mult = 128/width; input, readout and biases 1; SP none."""
    task = mlp_task("mup", 512, 2, "relu", "digits")
    assert task.mup_scales == {"w0": 1.0, "b0": 1.0, "w1": 0.25, "b1": 1.0, "w2": 1.0,
                               "b2": 1.0}
    assert set(task.mup_scales) == set(task.init_params(_gen(0)))
    assert mlp_task("mup", 128, 2).mup_scales["w1"] == 1.0
    assert mlp_task("sp", 512, 2).mup_scales is None
    # μP readout is zero-initialised: the initial loss is exactly log(10)
    p = task.init_params(_gen(0))
    assert float(p["w2"].abs().max()) == 0.0


def test_heldout_suites_disjoint_from_training():
    suites = {name: heldout_suite(name) for name in
              ("mlp_mup_heldout", "mlp_sp_heldout", "mixed_heldout")}
    held_names = {t.name for tasks in suites.values() for t in tasks}
    assert all(is_heldout(t) for tasks in suites.values() for t in tasks)
    sample = task_sampler(default_families())
    gen = _gen(0)
    for _ in range(200):
        t = sample(gen)
        assert not is_heldout(t) and t.name not in held_names
        assert t.config["seed"] < HELDOUT_SEED_BASE


def test_validation_suites_are_the_test_kinds_at_other_seeds():
    for param in ("mup", "sp"):
        val, test = heldout_suite(f"mlp_{param}_val"), heldout_suite(f"mlp_{param}_heldout")
        assert all(is_heldout(t) for t in val)
        assert {t.name for t in val}.isdisjoint({t.name for t in test})
        strip = [{k: v for k, v in t.config.items() if k != "seed"} for t in val]
        assert strip == [{k: v for k, v in t.config.items() if k != "seed"} for t in test]


def test_sampler_refuses_heldout_family():
    class Leaky:
        name = "leaky"

        def sample(self, gen):
            return heldout_suite("mlp_sp_heldout")[0]

    with pytest.raises(ValueError, match="held-out"):
        task_sampler([Leaky()])(_gen(0))


def test_width_parameter_of_suites():
    tasks = heldout_suite("mlp_mup_heldout", widths=(128, 1024))
    assert sorted({t.config["width"] for t in tasks}) == [128, 1024]
    wide = next(t for t in tasks if t.config["width"] == 1024)
    assert wide.init_params(_gen(0))["w1"].shape == (1024, 1024)


def test_family_samples_options():
    fam = MLPFamily("sp", widths=(16, 32), depths=(1,), datasets=("digits",))
    tasks = [fam.sample(_gen(i)) for i in range(10)]
    assert {t.config["width"] for t in tasks} <= {16, 32}
    assert all(t.family == "mlp_sp" for t in tasks)


@pytest.mark.parametrize("task", _tasks(), ids=lambda t: t.name)
def test_sgd_reduces_loss(task):
    """30 full-batch-ish SGD steps on one fixed batch lower that batch's loss."""
    params = task.init_params(_gen(0))
    batch = task.sample_batch(_gen(1), "train")
    start = float(task.loss(params, batch))
    grad = torch.func.grad(task.loss)
    for _ in range(30):
        g = grad(params, batch)
        params = {k: p - 0.1 * g[k] for k, p in params.items()}
    assert float(task.loss(params, batch)) < start - 0.05


def test_stacked_helpers_match_per_particle():
    task = mlp_task("mup", 32, 1, "relu", "digits")
    params = init_stacked(task, [_gen(1), _gen(2)])
    x, y = sample_stacked(task, [_gen(3), _gen(4)], "train")
    assert params["w0"].shape == (2, 32, 64) and x.shape == (2, 128, 64) and y.shape == (2, 128)
    assert torch.equal(params["w0"][1], task.init_params(_gen(2))["w0"])
    assert torch.equal(x[0], task.sample_batch(_gen(3), "train")[0])
