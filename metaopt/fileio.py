"""Durable file writes and checksums shared by every on-disk format in metaopt.

Checkpoints (runner and learned optimizers) are written to a temporary location,
fsynced and then renamed, so a crash never leaves a half-written file behind; their
contents are verified on load with SHA-256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "sha256_hex",
    "write_synced",
]


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a synced temporary file beside it, then
    ``os.replace``, then a sync of the directory. Readers see the old file or the new
    one, never a partial write; a failed write leaves no temporary file behind.

    This is the one atomic file write in metaopt: every writer (runner and learned-
    optimizer checkpoints, the task cache, the kernel cache) goes through it.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text (UTF-8) version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())
