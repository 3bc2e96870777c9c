"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory ``checkpoints/step_00000042/`` holding

* ``tensors.safetensors`` — every tensor of the saved state tree;
* ``state.json`` — the tree itself with tensors replaced by ``{"__tensor__": name}``,
  plus format version, experiment name, step and the resolved config;
* ``MANIFEST.json`` — sha256 and size of the two files above.

It is built in a hidden temporary directory, each file fsync'ed, and becomes visible
only through the final ``rename`` — so a directory named ``step_*`` is always
complete (old checkpoints are pruned by renaming them away first, and
:func:`clean_stale` removes what a killed writer left behind).

:func:`read_checkpoint` opens regular files only (no symlinks, FIFOs or devices),
checks each file's size against the manifest *before* reading it, verifies checksums
before parsing anything, and checks that the recorded step is a non-negative int equal
to the directory's. :func:`check_state_matches` compares a loaded tree with a freshly
built experiment's (keys, tensor shapes, dtypes). So a corrupt, truncated or
mismatched checkpoint raises :class:`CheckpointError` instead of loading partially.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from metaopt.errors import CheckpointError
from metaopt.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    sha256_hex,
    write_directory_atomically,
)

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_state_matches",
    "clean_stale",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "read_checkpoint",
    "write_checkpoint",
]

FORMAT = "metaopt-checkpoint/1"
TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
#: Prefixes of the hidden directories a writer uses; a killed writer may leave them.
_TMP, _OLD, _TRASH = ".tmp-", ".old-", ".trash-"
#: Upper bound on MANIFEST.json (it lists two files; anything larger is not ours).
MAX_MANIFEST_BYTES = 1 << 20


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
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
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
    files = {TENSORS: payload, STATE: state_bytes,
             MANIFEST: json.dumps(manifest, indent=1).encode()}
    return write_directory_atomically(directory / f"step_{step:08d}", files,
                                      tmp_prefix=_TMP, old_prefix=_OLD)


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``directory``.

    Each old checkpoint is first renamed to a hidden ``.trash-*`` name (one atomic
    step), then deleted, so a kill at any moment leaves every ``step_*`` directory
    complete; leftovers are removed by :func:`clean_stale`. Returns what was pruned.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    pruned = []
    for _, old in list_checkpoints(directory)[:-keep]:
        trash = directory / f"{_TRASH}{old.name}-{os.getpid()}"
        os.rename(old, trash)
        pruned.append(old)
    if pruned:
        fsync_dir(directory)
    for _, path in _hidden(directory, _TRASH):
        shutil.rmtree(path, ignore_errors=True)
    return pruned


def clean_stale(directory: str | Path) -> list[Path]:
    """Remove what killed writers left under ``directory``; returns the removed paths.

    Call it only while holding the run directory's lock (no writer is active then).
    ``.tmp-step_*`` (a checkpoint never completed) and ``.trash-step_*`` (one being
    pruned) are deleted; an ``.old-step_*`` (the previous version of a checkpoint
    that was being replaced) is renamed back if the new one never appeared, else
    deleted.
    """
    directory = Path(directory)
    removed = []
    for prefix in (_TMP, _TRASH, _OLD):
        for name, path in _hidden(directory, prefix):
            final = directory / name
            if prefix == _OLD and not os.path.lexists(final):
                os.rename(path, final)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_dir(directory)
    return removed


def _hidden(directory: Path, prefix: str) -> list[tuple[str, Path]]:
    """``(step_* name, path)`` of the hidden directories with ``prefix``."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.name.startswith(prefix) and not p.is_symlink():
            name = p.name[len(prefix):].rsplit("-", 1)[0]
            if _STEP_DIR.match(name):
                found.append((name, p))
    return sorted(found)


# --------------------------------------------------------------------------- reading


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints under ``directory`` as ``(step, path)``, oldest first.

    A ``step_*`` symlink whose target lies outside the run directory (the parent of
    ``directory``) is refused with :class:`CheckpointError`: the runner never makes
    one, so it is tampering or a mistake, and following it would load foreign files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    root = directory.resolve().parent
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m:
            continue
        if p.is_symlink():
            target = p.resolve()
            if not target.is_relative_to(root):
                raise CheckpointError(f"checkpoint {p} is a symlink to {target}, outside "
                                      f"the run directory {root}; refusing to follow it")
        if p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint directory under ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify one checkpoint directory (sizes, sha256, format, step, structure).

    Raises :class:`CheckpointError` naming the file and field for anything that is not
    a complete checkpoint written by :func:`write_checkpoint`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_doc = _parse_json(_read_bounded(path, MANIFEST, None), path, MANIFEST)
    files = manifest_doc.get("files") if isinstance(manifest_doc, dict) else None
    if not isinstance(files, dict) or manifest_doc.get("format") != FORMAT:
        found = manifest_doc.get("format") if isinstance(manifest_doc, dict) else None
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has unknown format "
                              f"{found!r} (expected {FORMAT!r})")
    blobs = {}
    for name in (TENSORS, STATE):
        entry = files.get(name)
        if not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no '{name}'")
        size = entry.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} field files.{name}.bytes "
                                  f"must be a non-negative int, got {size!r}")
        data = _read_bounded(path, name, size)
        if sha256_hex(data) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: sha256 of {name} does not match "
                                  "the manifest (corrupt file)")
        blobs[name] = data
    doc = _parse_json(blobs[STATE], path, STATE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"checkpoint {path}: {STATE} has unknown format {found!r}")
    step = _checked_step(doc.get("step"), path)
    for key, kind in (("experiment", str), ("config", dict), ("state", dict)):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(f"checkpoint {path}: {STATE} field '{key}' must be a "
                                  f"{kind.__name__}, got {_describe(doc.get(key))}")
    try:
        tensors = load_safetensors_bytes(blobs[TENSORS])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot parse {TENSORS}: {e}") from None
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = _unflatten(doc["state"], tensors, path)
    return Checkpoint(path=path, step=step, experiment=doc["experiment"],
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


def _checked_step(step: Any, path: Path) -> int:
    """The recorded step: a non-negative int equal to the directory name's step."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: {STATE} field 'step' must be a "
                              f"non-negative int, got {step!r}")
    m = _STEP_DIR.match(path.name)
    if m is None:
        raise CheckpointError(f"checkpoint {path}: the directory name must be "
                              f"step_<number> (as written by the runner)")
    if int(m.group(1)) != step:
        raise CheckpointError(f"checkpoint {path}: {STATE} says step {step}, the "
                              f"directory name says {int(m.group(1))}")
    return step


def _read_bounded(ckpt: Path, name: str, size: int | None) -> bytes:
    """Read regular file ``ckpt/name`` of exactly ``size`` bytes (``None``: the manifest).

    The file is opened without following symlinks and without blocking (a FIFO
    neither hangs nor is read), refused unless it is a regular file, and its size is
    compared with the expected one before a single byte is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(ckpt / name, flags)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {name} is missing "
                              "(incomplete checkpoint)") from None
    except OSError as e:
        why = "is a symlink" if os.path.islink(ckpt / name) else f"cannot be opened: " \
            f"{e.strerror}"
        raise CheckpointError(f"checkpoint {ckpt}: {name} {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"checkpoint {ckpt}: {name} is not a regular file")
        if size is None and info.st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"checkpoint {ckpt}: {name} has {info.st_size} bytes, "
                                  f"more than a manifest can ({MAX_MANIFEST_BYTES})")
        if size is not None and info.st_size != size:
            raise CheckpointError(f"checkpoint {ckpt}: {name} has {info.st_size} bytes, "
                                  f"the manifest says {size} (truncated or overwritten "
                                  "file)")
        expected = info.st_size
        chunks, got = [], 0
        while got < expected:
            chunk = os.read(fd, min(expected - got, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        if len(data) != expected:
            raise CheckpointError(f"checkpoint {ckpt}: {name} changed while being read")
        return data
    except OSError as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {name}: {e.strerror}") \
            from None
    finally:
        os.close(fd)


def _parse_json(data: bytes, ckpt: Path, name: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {name} is unreadable (not valid JSON: "
                              f"{e})") from None


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


