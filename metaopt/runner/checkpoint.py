"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory ``checkpoints/step_00000042/`` holding

* ``tensors.safetensors`` — every tensor of the saved state tree;
* ``state.json`` — the tree itself with tensors replaced by ``{"__tensor__": name}``,
  plus format version, experiment name, step and the resolved config;
* ``MANIFEST.json`` — sha256 and size of the two files above.

It is built in a hidden temporary directory, each file fsync'ed, and becomes visible
only through the final ``rename`` — so a directory named ``step_*`` is always
complete. :func:`read_checkpoint` verifies sizes and checksums before parsing
anything, and :func:`check_state_matches` compares a loaded tree with a freshly built
experiment's (keys, tensor shapes, dtypes), so a corrupt, truncated or mismatched
checkpoint raises :class:`CheckpointError` instead of loading partially. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from metaopt.errors import CheckpointError
from metaopt.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    sha256_hex,
    write_synced,
)

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_state_matches",
    "latest_checkpoint",
    "list_checkpoints",
    "read_checkpoint",
    "write_checkpoint",
]

FORMAT = "metaopt-checkpoint/1"
TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    """A verified checkpoint: its step, the run's config and the saved state tree."""

    path: Path
    step: int
    experiment: str
    config: dict[str, Any]
    state: dict[str, Any]


# --------------------------------------------------------------------------- writing


def write_checkpoint(directory: str | Path, *, step: int, experiment: str,
                     config: Mapping[str, Any], state: Mapping[str, Any]) -> Path:
    """Atomically write ``state`` (tensors + JSON leaves) as ``directory/step_<step>``.

    Returns the checkpoint's path. An existing checkpoint of the same step is
    replaced only after the new one is complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = _flatten(state)
    payload = save_safetensors_bytes(tensors) if tensors else save_safetensors_bytes({})
    doc = {"format": FORMAT, "experiment": experiment, "step": step,
           "config": dict(config), "state": skeleton}
    state_bytes = json.dumps(doc, indent=1, allow_nan=True).encode()
    manifest = {"format": FORMAT, "files": {
        TENSORS: {"sha256": sha256_hex(payload), "bytes": len(payload)},
        STATE: {"sha256": sha256_hex(state_bytes), "bytes": len(state_bytes)},
    }}
    final = directory / f"step_{step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_synced(tmp / TENSORS, payload)
    write_synced(tmp / STATE, state_bytes)
    write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = directory / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- reading


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints under ``directory`` as ``(step, path)``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint directory under ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify one checkpoint directory (sizes, sha256, format, structure)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_doc = _read_json(path / MANIFEST, path)
    files = manifest_doc.get("files") if isinstance(manifest_doc, dict) else None
    if manifest_doc.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has unknown format "
                              f"{manifest_doc.get('format')!r} (expected {FORMAT!r})")
    blobs = {}
    for name in (TENSORS, STATE):
        entry = files.get(name)
        if not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no '{name}'")
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"checkpoint {path}: cannot read {name}: {e.strerror}") \
                from None
        if len(data) != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {path}: {name} has {len(data)} bytes, the "
                                  f"manifest says {entry.get('bytes')} (truncated or "
                                  "overwritten file)")
        if sha256_hex(data) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: sha256 of {name} does not match "
                                  "the manifest (corrupt file)")
        blobs[name] = data
    try:
        doc = json.loads(blobs[STATE])
        tensors = load_safetensors_bytes(blobs[TENSORS])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot parse: {e}") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {doc.get('format')!r}")
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = _unflatten(doc["state"], tensors, path)
    return Checkpoint(path=path, step=int(doc["step"]), experiment=str(doc["experiment"]),
                      config=doc["config"], state=state)


def check_state_matches(loaded: Any, expected: Any, *, what: str, where: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``loaded`` has ``expected``'s structure.

    Dict keys must be equal, tensors equal in shape and dtype, JSON leaves of the
    same kind, and lists equal in length — except lists holding no tensors at all,
    which may grow during training. Values are not compared.
    """
    label = where or "<root>"
    if isinstance(expected, Tensor):
        if not isinstance(loaded, Tensor):
            raise CheckpointError(f"{what}: '{label}' is a tensor in the experiment but "
                                  f"{type(loaded).__name__} in the checkpoint")
        if loaded.shape != expected.shape or loaded.dtype != expected.dtype:
            raise CheckpointError(
                f"{what}: '{label}' has shape {tuple(loaded.shape)} {loaded.dtype} in the "
                f"checkpoint but {tuple(expected.shape)} {expected.dtype} in the experiment "
                "built from the config")
        return
    if isinstance(expected, Mapping):
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{what}: '{label}' should be a mapping, checkpoint has "
                                  f"{type(loaded).__name__}")
        missing = sorted(set(expected) - set(loaded))
        extra = sorted(set(loaded) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{what}: keys under '{label}' differ — missing in the "
                                  f"checkpoint: {missing}; unexpected: {extra}")
        for k in expected:
            check_state_matches(loaded[k], expected[k], what=what,
                                where=f"{where}/{k}" if where else str(k))
        return
    if isinstance(expected, (list, tuple)):
        if isinstance(loaded, (list, tuple)) and len(loaded) != len(expected) \
                and not _has_tensor(expected) and not _has_tensor(loaded):
            return  # a JSON list that grows during training (a history, a queue of ids)
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(expected):
            raise CheckpointError(f"{what}: '{label}' should be a list of {len(expected)}, "
                                  f"checkpoint has {_describe(loaded)}")
        for i, (a, b) in enumerate(zip(loaded, expected)):
            check_state_matches(a, b, what=what, where=f"{where}[{i}]")
        return
    if _json_kind(loaded) != _json_kind(expected):
        raise CheckpointError(f"{what}: '{label}' is {_describe(expected)} in the "
                              f"experiment but {_describe(loaded)} in the checkpoint")


# --------------------------------------------------------------------------- internals


def _flatten(state: Any) -> tuple[Any, dict[str, Tensor]]:
    """Replace tensors by ``{"__tensor__": name}`` and collect them by unique name."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            name = path or "tensor"
            base, n = name, 1
            while name in tensors:
                n += 1
                name = f"{base}#{n}"
            # safetensors needs contiguous, non-aliasing CPU tensors
            tensors[name] = node.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if not isinstance(k, str):
                    raise TypeError(f"state key {k!r} under '{path or '<root>'}' is not a "
                                    "string; state dicts need string keys")
                if k == "__tensor__":
                    raise TypeError(f"state key '__tensor__' under '{path}' is reserved")
                out[k] = walk(v, f"{path}/{k}" if path else k)
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, str)):
            return node
        if isinstance(node, float):
            return node if math.isfinite(node) else {"__float__": repr(node)}
        raise TypeError(f"state value at '{path or '<root>'}' has type "
                        f"{type(node).__name__}; use tensors or JSON values "
                        "(None, bool, int, float, str, lists, dicts)")

    return walk(state, ""), tensors


def _unflatten(node: Any, tensors: Mapping[str, Tensor], path: Path) -> Any:
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            try:
                return tensors[node["__tensor__"]]
            except KeyError:
                raise CheckpointError(f"checkpoint {path}: tensor '{node['__tensor__']}' "
                                      f"is missing from {TENSORS}") from None
        if set(node) == {"__float__"}:
            return float(node["__float__"])
        return {k: _unflatten(v, tensors, path) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors, path) for v in node]
    return node


def _read_json(file: Path, ckpt: Path) -> Any:
    try:
        return json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {file.name} is missing "
                              "(incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {file.name} is unreadable: {e}") from None


def _has_tensor(node: Any) -> bool:
    if isinstance(node, Tensor):
        return True
    if isinstance(node, Mapping):
        return any(_has_tensor(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_tensor(v) for v in node)
    return False


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def _describe(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}"
    return f"a {_json_kind(v)}"


