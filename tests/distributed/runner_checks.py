"""Runner-level Ray checks, run by ``ray_checks.py`` inside its loopback Ray session.

The ``executor:`` switch through the runner loop (:func:`metaopt.runner.loop.train`
on run directories): the same config with ``kind: ray`` vs without, an interrupted
and resumed Ray run vs an uninterrupted one, and the PES pool's bounded staleness
under a killed worker. Each function returns numbers for ``test_ray.py`` to assert.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from pathlib import Path

import torch

from metaopt.runner.checkpoint import latest_checkpoint
from metaopt.runner.config import parse_run_config
from metaopt.runner.experiment import Experiment
from metaopt.runner.loop import build_experiment, train
from metaopt.runner.rundir import CHECKPOINTS, create_run_dir

SINUSOID = {"hidden": [16, 16], "k_shot": 4, "q_query": 4, "meta_batch": 5, "eval_tasks": 2,
            "eval_query": 5, "eval_shots": [2], "eval_steps": [0, 1]}
LOPT = {"optimizer": "small_fc_lopt",
        "task": {"kind": "mlp", "param": "sp", "width": 8, "depth": 1, "dataset": "digits",
                 "batch_size": 8},
        "num_tasks": 4, "truncation": 3, "horizon_low": 4, "horizon_high": 8,
        "warmup_steps": 2, "eval_steps": 2, "eval_tasks": 1, "eval_widths": [8]}
RAY = {"kind": "ray", "num_workers": 2, "cpus_per_worker": 1, "timeout_s": 60}


class InterruptAt(Experiment):
    """An experiment that SIGINTs its own process after meta-step ``at`` (as Ctrl-C)."""

    def __init__(self, inner: Experiment, at: int) -> None:
        self.inner, self.at = inner, at
        self.splits, self.executor = inner.splits, inner.executor

    def meta_step(self, step: int):
        metrics = self.inner.meta_step(step)
        if step == self.at:
            signal.raise_signal(signal.SIGINT)
        return metrics

    def evaluate(self, split: str):
        return self.inner.evaluate(split)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    def generators(self) -> Mapping[str, torch.Generator]:
        return self.inner.generators()


def _cfg(experiment: str, settings: dict, executor: dict | None, steps: int, **top):
    data = {"experiment": experiment, "steps": steps, "seed": 2, "settings": settings,
            "log": {"progress": False, "tensorboard": False}, **top}
    if executor is not None:
        data["executor"] = executor
    return parse_run_config(data)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]


def _run(cfg, run_dir: Path, *, interrupt_at: int | None = None, resume: bool = False,
         executor=None):
    """Train in ``run_dir``; the final state of the experiment and the result.

    ``executor``: reuse these workers (starting actors costs seconds each); None: the
    run builds its own from ``cfg.executor`` and shuts them down.
    """
    if not resume:
        create_run_dir(run_dir, cfg, ["test"])
    exp = build_experiment(cfg, executor=executor)
    ckpt = latest_checkpoint(run_dir / CHECKPOINTS) if resume else None
    try:
        result = train(cfg, run_dir, resume=ckpt, progress=False,
                       experiment=InterruptAt(exp, interrupt_at) if interrupt_at else exp)
        state = exp.state_dict()
    finally:
        if executor is None and exp.executor is not None:
            exp.executor.shutdown()
    return state, result


def _flat(state) -> dict[str, torch.Tensor]:
    out = {}

    def walk(prefix, node):
        if isinstance(node, torch.Tensor):
            out[prefix] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
    walk("", state)
    return out


def max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k in b:
        if b[k].is_floating_point():
            den = float(b[k].abs().max()) if b[k].numel() else 0.0
            num = float((a[k] - b[k]).abs().max()) if b[k].numel() else 0.0
            worst = max(worst, num / max(den, 1e-300))
        elif not torch.equal(a[k], b[k]):
            return float("inf")
    return worst


def sinusoid_switch(root: Path, ex) -> dict:
    """``executor: {kind: ray}`` vs no executor: metrics and final state, both dtypes.

    The float64 run starts its own workers from the config; the float32 run reuses ``ex``.
    """
    out = {}
    for dtype in ("float64", "float32"):
        local, _ = _run(_cfg("sinusoid", SINUSOID, None, 3, dtype=dtype), root / f"s-l-{dtype}")
        ray, _ = _run(_cfg("sinusoid", SINUSOID, RAY, 3, dtype=dtype), root / f"s-r-{dtype}",
                      executor=None if dtype == "float64" else ex)
        a, b = _records(root / f"s-r-{dtype}"), _records(root / f"s-l-{dtype}")
        out[f"sinusoid_{dtype}_state_rel"] = max_rel(_flat(ray), _flat(local))
        out[f"sinusoid_{dtype}_metric_rel"] = max(
            abs(x[k] - y[k]) / max(abs(y[k]), 1e-300) for x, y in zip(a, b)
            for k in y if isinstance(y[k], float))
        out[f"sinusoid_{dtype}_records"] = [len(a), len(b)]
    return out


def lopt_switch_and_resume(root: Path, ex) -> dict:
    """PES through the pool on Ray (workers ``ex``): bitwise the plain run; interrupt +
    resume (a fresh driver-side experiment, the workers reloaded) exact."""
    out = {}
    plain, _ = _run(_cfg("lopt_metatrain", LOPT, None, 4), root / "l-plain")
    ray, _ = _run(_cfg("lopt_metatrain", LOPT, RAY, 4), root / "l-ray", executor=ex)
    out["lopt_ray_equal"] = all(torch.equal(x, _flat(plain)[k]) for k, x in _flat(ray).items())
    out["lopt_ray_metrics_equal"] = _records(root / "l-ray") == _records(root / "l-plain")
    # Staleness 1: an interrupted Ray run resumed (a fresh driver, fresh workers)
    # against an uninterrupted in-process run of the same config.
    stale = {**LOPT, "max_staleness": 1}
    ref, _ = _run(_cfg("lopt_metatrain", stale, None, 4), root / "l-stale-ref")
    cfg = _cfg("lopt_metatrain", stale, RAY, 4)
    _, first = _run(cfg, root / "l-stale", interrupt_at=2, executor=ex)
    out["interrupted"] = [first.status, first.step]
    resumed, second = _run(cfg, root / "l-stale", resume=True, executor=ex)
    out["resumed"] = [second.status, second.step]
    out["lopt_stale_resume_equal"] = all(torch.equal(x, _flat(ref)[k])
                                         for k, x in _flat(resumed).items())
    out["lopt_stale_metrics_equal"] = _records(root / "l-stale") == \
        _records(root / "l-stale-ref")
    out["lopt_stale_differs_from_plain"] = any(not torch.equal(ref["phi"][k], plain["phi"][k])
                                               for k in plain["phi"])
    return out


def stale_pool_kill(ex, kill_pid) -> dict:
    """PES pool with max_staleness=1 on Ray; a worker killed with a truncation queued."""
    from test_staleness import STEPS, run_pool, setup, stale_reference

    from metaopt.distributed.pes_pool import PESPool

    ref, _ = stale_reference(1)
    est, system, phi = setup()
    pool = PESPool(ex, est, system, phi, sync_every=100, max_staleness=1)
    got, p = run_pool(pool, phi, 2)  # truncation 2 is queued on both workers now
    before = list(ex.rebuilds)
    kill_pid(ex.pids()[1])
    more, _ = run_pool(pool, p, STEPS - 2)
    return {"stale_kill_max_abs": max(float((a - b).abs().max())
                                      for a, b in zip(got + more, ref)),
            "stale_kill_rebuilds": ex.rebuilds[len(before):]}
