"""scripts/ship_pretrained.py: a run directory → a native checkpoint with provenance,
optionally with its step scale calibrated on the run's training tasks."""

from __future__ import annotations

import json

import pytest
import torch

from metaopt.lopt import load_checkpoint
from metaopt.runner.config import parse_run_config
from metaopt.runner.loop import train
from metaopt.runner.rundir import create_run_dir
from tests.script_module import load_script

TASK = {"kind": "mlp", "param": "mup", "width": 16, "depth": 1, "dataset": "digits",
        "batch_size": 16}


@pytest.fixture(scope="module")
def ship():
    return load_script("ship_pretrained")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = parse_run_config({
        "experiment": "lopt_metatrain", "seed": 2, "steps": 2, "checkpoint_every": 1,
        "eval_every": 2,
        "settings": {"task": TASK, "num_tasks": 2, "truncation": 3, "horizon_low": 4,
                     "horizon_high": 6, "meta_loss": "log", "eval_steps": 4,
                     "eval_tasks": 1, "eval_widths": [16]}})
    run = create_run_dir(tmp_path_factory.mktemp("run") / "r", cfg, ["pytest"])
    train(cfg, run, progress=False)
    return run


def test_ships_a_chosen_step_with_provenance(ship, run_dir, tmp_path):
    ship.main([str(run_dir), "plain", "--out", str(tmp_path), "--step", "1"])
    meta = json.loads((tmp_path / "plain" / "lopt.json").read_text())["metadata"]
    assert meta["outer_steps"] == 1 and meta["config"]["settings"]["meta_loss"] == "log"
    assert "step_scale_calibration" not in meta
    assert meta["ship_command"].endswith(f"plain --out {tmp_path} --step 1")
    assert "commit" in meta["ship_git"]
    with pytest.raises(SystemExit, match="step 7"):
        ship.main([str(run_dir), "x", "--out", str(tmp_path), "--step", "7"])


def test_calibrated_step_is_folded_into_step_mult(ship, run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ship, "STEP_GRID", (0.5, 1.0, 40.0))
    ship.main([str(run_dir), "plain", "--out", str(tmp_path)])
    ship.main([str(run_dir), "cal", "--out", str(tmp_path), "--calibrate-step", "meta"])
    plain, cal = load_checkpoint(tmp_path / "plain"), load_checkpoint(tmp_path / "cal")
    meta = json.loads((tmp_path / "cal" / "lopt.json").read_text())["metadata"]
    info = meta["step_scale_calibration"]
    objective = {float(k): v for k, v in info["objective"].items()}
    assert set(objective) == {0.5, 1.0, 40.0} and info["meta_loss"] == "log"
    assert info["objective_kind"] == "meta" and info["horizon"] == 6
    assert info["scale"] == min(objective, key=objective.get)
    assert cal.config()["step_mult"] == pytest.approx(plain.config()["step_mult"]
                                                      * info["scale"])
    for (k, a), (_, b) in zip(plain.state_dict().items(), cal.state_dict().items()):
        assert torch.equal(a, b), k


def test_select_step_ships_the_best_calibrated_checkpoint(ship, run_dir, tmp_path,
                                                          monkeypatch):
    """--select-step --calibrate-step final: every checkpoint is calibrated on the log of
    its final training loss after --horizon steps; the lowest one is shipped."""
    monkeypatch.setattr(ship, "STEP_GRID", (0.5, 1.0))
    ship.main([str(run_dir), "sel", "--out", str(tmp_path), "--calibrate-step", "final",
               "--horizon", "5", "--select-step"])
    meta = json.loads((tmp_path / "sel" / "lopt.json").read_text())["metadata"]
    chosen = meta["checkpoint_selection"]
    assert set(chosen) == {"1", "2"}
    assert meta["outer_steps"] == int(min(chosen, key=chosen.get))
    info = meta["step_scale_calibration"]
    assert info["objective_kind"] == "final" and info["horizon"] == 5
    assert chosen[str(meta["outer_steps"])] == min(info["objective"].values())
    with pytest.raises(SystemExit, match="select-step"):
        ship.main([str(run_dir), "x", "--out", str(tmp_path), "--select-step"])
