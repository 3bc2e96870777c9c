"""Learned optimizers: architectures, the torch.optim shell, checkpoints and importers.

    from metaopt.lopt import load_checkpoint, list_pretrained
    lopt = load_checkpoint(path_or_name)   # native checkpoint, registered name or release folder
    lopt = pretrained("mulo-small-fc-w128")  # shipped by name; "velo" is fetched on first use
    opt = lopt.optimizer(model.parameters(), num_steps=10_000)
    loss.backward(); opt.step(loss=loss)

Importing this package registers every architecture in ``ARCHITECTURES``.
"""

from __future__ import annotations

import importlib
import importlib.util

from metaopt.lopt.base import ARCHITECTURES, LearnedOptimizer, LOptState, register_architecture
from metaopt.lopt.checkpoint import (
    CheckpointError,
    list_pretrained,
    load_checkpoint,
    register_pretrained,
    save_checkpoint,
)
from metaopt.lopt.hub import pretrained
from metaopt.lopt.release import ReleaseFormatError, load_release
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.torch_optimizer import LearnedOptimizerShell, MissingLossError

# Architectures that live in their own modules register themselves on import.
for _module in ("metaopt.lopt.velo", "metaopt.lopt.mulo"):
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "LOptState",
    "LearnedOptimizer",
    "LearnedOptimizerShell",
    "MissingLossError",
    "ReleaseFormatError",
    "SmallFCLOpt",
    "list_pretrained",
    "load_checkpoint",
    "load_release",
    "pretrained",
    "register_architecture",
    "register_pretrained",
    "save_checkpoint",
]
