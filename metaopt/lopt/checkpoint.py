"""Native learned-optimizer checkpoints, the pretrained registry, and one loader for all.

Native format — a directory with two files:

* ``meta_params.safetensors`` — the module's ``state_dict()`` (no pickle, lazy-safe);
* ``lopt.json`` — ``{"format": "metaopt.lopt", "format_version": 1, "architecture",
  "config" (constructor arguments), "sha256" (of the safetensors file), "metadata"}``.

Writes are atomic: both files are written and fsync'ed into a temporary sibling
directory that is then renamed into place, so a crash never leaves a half-written
checkpoint under the final name. Loading verifies the checksum before parsing.

:func:`load_checkpoint` accepts a native checkpoint directory, a name registered in
``metaopt.registry.PRETRAINED_LOPTS`` (see :func:`list_pretrained`), or a
learned_optimization release folder (``params`` + ``config.gin``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from metaopt.errors import CheckpointError
from metaopt.fileio import sha256_hex, write_synced
from metaopt.lopt.base import ARCHITECTURES, LearnedOptimizer
from metaopt.registry import PRETRAINED_LOPTS

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "list_pretrained",
    "load_checkpoint",
    "register_pretrained",
    "save_checkpoint",
]

FORMAT_VERSION = 1
FORMAT_NAME = "metaopt.lopt"
META_FILE = "lopt.json"
WEIGHTS_FILE = "meta_params.safetensors"


def save_checkpoint(lopt: LearnedOptimizer, path: str | os.PathLike,
                    *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``lopt`` as a native checkpoint directory at ``path`` (atomically).

    ``metadata`` is any JSON-able provenance (training run, source release, …).
    Returns the checkpoint path. An existing checkpoint at ``path`` is replaced.
    """
    if not lopt.architecture or lopt.architecture not in ARCHITECTURES:
        raise CheckpointError(f"architecture {lopt.architecture!r} is not registered")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lopt.state_dict().items()}
    weights = safetensors_save(tensors)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "architecture": lopt.architecture, "config": lopt.config(),
            "sha256": sha256_hex(weights), "metadata": dict(metadata or {})}
    meta_bytes = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_synced(tmp / WEIGHTS_FILE, weights)
        write_synced(tmp / META_FILE, meta_bytes)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_native(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def _load_native(path: Path) -> LearnedOptimizer:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path / META_FILE}: unreadable checkpoint metadata: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / META_FILE}: not a metaopt learned-optimizer checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is newer than this "
                              f"metaopt reads ({FORMAT_VERSION}); upgrade metaopt")
    for key in ("architecture", "config", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{path / META_FILE}: missing field {key!r}")
    weights_file = path / WEIGHTS_FILE
    try:
        weights = weights_file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{weights_file}: cannot read meta-parameters: {err}") from None
    digest = sha256_hex(weights)
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"{weights_file}: checksum mismatch (file sha256 {digest[:16]}…, expected "
            f"{str(meta['sha256'])[:16]}…); the file is corrupt or truncated "
            f"({len(weights)} bytes)")
    arch = meta["architecture"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (registered: "
                              f"{', '.join(sorted(ARCHITECTURES)) or 'none'})")
    try:
        tensors = safetensors_load(weights)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{weights_file}: unreadable safetensors data: {err}") from None
    lopt = ARCHITECTURES[arch](**meta["config"])
    expected = lopt.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: got {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path}: meta-parameters do not match architecture {arch!r}: "
            f"missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}")
    lopt.load_state_dict(tensors, strict=True)
    return lopt


def register_pretrained(name: str, source: str | os.PathLike | Callable[[], LearnedOptimizer],
                        *, help: str = "", replace: bool = False) -> None:
    """Make ``load_checkpoint(name)`` work: ``source`` is a checkpoint/release path or a
    zero-argument function returning a learned optimizer."""
    PRETRAINED_LOPTS.register(name, source, help=help, replace=replace)


def list_pretrained() -> list[str]:
    """Names of registered pretrained learned optimizers (``metaopt list`` shows them)."""
    return PRETRAINED_LOPTS.names()


def load_checkpoint(path_or_name: str | os.PathLike) -> LearnedOptimizer:
    """Load a learned optimizer from a native checkpoint, registered name or release.

    Resolution order: an existing native checkpoint directory; a learned_optimization
    release (folder with ``params`` + ``config.gin``, or its ``params`` file); a name in
    :func:`list_pretrained`. Anything else raises :class:`CheckpointError` saying which
    forms were tried.
    """
    from metaopt.lopt.release import is_release, load_release

    path = Path(path_or_name)
    if _is_native(path):
        return _load_native(path)
    if path.name == META_FILE and path.is_file():
        return _load_native(path.parent)
    if is_release(path):
        return load_release(path)
    name = str(path_or_name)
    if name in PRETRAINED_LOPTS:
        source = PRETRAINED_LOPTS.get(name)
        if callable(source):
            lopt = source()
            if not isinstance(lopt, LearnedOptimizer):
                raise CheckpointError(f"pretrained '{name}' did not build a LearnedOptimizer")
            return lopt
        return load_checkpoint(source)
    if path.exists():
        raise CheckpointError(
            f"{path} is neither a native checkpoint (directory with {META_FILE} and "
            f"{WEIGHTS_FILE}) nor a learned_optimization release (params + config.gin)")
    known = ", ".join(list_pretrained()) or "none registered"
    raise CheckpointError(f"no checkpoint at {path} and no pretrained optimizer named "
                          f"{name!r} (known: {known})")

