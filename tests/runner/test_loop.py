"""The training loop: exact resume after a real in-process signal, metrics, checkpoints."""

# The legacy global NumPy RNG is what the runner must save and restore.
# ruff: noqa: NPY002

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from metaopt.runner.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from metaopt.runner.config import parse_run_config
from metaopt.runner.experiment import Experiment, ExperimentConfig, register_experiment
from metaopt.runner.loop import train
from metaopt.runner.metrics import read_metrics
from metaopt.runner.rundir import create_run_dir, read_status


@dataclass
class NoisyConfig(ExperimentConfig):
    dim: int = 3


@register_experiment("noisy_toy", config=NoisyConfig)
class NoisyToy(Experiment):
    """Draws from every RNG each step, so resume is exact only if all are restored."""

    #: set by a test: raise this signal inside meta_step at this step
    signal_at: tuple[int, int] | None = None

    def __init__(self, config, *, device, dtype, seed):
        self.gen = torch.Generator().manual_seed(seed + 10)
        self.w = torch.zeros(config.dim, dtype=dtype, device=device)
        self.history: list[int] = []

    def meta_step(self, step):
        noise = (torch.randn(self.w.shape, dtype=self.w.dtype)
                 + torch.rand(self.w.shape, generator=self.gen, dtype=self.w.dtype)
                 + float(np.random.standard_normal()) + random.gauss(0.0, 1.0))
        self.w = 0.9 * self.w + 0.1 * noise
        self.history.append(step)
        if NoisyToy.signal_at and NoisyToy.signal_at[0] == step:
            signal.raise_signal(NoisyToy.signal_at[1])
        return {"loss": float((self.w**2).sum()), "lr": 0.1}

    def evaluate(self, split):
        return {"norm": float(self.w.norm() + torch.rand(()))}  # eval draws too

    def state_dict(self):
        return {"w": self.w, "history": list(self.history)}

    def load_state_dict(self, state):
        self.w, self.history = state["w"].clone(), list(state["history"])

    def generators(self):
        return {"gen": self.gen}


def make_run(tmp_path, name, **over):
    data = {"experiment": "noisy_toy", "steps": 10, "eval_every": 3, "checkpoint_every": 4,
            "dtype": "float64", "log": {"progress": False, "tensorboard": False}, **over}
    cfg = parse_run_config(data)
    run_dir = create_run_dir(tmp_path / name, cfg, ["test"])
    return cfg, run_dir


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.fixture(autouse=True)
def _no_signal():
    yield
    NoisyToy.signal_at = None


@pytest.mark.parametrize("sig, at", [(signal.SIGTERM, 6), (signal.SIGINT, 1),
                                     (signal.SIGTERM, 9)])
def test_signal_then_resume_is_bit_identical(tmp_path, sig, at, capsys):
    cfg, full_dir = make_run(tmp_path, "full")
    full = train(cfg, full_dir)
    assert full.status == "finished" and full.step == 10

    cfg, dir_b = make_run(tmp_path, "interrupted")
    NoisyToy.signal_at = (at, sig)
    stopped = train(cfg, dir_b)
    assert stopped.status == "interrupted" and stopped.step == at and stopped.signum == sig
    assert read_status(dir_b)["state"] == "interrupted"
    assert latest_checkpoint(dir_b / "checkpoints").name == f"step_{at:08d}"
    assert "received SIG" in capsys.readouterr().err
    NoisyToy.signal_at = None
    resumed = train(cfg, dir_b, resume=latest_checkpoint(dir_b / "checkpoints"))
    assert resumed.status == "finished" and resumed.step == 10

    a = read_checkpoint(full_dir / "checkpoints" / "step_00000010").state
    b = read_checkpoint(dir_b / "checkpoints" / "step_00000010").state
    assert torch.equal(a["experiment"]["w"], b["experiment"]["w"])
    assert a["experiment"]["history"] == b["experiment"]["history"] == list(range(1, 11))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert strip_time(read_metrics(full_dir)) == strip_time(read_metrics(dir_b))
    assert resumed.eval_metrics == full.eval_metrics


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    cfg, run_dir = make_run(tmp_path, "r")
    NoisyToy.signal_at = (5, signal.SIGTERM)
    train(cfg, run_dir)
    NoisyToy.signal_at = None
    # Pretend the run went on to step 7 and was then killed hard (no checkpoint).
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "split": "train", "time_s": 0, "loss": -1}) + "\n")
        f.write('{"step": 7, "spl')  # torn line
    train(cfg, run_dir, resume=run_dir / "checkpoints" / "step_00000005")
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, 11)) and all(r.get("loss") != -1 for r in records)


def test_metrics_and_checkpoint_schedule(tmp_path, capsys):
    cfg, run_dir = make_run(tmp_path, "s", keep_checkpoints=2, log={"progress": False,
                                                                    "tensorboard": False,
                                                                    "print_every": 5})
    train(cfg, run_dir)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6, 9, 10]
    assert all({"step", "split", "time_s"} <= set(r) for r in records)
    times = [r["time_s"] for r in records]
    assert times == sorted(times)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [8, 10]
    out = capsys.readouterr().out
    assert "step 5/10" in out and "val_norm=" in out


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    cfg, run_dir = make_run(tmp_path, "tb", log={"progress": False, "tensorboard": True})
    train(cfg, run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_metrics_are_rejected(tmp_path, monkeypatch):
    cfg, run_dir = make_run(tmp_path, "bad")
    monkeypatch.setattr(NoisyToy, "meta_step", lambda self, step: {"step": 1.0})
    with pytest.raises(ValueError, match="metric name 'step' is not allowed"):
        train(cfg, run_dir)
