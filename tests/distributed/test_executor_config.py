"""The ``executor:`` run-config switch without Ray: parsing, one-line errors, refusals,
and in-process sharding (``kind: local`` with several workers) giving the plain run's
numbers — the Ray runs of the same configs are in ``test_ray.py``."""

from __future__ import annotations

import pytest
import torch

from metaopt.distributed.executor import _check_gpus, actor_options
from metaopt.errors import ConfigError
from metaopt.runner.checkpoint import write_checkpoint
from metaopt.runner.config import parse_run_config, resume_overrides, to_dict
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into

SINUSOID = {"hidden": [8, 8], "k_shot": 3, "q_query": 4, "meta_batch": 4, "eval_tasks": 2,
            "eval_query": 5, "eval_shots": [2], "eval_steps": [0, 1]}
LOPT = {"optimizer": "small_fc_lopt",
        "task": {"kind": "mlp", "param": "sp", "width": 8, "depth": 1, "dataset": "digits",
                 "batch_size": 8},
        "num_tasks": 4, "truncation": 3, "horizon_low": 4, "horizon_high": 8,
        "warmup_steps": 2, "eval_steps": 3, "eval_tasks": 1, "eval_widths": [8]}


def cfg(experiment: str, settings: dict, executor: dict | None = None, **top):
    data = {"experiment": experiment, "steps": 3, "seed": 1, "settings": settings, **top}
    if executor is not None:
        data["executor"] = executor
    return parse_run_config(data, source="run.yaml")


def test_executor_section_parses_with_defaults():
    assert cfg("sinusoid", SINUSOID).executor.is_default
    ray = cfg("sinusoid", SINUSOID, {"kind": "ray"}).executor
    assert (ray.kind, ray.num_workers, ray.address) == ("ray", 2, "auto")
    assert ray.options() == {"kind": "ray", "address": "auto", "num_workers": 2,
                             "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                             "max_restarts": 1, "timeout_s": 120.0}
    local = cfg("sinusoid", SINUSOID, {"num_workers": 2}).executor
    assert not local.is_default and local.options() == {"kind": "local", "num_workers": 2}
    again = parse_run_config(to_dict(cfg("sinusoid", SINUSOID, {"kind": "ray"})))
    assert again.executor == ray


@pytest.mark.parametrize("section,message", [
    ({"kind": "mpi"}, "key 'executor.kind': expected one of 'local', 'ray'"),
    ({"kind": "ray", "workers": 2}, "unknown key 'executor.workers'"),
    ({"kind": "ray", "num_workers": 0}, "invalid executor .*num_workers must be >= 1"),
    ({"kind": "ray", "num_workers": "2"}, "key 'executor.num_workers': expected"),
    ({"kind": "ray", "timeout_s": 0}, "timeout_s must be > 0"),
    ({"kind": "ray", "gpus_per_worker": -1}, "gpus_per_worker must be >= 0"),
    ({"kind": "local", "gpus_per_worker": 1}, "gpus_per_worker needs kind: ray"),
    ({"kind": "ray", "address": "nowhere"}, "address must be 'auto'"),
    ({"kind": "ray", "max_restarts": -1}, "max_restarts must be >= 0"),
])
def test_bad_executor_fields_are_one_line_errors_naming_the_field(section, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg("sinusoid", SINUSOID, section)
    assert "\n" not in str(err.value) and str(err.value).startswith("run.yaml")


@pytest.mark.parametrize("experiment,settings,message", [
    ("hypercleaning", {}, "experiment 'hypercleaning' cannot run with executor kind 'ray'"),
    ("ridge_hyper", {}, "experiment 'ridge_hyper' cannot run with executor kind 'ray'"),
    ("sinusoid", {**SINUSOID, "algorithm": "pretrained"}, "algorithm 'pretrained'"),
    ("sinusoid", {**SINUSOID, "meta_batch": 1}, "meta_batch=1 is fewer than"),
    ("lopt_metatrain", {**LOPT, "estimator": "es"}, "distributes PES only"),
])
def test_experiments_that_cannot_distribute_refuse(experiment, settings, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg(experiment, settings, {"kind": "ray", "num_workers": 2})
    assert "\n" not in str(err.value)


def test_lopt_refuses_gpu_workers_and_staleness_without_pes():
    with pytest.raises(ConfigError, match="gpus_per_worker > 0 is not supported"):
        cfg("lopt_metatrain", LOPT, {"kind": "ray", "gpus_per_worker": 1})
    with pytest.raises(ConfigError, match="max_staleness > 0 needs estimator 'pes'"):
        cfg("lopt_metatrain", {**LOPT, "estimator": "es", "max_staleness": 1})


def test_executor_may_change_on_resume():
    base = cfg("sinusoid", SINUSOID)
    new, changes = resume_overrides(base, ["executor.kind=ray", "executor.num_workers=2"])
    assert new.executor.kind == "ray" and "executor" in changes


def test_ray_actor_request_and_missing_gpus():
    assert actor_options(1, 0.5, 2) == {"num_cpus": 1, "num_gpus": 0.5, "max_restarts": 2,
                                        "max_task_retries": 0}
    _check_gpus({"CPU": 2.0}, 2, 0)  # no GPUs asked: fine
    with pytest.raises(Exception, match=r"2 workers need 2 GPUs, the Ray cluster has 0"):
        _check_gpus({"CPU": 2.0}, 2, 1)


def _params(exp) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in exp.trainer.meta_parameters.items()}


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-6)])
def test_local_sharded_sinusoid_equals_the_plain_run(dtype, rtol):
    # Σ_i (n_i/N)·grad_i over slices is the batch mean gradient up to rounding.
    plain = build_experiment(cfg("sinusoid", SINUSOID, dtype=dtype))
    sharded = build_experiment(cfg("sinusoid", SINUSOID, {"num_workers": 3}, dtype=dtype))
    assert sharded.executor.num_workers == 3 and plain.executor is None
    for step in (1, 2, 3):
        a, b = plain.meta_step(step)["loss"], sharded.meta_step(step)["loss"]
        assert abs(a - b) <= rtol * abs(a)
    pa, pb = _params(plain), _params(sharded)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.slow  # ~15 s on the loaded 2-core machine; test_ray.py checks it on Ray
def test_local_pes_pool_lopt_is_bitwise_the_plain_run():
    plain = build_experiment(cfg("lopt_metatrain", LOPT))
    pooled = build_experiment(cfg("lopt_metatrain", LOPT, {"num_workers": 2}))
    assert pooled.pool is not None and plain.pool is None
    assert [plain.meta_step(s) for s in (1, 2)] == [pooled.meta_step(s) for s in (1, 2)]
    assert all(torch.equal(plain.phi[k], pooled.phi[k]) for k in plain.phi)


def test_stale_lopt_resumes_bit_exactly(tmp_path):
    # max_staleness=1: the checkpoint carries the queued truncation's loss differences.
    c = cfg("lopt_metatrain", {**LOPT, "max_staleness": 1}, {"num_workers": 2}, steps=3)
    straight = build_experiment(c)
    assert straight.pool.max_staleness == 1 and straight.pool.executor.num_workers == 2
    ref = [straight.meta_step(s) for s in (1, 2, 3)]
    first = build_experiment(c)
    first.meta_step(1)
    path = write_checkpoint(tmp_path, step=1, experiment=c.experiment, config=to_dict(c),
                            state=checkpoint_state(first, 0.0))
    resumed = build_experiment(c)
    load_into(resumed, c, path)
    assert [resumed.meta_step(s) for s in (2, 3)] == ref[1:]
    assert all(torch.equal(straight.phi[k], resumed.phi[k]) for k in straight.phi)

def test_local_sharded_few_shot_equals_the_plain_run():
    # BatchNorm uses per-task batch statistics, so slicing the meta-batch changes
    # nothing but rounding. Compared on the meta-gradient, relative to its largest
    # entry: the conv biases before BatchNorm have a zero true gradient (BN removes
    # them), so their gradients are rounding noise that Adam would amplify.
    from torch.nn import functional as F

    from metaopt.distributed import LocalExecutor
    from metaopt.distributed.sharding import learner_meta_gradient

    settings = {"dataset": "glyphs", "transfer": None, "glyph_classes": 3, "n_way": 3,
                "k_shot": 1, "q_query": 2, "channels": 4, "blocks": 2, "meta_batch": 3,
                "eval_tasks": 2, "eval_steps": [1]}
    plain = build_experiment(cfg("few_shot", settings, dtype="float64"))
    sharded = build_experiment(cfg("few_shot", settings, {"num_workers": 2}, dtype="float64"))
    a, b = plain.meta_step(1)["loss"], sharded.meta_step(1)["loss"]
    assert abs(a - b) <= 1e-12 * abs(a)
    batch = plain.train_sampler.sample(3, torch.Generator().manual_seed(5))
    data = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    tr = plain.trainer
    tr.zero_grad()
    tr.learner.meta_loss(*data, F.cross_entropy).backward()
    ref = {k: p.grad.clone() for k, p in tr.meta_parameters.items()}
    make = lambda: tr.learner  # noqa: E731 (in-process: no pickling needed)
    got = learner_meta_gradient(LocalExecutor(2), make, tr.meta_parameters, *data,
                                F.cross_entropy).grads
    scale = max(float(g.abs().max()) for g in ref.values())
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-12 * scale
