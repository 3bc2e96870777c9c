"""Durable file writes and checksums shared by every on-disk format in metaopt.

Checkpoints (runner and learned optimizers) are written to a temporary location,
fsynced and then renamed, so a crash never leaves a half-written file behind; their
contents are verified on load with SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from metaopt.errors import FormatError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "read_regular_file",
    "sha256_hex",
    "write_directory_atomically",
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


def read_regular_file(path: str | os.PathLike, *, max_bytes: int,
                      expected_size: int | None = None, follow_symlinks: bool = True,
                      error: type[FormatError] = FormatError, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, read with bounds checked before reading.

    Refuses (raising ``error`` naming ``path``) anything that is not a regular file (a
    FIFO would block, ``/dev/zero`` never ends), a file larger than ``max_bytes`` or of
    another size than ``expected_size``, a symlink when ``follow_symlinks`` is false, and
    a file that changes size while it is read. The size is taken from the open file
    descriptor, so a swap between check and read cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
        if os.path.islink(path):
            raise error(f"{path}: {what} is a symlink, which is not allowed here")
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise error(f"{path}: cannot open {what}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: {what} is not a regular file")
        size = info.st_size
        if expected_size is not None and size != expected_size:
            raise error(f"{path}: {what} holds {size} bytes, expected {expected_size} "
                        "(truncated, extended or replaced)")
        if size > max_bytes:
            raise error(f"{path}: {what} holds {size} bytes, more than the {max_bytes} "
                        "this reader accepts")
        chunks, remaining = [], size + 1  # one more byte detects a file that grew
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size:
        raise error(f"{path}: {what} changed size while being read "
                    f"({size} bytes expected, {len(data)} read)")
    return data


def write_directory_atomically(path: str | os.PathLike, files: Mapping[str, bytes], *,
                               tmp_prefix: str = ".tmp-", old_prefix: str = ".old-") -> Path:
    """Write ``files`` (name → bytes) as the directory ``path``, replacing it atomically.

    The files are written and synced into ``<tmp_prefix><name>-<pid>`` beside ``path``;
    an existing ``path`` is moved aside to ``<old_prefix><name>-<pid>``, the new
    directory renamed into place, the parent synced and the old copy deleted. A kill at
    any moment leaves either the old or the new complete directory under ``path``, plus
    at most one hidden leftover that the caller's clean-up can recognise by its prefix
    (the runner renames an ``.old-*`` back when the new one never appeared). This is the
    one directory write in metaopt: runner and learned-optimizer checkpoints use it.
    """
    path = Path(path)
    tmp = path.with_name(f"{tmp_prefix}{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_synced(tmp / name, data)
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f"{old_prefix}{path.name}-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
