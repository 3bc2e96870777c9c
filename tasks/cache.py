"""On-disk cache of generated arrays: ``.npz`` files keyed by a content hash, written
atomically, read without pickle.

The cache directory is ``$METAOPT_CACHE`` when set, else ``~/.cache/metaopt``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from metaopt.fileio import atomic_write_bytes

__all__ = ["cache_dir", "cache_key", "load_arrays", "save_arrays"]


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``override``, else ``$METAOPT_CACHE``, else ``~/.cache/metaopt``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("METAOPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "metaopt"


def cache_key(config: dict) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (``.npz``) atomically (via ``atomic_write_bytes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in ``path``, or ``None`` if it is missing or unreadable (no pickle)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):
        return None
