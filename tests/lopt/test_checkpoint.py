"""Native learned-optimizer checkpoints, the pretrained registry and load_checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from metaopt.lopt import (
    CheckpointError,
    SmallFCLOpt,
    list_pretrained,
    load_checkpoint,
    register_pretrained,
    save_checkpoint,
)
from metaopt.lopt.checkpoint import META_FILE, WEIGHTS_FILE
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


def test_save_load_round_trip(tmp_path):
    lopt = perturbed(hidden_size=6)
    path = save_checkpoint(lopt, tmp_path / "ckpt", metadata={"source": "test"})
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, WEIGHTS_FILE]
    meta = json.loads((path / META_FILE).read_text())
    assert meta["architecture"] == "small_fc_lopt" and meta["format_version"] == 1
    assert meta["config"]["hidden_size"] == 6 and meta["metadata"] == {"source": "test"}
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


def test_release_round_trips_through_native_format(tmp_path):
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(GOLDEN / "small_fc_lopt_theta.msgpack", folder / "params")
    shutil.copy(GOLDEN / "small_fc_lopt_config.gin", folder / "config.gin")
    imported = load_checkpoint(folder)
    native = load_checkpoint(save_checkpoint(imported, tmp_path / "native"))
    for (name, a), (_, b) in zip(imported.state_dict().items(), native.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupt_weights_fail_the_checksum(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_truncated_weights_fail_clearly(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_truncated_weights_with_matching_checksum_fail_clearly(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    data = (path / WEIGHTS_FILE).read_bytes()[:100]
    (path / WEIGHTS_FILE).write_bytes(data)
    meta = json.loads((path / META_FILE).read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)


def test_broken_metadata_fails_clearly(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    (path / META_FILE).write_text('{"format": "metaopt.lopt", "archi')
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        load_checkpoint(path)


def test_unknown_architecture_and_future_version(tmp_path):
    path = save_checkpoint(perturbed(), tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "architecture": "nope"}))
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'"):
        load_checkpoint(path)
    (path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path):
    path = save_checkpoint(perturbed(hidden_size=6), tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    meta["config"]["hidden_size"] = 4
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*w0"):
        load_checkpoint(path)


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
