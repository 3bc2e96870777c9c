"""Checkpoints an attacker or an accident could produce: each is refused with one clear
CheckpointError, quickly, without following links, blocking or reading huge files.

The step recorded inside a consistent checkpoint is validated (an int in [0, steps],
equal to the directory's); old checkpoints are pruned by rename-then-delete and the
leftovers of killed writers are cleaned when a run starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from metaopt.fileio import sha256_hex
from metaopt.runner.checkpoint import (
    CheckpointError,
    clean_stale,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from metaopt.runner.config import parse_run_config, to_dict
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into, train
from metaopt.runner.rundir import create_run_dir

STATE = {"w": torch.arange(4.0), "n": 3}


def rewrite_state_json(ckpt: Path, **fields) -> None:
    """Change fields of state.json and re-sign it, so the manifest stays consistent."""
    doc = json.loads((ckpt / "state.json").read_text())
    doc.update(fields)
    data = json.dumps(doc).encode()
    (ckpt / "state.json").write_bytes(data)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_hex(data), "bytes": len(data)}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def ridge_run(tmp_path: Path, name: str = "run", **over):
    data = {"experiment": "ridge_hyper", "steps": 6, "checkpoint_every": 2, "dtype": "float64",
            "log": {"progress": False, "tensorboard": False},
            "settings": {"n_features": 3, "relevant_features": 1, "n_train": 5, "n_val": 5,
                         "n_test": 5, "inner_steps": 2}, **over}
    cfg = parse_run_config(data)
    return cfg, create_run_dir(tmp_path / name, cfg, ["test"])


# --------------------------------------------------------------------------- the step


@pytest.mark.parametrize("step, message", [
    (50, "says step 50, the directory name says 200"),
    (-5, "'step' must be a non-negative int, got -5"),
    ("abc", "'step' must be a non-negative int, got 'abc'"),
    (2.0, "'step' must be a non-negative int, got 2.0"),
    (True, "'step' must be a non-negative int, got True"),
    (999999999999, "says step 999999999999, the directory name says 200"),
])
def test_recorded_step_is_validated(tmp_path, step, message):
    path = write_checkpoint(tmp_path, step=200, experiment="e", config={}, state=STATE)
    rewrite_state_json(path, step=step)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_step_beyond_the_run_is_refused_not_finished(tmp_path):
    """Before: step 999999999999 'finished' a 300-step run with no work and rc 0."""
    cfg, run_dir = ridge_run(tmp_path)
    exp = build_experiment(cfg)
    big = 999999999999
    ckpt = write_checkpoint(run_dir / "checkpoints", step=big, experiment=cfg.experiment,
                            config=to_dict(cfg),
                            state=checkpoint_state(exp, 0.0))
    with pytest.raises(CheckpointError, match=f"at step {big}, beyond the run's 6 steps"):
        load_into(build_experiment(cfg), cfg, ckpt)
    with pytest.raises(CheckpointError, match="beyond the run's 6 steps"):
        train(cfg, run_dir, resume=ckpt)


def test_directory_name_must_be_a_step(tmp_path):
    path = write_checkpoint(tmp_path, step=3, experiment="e", config={}, state=STATE)
    renamed = path.rename(tmp_path / "best")
    with pytest.raises(CheckpointError, match="directory name must be step_<number>"):
        read_checkpoint(renamed)


def test_writing_a_negative_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="non-negative int"):
        write_checkpoint(tmp_path, step=-1, experiment="e", config={}, state=STATE)


def test_non_json_fields_in_state_json_are_refused(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    rewrite_state_json(path, config=[1, 2])
    with pytest.raises(CheckpointError, match="field 'config' must be a dict"):
        read_checkpoint(path)
    rewrite_state_json(path, config={}, experiment=7)
    with pytest.raises(CheckpointError, match="field 'experiment' must be a str"):
        read_checkpoint(path)


def test_manifest_sizes_must_be_ints(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["tensors.safetensors"]["bytes"] = "12"
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"files\.tensors\.safetensors\.bytes"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- bounded reads


def test_symlink_to_dev_zero_is_refused_at_once(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    (path / "tensors.safetensors").unlink()
    os.symlink("/dev/zero", path / "tensors.safetensors")
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="tensors.safetensors is a symlink"):
        read_checkpoint(path)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("name", ["state.json", "MANIFEST.json"])
def test_fifo_neither_hangs_nor_is_read(tmp_path, name):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    (path / name).unlink()
    os.mkfifo(path / name)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file"):
        read_checkpoint(path)
    assert time.monotonic() - t0 < 5


def test_huge_file_is_refused_before_it_is_read(tmp_path):
    """A 64 GiB sparse file in place of the tensors: the size check comes first."""
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    with open(path / "tensors.safetensors", "r+b") as f:
        f.truncate(64 << 30)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=r"has 68719476736 bytes, the manifest says"):
        read_checkpoint(path)
    assert time.monotonic() - t0 < 5


def test_huge_manifest_is_refused(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    with open(path / "MANIFEST.json", "r+b") as f:
        f.truncate(8 << 30)
    with pytest.raises(CheckpointError, match="more than a manifest can"):
        read_checkpoint(path)


def test_a_directory_in_place_of_a_file_is_refused(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=STATE)
    (path / "state.json").unlink()
    (path / "state.json").mkdir()
    with pytest.raises(CheckpointError, match="state.json is not a regular file"):
        read_checkpoint(path)


def test_step_symlink_out_of_the_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    elsewhere = write_checkpoint(tmp_path / "elsewhere", step=9, experiment="e", config={},
                                 state=STATE)
    write_checkpoint(run / "checkpoints", step=1, experiment="e", config={}, state=STATE)
    os.symlink(elsewhere, run / "checkpoints" / "step_00000009")
    with pytest.raises(CheckpointError, match="symlink to .*outside the run directory"):
        latest_checkpoint(run / "checkpoints")


def test_step_symlink_inside_the_run_dir_is_followed(tmp_path):
    run = tmp_path / "run"
    inside = write_checkpoint(run / "archive", step=4, experiment="e", config={}, state=STATE)
    write_checkpoint(run / "checkpoints", step=1, experiment="e", config={}, state=STATE)
    os.symlink(inside, run / "checkpoints" / "step_00000004")
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 4]
    assert read_checkpoint(latest_checkpoint(run / "checkpoints")).step == 4


# --------------------------------------------------------------------------- prune, clean


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step=step, experiment="e", config={}, state=STATE)
    # A kill during the deletion: the rename already happened, so no step_* is partial.
    import metaopt.runner.checkpoint as ck

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("step_")] == ["step_00000003"]
    assert sum(n.startswith(".trash-step_") for n in names) == 2
    for _, p in list_checkpoints(tmp_path):
        read_checkpoint(p)
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_clean_stale_removes_temp_and_restores_replaced(tmp_path):
    good = write_checkpoint(tmp_path, step=4, experiment="e", config={}, state=STATE)
    (tmp_path / ".tmp-step_00000005-1234").mkdir()           # never completed
    (tmp_path / ".tmp-step_00000005-1234" / "state.json").write_text("{")
    good.rename(tmp_path / ".old-step_00000004-99")          # killed mid-replacement
    removed = clean_stale(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_00000005-1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    assert read_checkpoint(tmp_path / "step_00000004").step == 4


def test_train_cleans_stale_temp_dirs_on_start(tmp_path):
    cfg, run_dir = ridge_run(tmp_path, keep_checkpoints=2)
    stale = run_dir / "checkpoints" / ".tmp-step_00000002-777"
    stale.mkdir()
    train(cfg, run_dir)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]
