"""Native learned-optimizer checkpoints, the pretrained registry, and one loader for all.

Native format (``format_version`` 2) — a directory with exactly three files:

* ``meta_params.safetensors`` — the module's ``state_dict()`` (no pickle);
* ``lopt.json`` — ``{"format": "metaopt.lopt", "format_version": 2, "architecture",
  "config" (constructor arguments), "metadata", "files": {"meta_params.safetensors":
  {"sha256", "bytes"}}}``;
* ``lopt.json.sha256`` — ``"<sha256 of lopt.json>  lopt.json\n"`` (``sha256sum -c``
  checks it).

So every byte of every file is covered: the weights by ``lopt.json``, ``lopt.json`` by
``lopt.json.sha256``, and that file by its fixed layout (any change to its digest is a
mismatch, to anything else a malformed line). Loading verifies the chain before parsing
anything; only regular files are read (no symlinks, no FIFOs or devices), each one's size
is checked before it is read, and files the checkpoint does not list are refused. Then
the config is type-checked and bounded, the module is first built on the ``meta`` device
to compare every tensor's name, shape and dtype with the file (floating point only), and
NaN/inf meta-parameters are refused. Every refusal is a :class:`CheckpointError` naming
the file and the field.

Writes are atomic: the three files are written and fsynced into a temporary sibling
directory that is then renamed into place, so a crash never leaves a half-written
checkpoint under the final name.

``format_version`` 1 checkpoints (``lopt.json`` held only the weights' sha256, itself
unchecked) cannot be verified and are refused; :func:`upgrade_checkpoint` re-saves one
you trust in the current format.

:func:`load_checkpoint` accepts a native checkpoint directory, a name registered in
``metaopt.registry.PRETRAINED_LOPTS`` (see :func:`list_pretrained`), or a
learned_optimization release folder (``params`` + ``config.gin``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from metaopt.errors import CheckpointError
from metaopt.fileio import read_regular_file, sha256_hex, write_directory_atomically
from metaopt.lopt.base import ARCHITECTURES, LearnedOptimizer
from metaopt.registry import PRETRAINED_LOPTS

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "list_pretrained",
    "load_checkpoint",
    "register_pretrained",
    "save_checkpoint",
    "upgrade_checkpoint",
]

FORMAT_VERSION = 2
FORMAT_NAME = "metaopt.lopt"
META_FILE = "lopt.json"
SEAL_FILE = "lopt.json.sha256"
WEIGHTS_FILE = "meta_params.safetensors"
CHECKPOINT_FILES = frozenset({META_FILE, SEAL_FILE, WEIGHTS_FILE})
#: Largest ``lopt.json`` read (they are about 1 kB).
MAX_META_BYTES = 1 << 20
#: Largest weights file read (the released VeLO is 9 MB).
MAX_WEIGHTS_BYTES = 1 << 32
_SEAL = re.compile(rb"([0-9a-f]{64})  " + re.escape(META_FILE.encode()) + rb"\n")
_SEAL_BYTES = 64 + 2 + len(META_FILE) + 1
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- saving


def _json_bytes(meta: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint config/metadata must be plain JSON without "
                              f"NaN or infinity: {err}") from None
    return (text + "\n").encode()


def save_checkpoint(lopt: LearnedOptimizer, path: str | os.PathLike,
                    *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``lopt`` as a native checkpoint directory at ``path`` (atomically).

    ``metadata`` is any JSON-able provenance (training run, source release, …).
    Returns the checkpoint path. An existing checkpoint at ``path`` is replaced; any
    other existing file or non-empty directory there is refused. Meta-parameters with
    NaN/inf, or a ``config()`` that does not rebuild the same tensors, are refused too
    (the checkpoint would not load).
    """
    if not lopt.architecture or lopt.architecture not in ARCHITECTURES:
        raise CheckpointError(f"architecture {lopt.architecture!r} is not registered")
    path = Path(path)
    if path.is_symlink() or (path.exists() and not _replaceable(path)):
        raise CheckpointError(f"{path} exists and is not a learned-optimizer checkpoint; "
                              "refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lopt.state_dict().items()}
    config = lopt.config()
    _check_tensors(ARCHITECTURES[lopt.architecture], lopt.architecture, config, tensors,
                   where=f"saving {path}")
    weights = safetensors_save(tensors)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "architecture": lopt.architecture, "config": config,
            "metadata": dict(metadata or {}),
            "files": {WEIGHTS_FILE: {"sha256": sha256_hex(weights), "bytes": len(weights)}}}
    meta_bytes = _json_bytes(meta)
    seal = f"{sha256_hex(meta_bytes)}  {META_FILE}\n".encode()
    return write_directory_atomically(
        path, {WEIGHTS_FILE: weights, META_FILE: meta_bytes, SEAL_FILE: seal})


def _replaceable(path: Path) -> bool:
    """An existing native checkpoint (any version) or an empty directory."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or (META_FILE in names and names <= CHECKPOINT_FILES)


# --------------------------------------------------------------------------- loading


def _is_native(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).exists()


def _read(path: Path, what: str, *, max_bytes: int, expected_size: int | None = None
          ) -> bytes:
    return read_regular_file(path, max_bytes=max_bytes, expected_size=expected_size,
                             follow_symlinks=False, error=CheckpointError, what=what)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_meta(data: bytes, where: Path) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{where}: unreadable checkpoint metadata: "
                              f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: not a metaopt learned-optimizer checkpoint "
                              f"(field 'format' is not {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: field 'format_version' must be a positive integer, "
                              f"got {str(version)[:40]!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version} is newer than this "
                              f"metaopt reads ({FORMAT_VERSION}); upgrade metaopt")
    return meta


def _upgrade_hint(path: Path) -> str:
    return (f"if you trust it, re-save it in the current format with "
            f"metaopt.lopt.checkpoint.upgrade_checkpoint({str(path)!r})")


def _verified_meta(path: Path) -> dict[str, Any]:
    """``lopt.json`` of a format-2 checkpoint, after the seal and file list are checked."""
    meta_file, seal_file = path / META_FILE, path / SEAL_FILE
    if not os.path.lexists(seal_file):
        meta = _parse_meta(_read(meta_file, "checkpoint metadata", max_bytes=MAX_META_BYTES),
                           meta_file)
        if meta["format_version"] == 1:
            raise CheckpointError(
                f"{path}: format_version 1 checkpoint: its {META_FILE} is not covered by a "
                f"checksum, so it cannot be verified; {_upgrade_hint(path)}")
        raise CheckpointError(f"{seal_file}: missing; the checkpoint cannot be verified")
    seal = _read(seal_file, "metadata checksum", max_bytes=_SEAL_BYTES)
    match = _SEAL.fullmatch(seal)
    if match is None:
        raise CheckpointError(f"{seal_file}: malformed (expected '<sha256>  {META_FILE}' "
                              "on one line)")
    data = _read(meta_file, "checkpoint metadata", max_bytes=MAX_META_BYTES)
    digest = sha256_hex(data)
    if digest != match.group(1).decode():
        raise CheckpointError(f"{meta_file}: checksum mismatch (sha256 {digest[:16]}…, "
                              f"{SEAL_FILE} says {match.group(1).decode()[:16]}…); the file "
                              "is corrupt or was edited")
    meta = _parse_meta(data, meta_file)
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {meta['format_version']} does "
                              f"not use {SEAL_FILE}; {_upgrade_hint(path)}")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS_FILE}:
        raise CheckpointError(f"{meta_file}: field 'files' must list exactly {WEIGHTS_FILE}")
    return meta


def _weights_entry(meta: Mapping[str, Any], meta_file: Path) -> tuple[str, int | None]:
    if meta["format_version"] == 1:
        digest, size = meta.get("sha256"), None
    else:
        entry = meta["files"][WEIGHTS_FILE]
        if not isinstance(entry, dict):
            raise CheckpointError(f"{meta_file}: field 'files/{WEIGHTS_FILE}' must be a map")
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) \
                or not 0 <= size <= MAX_WEIGHTS_BYTES:
            raise CheckpointError(f"{meta_file}: field 'files/{WEIGHTS_FILE}/bytes' must be "
                                  f"an integer in [0, {MAX_WEIGHTS_BYTES}]")
    if not isinstance(digest, str) or re.fullmatch("[0-9a-f]{64}", digest) is None:
        raise CheckpointError(f"{meta_file}: the weights' sha256 must be 64 hex digits")
    return digest, size


def _check_listing(path: Path, allowed: frozenset[str]) -> None:
    extra = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if extra:
        raise CheckpointError(f"{path}: holds files the checkpoint does not list: "
                              f"{', '.join(extra[:5])}")


def _check_tensors(cls: type[LearnedOptimizer], arch: str, config: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], *, where: str) -> dict[str, Any]:
    """Check ``config`` and compare ``tensors`` with what ``cls(**config)`` holds (built
    on the meta device, so nothing is allocated); return the checked config."""
    from metaopt.lopt.release_arch import check_arguments

    config = check_arguments(cls, config, error=CheckpointError, where=f"{where}: config")
    try:
        with torch.device("meta"):
            skeleton = cls(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: config does not build architecture {arch!r}: "
                              f"{str(err)[:200]}") from None
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    for key, ref in expected.items():
        if key not in tensors:
            continue
        got = tensors[key]
        if got.dtype not in _FLOAT_DTYPES:
            problems.append(f"{key}: dtype {got.dtype} is not floating point")
        elif got.dtype != ref.dtype:
            problems.append(f"{key}: dtype {got.dtype}, expected {ref.dtype}")
        elif got.shape != ref.shape:
            problems.append(f"mis-shaped {key}: got {tuple(got.shape)}, "
                            f"expected {tuple(ref.shape)}")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"{key}: holds NaN or infinite values")
    if missing or unexpected or problems:
        parts = ([f"missing {', '.join(missing[:12])}"] if missing else []) \
            + ([f"unexpected {', '.join(unexpected[:12])}"] if unexpected else []) \
            + problems[:12]
        raise CheckpointError(f"{where}: meta-parameters do not match architecture "
                              f"{arch!r}: " + "; ".join(parts))
    return config


def _load_native(path: Path, *, allow_version_1: bool = False) -> LearnedOptimizer:
    meta_file = path / META_FILE
    if allow_version_1 and not os.path.lexists(path / SEAL_FILE):
        meta = _parse_meta(_read(meta_file, "checkpoint metadata", max_bytes=MAX_META_BYTES),
                           meta_file)
        _check_listing(path, frozenset({META_FILE, WEIGHTS_FILE}))
    else:
        meta = _verified_meta(path)
        _check_listing(path, CHECKPOINT_FILES)
    for key in ("architecture", "config"):
        if key not in meta:
            raise CheckpointError(f"{meta_file}: missing field {key!r}")
    digest, size = _weights_entry(meta, meta_file)
    weights_file = path / WEIGHTS_FILE
    weights = _read(weights_file, "meta-parameters", max_bytes=MAX_WEIGHTS_BYTES,
                    expected_size=size)
    actual = sha256_hex(weights)
    if actual != digest:
        raise CheckpointError(
            f"{weights_file}: checksum mismatch (file sha256 {actual[:16]}…, expected "
            f"{digest[:16]}…); the file is corrupt or truncated ({len(weights)} bytes)")
    arch = meta["architecture"]
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(f"{meta_file}: unknown architecture {str(arch)[:40]!r} "
                              f"(registered: {', '.join(sorted(ARCHITECTURES)) or 'none'})")
    try:
        tensors = safetensors_load(weights)
    except (SafetensorError, ValueError, TypeError, OverflowError) as err:
        raise CheckpointError(f"{weights_file}: unreadable safetensors data: "
                              f"{str(err)[:200]}") from None
    cls = ARCHITECTURES[arch]
    config = _check_tensors(cls, arch, meta["config"], tensors, where=str(path))
    try:
        lopt = cls(**config)
    except (TypeError, ValueError) as err:  # pragma: no cover - the meta build passed
        raise CheckpointError(f"{meta_file}: config does not build {arch!r}: {err}") from None
    lopt.load_state_dict(tensors, strict=True)
    return lopt


def upgrade_checkpoint(path: str | os.PathLike) -> Path:
    """Re-save a format-1 checkpoint in the current, fully checksummed format (in place).

    Format 1 did not checksum ``lopt.json``, so only call this on a checkpoint you trust:
    the weights' own sha256 and every structural check still apply. A current-format
    checkpoint is verified and left as it is.
    """
    path = Path(path)
    if os.path.lexists(path / SEAL_FILE):
        _load_native(path)
        return path
    lopt = _load_native(path, allow_version_1=True)
    meta = _parse_meta(_read(path / META_FILE, "checkpoint metadata",
                             max_bytes=MAX_META_BYTES), path / META_FILE)
    metadata = meta.get("metadata")
    return save_checkpoint(lopt, path, metadata=metadata if isinstance(metadata, dict) else {})


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
    if path.name in (META_FILE, SEAL_FILE) and path.is_file():
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
            f"{path} is neither a native checkpoint (directory with {META_FILE}, "
            f"{SEAL_FILE} and {WEIGHTS_FILE}) nor a learned_optimization release "
            "(params + config.gin)")
    known = ", ".join(list_pretrained()) or "none registered"
    raise CheckpointError(f"no checkpoint at {path} and no pretrained optimizer named "
                          f"{name!r} (known: {known})")

