"""Native learned-optimizer checkpoints, the pretrained registry and load_checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from metaopt.lopt import (
    CheckpointError,
    SmallFCLOpt,
    list_pretrained,
    load_checkpoint,
    register_pretrained,
    save_checkpoint,
)
from metaopt.lopt.checkpoint import META_FILE, SEAL_FILE, WEIGHTS_FILE, upgrade_checkpoint
from metaopt.lopt.velo import VeLO
from metaopt.registry import PRETRAINED_LOPTS

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def perturbed(seed: int = 0, **kwargs) -> SmallFCLOpt:
    torch.manual_seed(seed)
    lopt = SmallFCLOpt(**kwargs)
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lopt


def run(lopt, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(7, 3))
    opt = lopt.optimizer([w], num_steps=steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        opt.step(loss=loss)
    return w.detach().clone()


def reseal(path: Path, meta: dict) -> None:
    """Rewrite lopt.json and its checksum: a crafted checkpoint that passes the seal."""
    data = (json.dumps(meta, indent=2) + "\n").encode()
    (path / META_FILE).write_bytes(data)
    (path / SEAL_FILE).write_text(f"{hashlib.sha256(data).hexdigest()}  {META_FILE}\n")


def reseal_weights(path: Path, tensors: dict) -> None:
    """Replace the weights and re-seal everything (crafted, internally consistent)."""
    weights = safetensors_save(tensors)
    (path / WEIGHTS_FILE).write_bytes(weights)
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(weights).hexdigest(),
                                   "bytes": len(weights)}
    reseal(path, meta)


def test_save_load_round_trip(tmp_path):
    lopt = perturbed(hidden_size=6)
    path = save_checkpoint(lopt, tmp_path / "ckpt", metadata={"source": "test"})
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, SEAL_FILE, WEIGHTS_FILE]
    meta = json.loads((path / META_FILE).read_text())
    assert meta["architecture"] == "small_fc_lopt" and meta["format_version"] == 2
    assert meta["config"]["hidden_size"] == 6 and meta["metadata"] == {"source": "test"}
    weights = (path / WEIGHTS_FILE).read_bytes()
    assert meta["files"][WEIGHTS_FILE] == {"sha256": hashlib.sha256(weights).hexdigest(),
                                           "bytes": len(weights)}
    seal = (path / SEAL_FILE).read_text()  # sha256sum -c format
    assert seal == f"{hashlib.sha256((path / META_FILE).read_bytes()).hexdigest()}  {META_FILE}\n"
    loaded = load_checkpoint(path)
    assert isinstance(loaded, SmallFCLOpt) and loaded.hidden_size == 6
    for (name, a), (_, b) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(run(lopt), run(loaded))
    assert load_checkpoint(path / META_FILE).hidden_size == 6  # the json path works too


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    save_checkpoint(perturbed(0), tmp_path / "ckpt")
    second = perturbed(1)
    save_checkpoint(second, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(load_checkpoint(tmp_path / "ckpt").w0, second.w0)


def test_save_refuses_to_replace_other_directories_and_nan(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a learned-optimizer checkpoint"):
        save_checkpoint(perturbed(), tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    bad = perturbed()
    with torch.no_grad():
        bad.w1[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="w1: holds NaN"):
        save_checkpoint(bad, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_release_round_trips_through_native_format(tmp_path):
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(GOLDEN / "small_fc_lopt_theta.msgpack", folder / "params")
    shutil.copy(GOLDEN / "small_fc_lopt_config.gin", folder / "config.gin")
    imported = load_checkpoint(folder)
    native = load_checkpoint(save_checkpoint(imported, tmp_path / "native"))
    for (name, a), (_, b) in zip(imported.state_dict().items(), native.state_dict().items()):
        assert torch.equal(a, b), name


def test_every_byte_change_of_every_file_is_refused(tmp_path):
    """Before format 2, 62 of 72 digit flips in lopt.json loaded silently (exp_mult
    0.001 -> 1.001). Now every byte of lopt.json and its checksum file is covered, and
    the weights by the sha256 inside lopt.json."""
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    pristine = {name: (path / name).read_bytes() for name in (META_FILE, SEAL_FILE,
                                                              WEIGHTS_FILE)}
    rng = np.random.default_rng(0)
    weight_positions = rng.choice(len(pristine[WEIGHTS_FILE]), 48, replace=False)
    cases = [(META_FILE, i) for i in range(len(pristine[META_FILE]))]
    cases += [(SEAL_FILE, i) for i in range(len(pristine[SEAL_FILE]))]
    cases += [(WEIGHTS_FILE, int(i)) for i in weight_positions]
    for name, pos in cases:
        for flip in (0x01, 0xFF):
            data = bytearray(pristine[name])
            data[pos] ^= flip
            (path / name).write_bytes(bytes(data))
            with pytest.raises(CheckpointError):
                load_checkpoint(path)
        (path / name).write_bytes(pristine[name])
    text = pristine[META_FILE].decode()
    assert '"exp_mult": 0.001' in text
    (path / META_FILE).write_text(text.replace('"exp_mult": 0.001', '"exp_mult": 1.001'))
    with pytest.raises(CheckpointError, match=f"{META_FILE}: checksum mismatch"):
        load_checkpoint(path)
    (path / META_FILE).write_bytes(pristine[META_FILE])
    assert load_checkpoint(path).exp_mult == 0.001


def test_corrupt_weights_fail_the_checksum(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_sizes_are_checked_before_reading(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=rf"holds {len(data) // 3} bytes, "
                                              rf"expected {len(data)}"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).write_bytes(data + b"\0" * 10)
    with pytest.raises(CheckpointError, match="truncated, extended or replaced"):
        load_checkpoint(path)


def test_only_regular_files_inside_the_checkpoint(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = (path / WEIGHTS_FILE).read_bytes()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(data)
    (path / WEIGHTS_FILE).unlink()
    (path / WEIGHTS_FILE).symlink_to(outside)  # same bytes, but a symlink out
    with pytest.raises(CheckpointError, match="symlink"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).unlink()
    os.mkfifo(path / WEIGHTS_FILE)  # would block a plain open().read()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).unlink()
    (path / WEIGHTS_FILE).write_bytes(data)
    (path / "notes.txt").write_text("unlisted")
    with pytest.raises(CheckpointError, match="does not list: notes.txt"):
        load_checkpoint(path)


def test_truncated_weights_with_matching_checksum_fail_clearly(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = (path / WEIGHTS_FILE).read_bytes()[:100]
    (path / WEIGHTS_FILE).write_bytes(data)
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": 100}
    reseal(path, meta)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)


def test_broken_metadata_fails_clearly(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = b'{"format": "metaopt.lopt", "archi'
    (path / META_FILE).write_bytes(data)
    (path / SEAL_FILE).write_text(f"{hashlib.sha256(data).hexdigest()}  {META_FILE}\n")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        load_checkpoint(path)
    deep = b"[" * 100_000 + b"]" * 100_000  # no RecursionError
    (path / META_FILE).write_bytes(deep)
    (path / SEAL_FILE).write_text(f"{hashlib.sha256(deep).hexdigest()}  {META_FILE}\n")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        load_checkpoint(path)


def test_unknown_architecture_and_future_version(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    reseal(path, {**meta, "architecture": "nope"})
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'"):
        load_checkpoint(path)
    reseal(path, {**meta, "format_version": 99})
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)
    (path / SEAL_FILE).unlink()  # a future format may seal differently: still "newer"
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path):
    path = save_checkpoint(perturbed(hidden_size=6), tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    meta["config"]["hidden_size"] = 4
    reseal(path, meta)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*w0"):
        load_checkpoint(path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("hidden_size", 10**5, r"'hidden_size' must lie in \[1, 1024\]"),
    ("hidden_layers", 10**6, r"'hidden_layers' must lie in \[0, 16\]"),
    ("hidden_size", 0, r"'hidden_size' must lie in \[1, 1024\], got 0"),
    ("hidden_size", 4.5, r"'hidden_size' must be an integer, got float"),
    ("exp_mult", "0.001", r"'exp_mult' must be a number"),
    ("initial_rms_decays", [0.999, "x"], r"must be a number \(entry 1\)"),
    ("initial_rms_decays", [1.5], r"must lie in \[0.0, 1.0\]"),
    ("unknown_argument", 1, r"config does not build architecture"),
])
def test_config_is_type_checked_and_bounded(tmp_path, key, value, message):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    meta["config"][key] = value
    reseal(path, meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_velo_config_booleans_are_checked(tmp_path):
    path = save_checkpoint(VeLO(lstm_hidden_size=8, param_inits=4), tmp_path / "velo")
    assert load_checkpoint(path).lstm_hidden_size == 8
    meta = json.loads((path / META_FILE).read_text())
    meta["config"]["mix_layers"] = "yes"
    reseal(path, meta)
    with pytest.raises(CheckpointError, match="'mix_layers' must be True or False"):
        load_checkpoint(path)


def test_dtypes_and_values_of_tensors_are_checked(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    good = {k: v.clone() for k, v in perturbed().state_dict().items()}
    for change, message in [
        ({"w0": good["w0"].to(torch.int32)}, "w0: dtype torch.int32 is not floating point"),
        ({"b1": good["b1"].to(torch.float64)}, "b1: dtype torch.float64, expected torch.float32"),
        ({"w2": torch.full_like(good["w2"], float("inf"))}, "w2: holds NaN or infinite"),
        ({"b0": good["b0"].to(torch.bool)}, "b0: dtype torch.bool is not floating point"),
    ]:
        reseal_weights(path, {**good, **change})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    reseal_weights(path, good)
    assert torch.equal(load_checkpoint(path).w0, good["w0"])


def test_format_1_is_refused_and_can_be_upgraded(tmp_path):
    lopt = perturbed(hidden_size=6)
    path = tmp_path / "old"
    path.mkdir()
    weights = safetensors_save({k: v.contiguous() for k, v in lopt.state_dict().items()})
    (path / WEIGHTS_FILE).write_bytes(weights)
    (path / META_FILE).write_text(json.dumps({
        "format": "metaopt.lopt", "format_version": 1, "architecture": "small_fc_lopt",
        "config": lopt.config(), "sha256": hashlib.sha256(weights).hexdigest(),
        "metadata": {"run": "old"}}))
    with pytest.raises(CheckpointError, match=r"format_version 1.*upgrade_checkpoint"):
        load_checkpoint(path)
    upgrade_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, SEAL_FILE, WEIGHTS_FILE]
    assert json.loads((path / META_FILE).read_text())["metadata"] == {"run": "old"}
    assert torch.equal(load_checkpoint(path).w0, lopt.w0)


def test_registry_names(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    name = "test_small_fc_registry_entry"
    register_pretrained(name, path, help="a test entry", replace=True)
    register_pretrained(name + "_fn", lambda: perturbed(3), replace=True)
    try:
        assert name in list_pretrained() and name + "_fn" in list_pretrained()
        assert torch.equal(load_checkpoint(name).w0, perturbed().w0)
        assert torch.equal(load_checkpoint(name + "_fn").w0, perturbed(3).w0)
    finally:
        PRETRAINED_LOPTS._entries.pop(name, None)
        PRETRAINED_LOPTS._entries.pop(name + "_fn", None)


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(CheckpointError, match="no pretrained optimizer named 'not-a-name'"):
        load_checkpoint("not-a-name")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="neither a native checkpoint"):
        load_checkpoint(tmp_path / "junk")
