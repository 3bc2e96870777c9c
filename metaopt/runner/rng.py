"""Seeding, saving and restoring every random number generator a run draws from.

Exact resume needs all of them: Python ``random``, NumPy's global generator, torch's
CPU generator, every CUDA device's generator when CUDA is initialised, and each
``torch.Generator`` an experiment owns. States are returned as a tree of tensors and
JSON values, which the checkpoint writer stores without pickling.
"""

# The legacy global NumPy RNG is exactly what must be saved and restored here.
# ruff: noqa: NPY002

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """All global RNG states plus those of ``generators``, as tensors and JSON values."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": ([s for s in torch.cuda.get_rng_state_all()]
                 if torch.cuda.is_available() and torch.cuda.is_initialized() else []),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any],
                      generators: Mapping[str, torch.Generator]) -> None:
    """Put every generator back into the state :func:`capture_rng_state` recorded.

    Raises ``ValueError`` when the saved generators do not match the experiment's.
    """
    saved = set(state["generators"])
    if saved != set(generators):
        raise ValueError(f"checkpoint has torch.Generator states {sorted(saved)}, but the "
                         f"experiment owns {sorted(generators)}")
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda):
            raise ValueError(f"checkpoint holds RNG states for {len(cuda)} CUDA devices, "
                             f"but {torch.cuda.device_count()} are available")
        torch.cuda.set_rng_state_all(cuda)
    for name, g in generators.items():
        g.set_state(state["generators"][name])
