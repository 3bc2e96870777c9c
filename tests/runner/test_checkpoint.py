"""Checkpoints: exact round trip, and corrupt/partial/mismatched ones refused loudly."""

# The legacy global NumPy RNG is what the runner must save and restore.
# ruff: noqa: NPY002

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.runner.checkpoint import (
    CheckpointError,
    check_state_matches,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from metaopt.runner.config import parse_run_config, to_dict
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into
from metaopt.runner.rng import capture_rng_state, restore_rng_state, seed_everything


def sample_state():
    return {
        "phi": {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3),
                "layer.0.bias": torch.tensor([1.5], dtype=torch.float32)},
        "opt": {"step": torch.tensor(3.0), "m": [torch.ones(2), torch.zeros(0)]},
        "count": 7, "name": "x", "flag": True, "none": None,
        "floats": [0.1, float("inf"), float("nan")],
        "half": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    }


def test_round_trip_is_exact(tmp_path):
    state = sample_state()
    path = write_checkpoint(tmp_path, step=12, experiment="e", config={"a": 1}, state=state)
    assert path.name == "step_00000012"
    ckpt = read_checkpoint(path)
    assert ckpt.step == 12 and ckpt.experiment == "e" and ckpt.config == {"a": 1}
    got = ckpt.state
    assert torch.equal(got["phi"]["w"], state["phi"]["w"])
    assert got["phi"]["w"].dtype == torch.float64
    assert got["half"].dtype == torch.bfloat16 and torch.equal(got["half"], state["half"])
    assert torch.equal(got["opt"]["m"][0], torch.ones(2)) and got["opt"]["m"][1].shape == (0,)
    assert got["count"] == 7 and got["flag"] is True and got["none"] is None
    assert got["floats"][1] == float("inf") and np.isnan(got["floats"][2])
    check_state_matches(got, state, what="t")


def test_unsupported_leaf_is_rejected(tmp_path):
    with pytest.raises(TypeError, match=r"'bad'.*ndarray"):
        write_checkpoint(tmp_path, step=1, experiment="e", config={},
                         state={"bad": np.zeros(2)})


def corrupt(path: Path, name: str, how: str) -> None:
    f = path / name
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("name, how, message", [
    ("tensors.safetensors", "flip", "sha256 of tensors.safetensors"),
    ("tensors.safetensors", "truncate", "truncated"),
    ("state.json", "flip", "sha256 of state.json"),
    ("MANIFEST.json", "truncate", "MANIFEST.json is unreadable"),
])
def test_corruption_is_detected(tmp_path, name, how, message):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=sample_state())
    corrupt(path, name, how)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_missing_file_is_an_incomplete_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path, step=1, experiment="e", config={}, state=sample_state())
    (path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json is missing"):
        read_checkpoint(path)
    path = write_checkpoint(tmp_path, step=2, experiment="e", config={}, state=sample_state())
    (path / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors is missing"):
        read_checkpoint(path)


def test_unfinished_temporary_directories_are_ignored(tmp_path):
    write_checkpoint(tmp_path, step=4, experiment="e", config={}, state=sample_state())
    (tmp_path / ".tmp-step_00000008-999").mkdir()  # a writer killed mid-checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_rewriting_a_step_replaces_it(tmp_path):
    write_checkpoint(tmp_path, step=3, experiment="e", config={}, state={"x": torch.zeros(1)})
    write_checkpoint(tmp_path, step=3, experiment="e", config={}, state={"x": torch.ones(1)})
    assert torch.equal(read_checkpoint(tmp_path / "step_00000003").state["x"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["phi"].update(w=torch.zeros(3, 3, dtype=torch.float64)), r"'phi/w' has shape"),
    (lambda s: s["phi"].update(w=s["phi"]["w"].float()), r"'phi/w'.*float32"),
    (lambda s: s["phi"].pop("layer.0.bias"), r"missing in the checkpoint: \['layer.0.bias'\]"),
    (lambda s: s.update(extra=1), r"unexpected: \['extra'\]"),
    (lambda s: s["opt"]["m"].append(torch.ones(1)), r"'opt/m' should be a list of 2"),
    (lambda s: s.update(count="7"), r"'count' is a number in the experiment but a str"),
])
def test_structure_mismatch_is_named(mutate, message):
    loaded = sample_state()
    mutate(loaded)
    with pytest.raises(CheckpointError, match=message):
        check_state_matches(loaded, sample_state(), what="ckpt")


def test_rng_capture_restore_replays_every_generator():
    gen = torch.Generator().manual_seed(5)
    seed_everything(1)
    state = capture_rng_state({"g": gen})
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen)
    restore_rng_state(state, {"g": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(ValueError, match="Generator states"):
        restore_rng_state(state, {})


def ridge_cfg(**settings):
    return parse_run_config({"experiment": "ridge_hyper", "steps": 3, "dtype": "float64",
                             "settings": {"n_features": 4, "relevant_features": 1,
                                          "n_train": 8, "n_val": 8, "n_test": 8,
                                          "inner_steps": 3, **settings}})


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = ridge_cfg()
    exp = build_experiment(cfg)
    exp.meta_step(1)
    path = write_checkpoint(tmp_path, step=1, experiment=cfg.experiment, config=to_dict(cfg),
                            state=checkpoint_state(exp, 0.0))
    other = ridge_cfg(outer_lr=0.5)
    with pytest.raises(CheckpointError, match=r"different run \(settings"):
        load_into(build_experiment(other), other, path)
    # Same config text but tensors of another shape (e.g. a hand-edited state.json).
    doc = json.loads((path / "state.json").read_text())
    doc["config"] = to_dict(ridge_cfg(n_features=5))
    bigger = ridge_cfg(n_features=5)
    write_checkpoint(tmp_path, step=2, experiment="ridge_hyper", config=doc["config"],
                     state=checkpoint_state(exp, 0.0))
    with pytest.raises(CheckpointError, match=r"'phi/log_penalty' has shape \(4,\)"):
        load_into(build_experiment(bigger), bigger, tmp_path / "step_00000002")


def test_checkpoint_from_before_a_defaulted_setting_was_added_loads(tmp_path):
    # A checkpoint written before a setting existed (its config lacks the key) is the
    # same run when the new setting's default is what the run uses; a checkpoint whose
    # config no longer parses is refused with one line naming the checkpoint.
    cfg = ridge_cfg()
    exp = build_experiment(cfg)
    exp.meta_step(1)
    old = to_dict(cfg)
    old["settings"].pop("outer_lr")  # as if written before `outer_lr` existed
    path = write_checkpoint(tmp_path, step=1, experiment=cfg.experiment, config=old,
                            state=checkpoint_state(exp, 0.0))
    assert load_into(build_experiment(cfg), cfg, path).step == 1
    with pytest.raises(CheckpointError, match=r"different run \(settings"):
        other = ridge_cfg(outer_lr=0.5)
        load_into(build_experiment(other), other, path)
    old["settings"]["no_such_setting"] = 1
    bad = write_checkpoint(tmp_path, step=2, experiment=cfg.experiment, config=old,
                           state=checkpoint_state(exp, 0.0))
    with pytest.raises(CheckpointError, match="its config no longer parses"):
        load_into(build_experiment(cfg), cfg, bad)


def test_loading_restores_the_experiment_exactly(tmp_path):
    cfg = ridge_cfg()
    exp = build_experiment(cfg)
    exp.meta_step(1)
    path = write_checkpoint(tmp_path, step=1, experiment=cfg.experiment, config=to_dict(cfg),
                            state=checkpoint_state(exp, 0.0))
    expected = exp.meta_step(2)
    fresh = build_experiment(cfg)
    assert load_into(fresh, cfg, path).step == 1
    assert fresh.meta_step(2) == expected
    assert torch.equal(fresh.phi["log_penalty"], exp.phi["log_penalty"])
