"""The runner and the task cache use the shared helpers (metaopt.tree, metaopt.fileio)."""

from __future__ import annotations

import numpy as np
import torch

import tasks.cache
from metaopt.tree import tree_map_like


def test_tree_map_like_walks_dicts_and_lists():
    like = {"a": torch.zeros(2, dtype=torch.float64), "b": [torch.zeros(1), 3],
            "c": {"d": torch.zeros(3, dtype=torch.float16)}, "n": None}
    tree = {"a": torch.ones(2), "b": [torch.ones(1, dtype=torch.int64), 3],
            "c": {"d": torch.ones(3)}, "n": None}
    out = tree_map_like(lambda t, ref: t.to(ref.dtype), tree, like)
    assert out["a"].dtype == torch.float64 and out["c"]["d"].dtype == torch.float16
    assert out["b"][0].dtype == torch.float32 and out["b"][1] == 3 and out["n"] is None


def test_cache_writes_through_the_one_atomic_write(tmp_path, monkeypatch):
    calls = []
    real = tasks.cache.atomic_write_bytes

    def recording(path, data):
        calls.append(path)
        real(path, data)

    monkeypatch.setattr(tasks.cache, "atomic_write_bytes", recording)
    path = tmp_path / "sub" / "x.npz"
    tasks.cache.save_arrays(path, {"a": np.arange(3), "b": np.eye(2)})
    assert calls == [path]
    got = tasks.cache.load_arrays(path)
    assert np.array_equal(got["a"], np.arange(3)) and np.array_equal(got["b"], np.eye(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]  # no temporary left
