"""The run directory: what a run writes where, and the environment it ran in.

::

    runs/ridge_hyper-20250101-120000/
      config.yaml          resolved config (all defaults filled in); `metaopt resume` reads it
      env.json             python/torch/numpy versions, git commit, device, host, command
                           line (first launch; later resumes appended under "resumes")
      status.json          {"state": "running"|"interrupted"|"finished", "step", "steps"}
      metrics.jsonl        one record per (step, split): {"step", "split", "time_s", …}
      eval.jsonl           results of `metaopt eval`
      checkpoints/step_00000100/{tensors.safetensors, state.json, MANIFEST.json}
      tensorboard/         TensorBoard event files (when tensorboard is installed)
      plots/metrics.png    written by `metaopt plot`
      run.lock             held (fcntl.flock) by the one process writing the run; its PID

Only one process at a time writes a run directory: ``train`` and ``resume`` hold an
exclusive :class:`RunLock` for their whole life, and a second one is refused with
:class:`RunDirError` naming the holder's PID. The lock is released by the kernel when
the holder exits, however it exits, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaopt.errors import MetaoptError
from metaopt.fileio import atomic_write_text
from metaopt.runner.config import RunConfig, load_run_config, to_yaml

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "ENV_FILE",
    "LOCK_FILE",
    "PLOTS",
    "STATUS_FILE",
    "RunDirError",
    "RunLock",
    "create_run_dir",
    "default_run_dir",
    "environment_info",
    "load_run_dir_config",
    "read_status",
    "record_resume",
    "update_run_config",
    "write_status",
]

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
STATUS_FILE = "status.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
LOCK_FILE = "run.lock"


class RunDirError(MetaoptError, RuntimeError):
    """A run directory is missing, incomplete, or already used by another run."""


class RunLock:
    """Exclusive, non-blocking lock of a run directory (``fcntl.flock`` on run.lock).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Acquiring fails at
    once with :class:`RunDirError` naming the PID written by the current holder.
    The directory is created if needed.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(f"{self.run_dir} is in use by another metaopt process "
                              f"(PID {holder}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<experiment>-<YYYYmmdd-HHMMSS>`` (with a suffix if it exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.experiment}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def create_run_dir(run_dir: str | Path, cfg: RunConfig, argv: Sequence[str]) -> Path:
    """Create a fresh run directory with its config copy, env.json and status."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir} already holds a run; continue it with "
                          f"`metaopt resume {run_dir}` or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
    (run_dir / PLOTS).mkdir(exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
    atomic_write_text(run_dir / ENV_FILE,
                      json.dumps(environment_info(cfg.device, argv), indent=1) + "\n")
    write_status(run_dir, "created", 0, cfg.steps)
    return run_dir


def load_run_dir_config(run_dir: str | Path) -> RunConfig:
    """The validated config of an existing run directory."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return load_run_config(path)


def update_run_config(run_dir: str | Path, cfg: RunConfig) -> None:
    """Replace the run's config.yaml (atomically) by ``cfg``, e.g. after ``steps=N``."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, to_yaml(cfg))


def record_resume(run_dir: str | Path, device: str, argv: Sequence[str],
                  changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
    """Append this session's environment to env.json's ``resumes`` list.

    ``changes`` (``{key: (old, new)}``, e.g. ``{"steps": (300, 600)}``) records config
    values this resume changed, under ``config_changes``.
    """
    path = Path(run_dir) / ENV_FILE
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        env = {}
    info = environment_info(device, argv)
    if changes:
        info["config_changes"] = {k: {"old": old, "new": new}
                                  for k, (old, new) in changes.items()}
    env.setdefault("resumes", []).append(info)
    atomic_write_text(path, json.dumps(env, indent=1) + "\n")


def write_status(run_dir: str | Path, state: str, step: int, steps: int) -> None:
    """Record where the run stands (``created``, ``running``, ``interrupted``, ``finished``)."""
    atomic_write_text(Path(run_dir) / STATUS_FILE,
                      json.dumps({"state": state, "step": step, "steps": steps}) + "\n")


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's status record (``{}`` when absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def environment_info(device: str, argv: Sequence[str]) -> dict[str, Any]:
    """Versions, git commit, device, host and command line, for reproducibility."""
    import metaopt

    info: dict[str, Any] = {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": list(argv),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "metaopt": metaopt.__version__,
        "device": device,
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "git": git_info(Path(metaopt.__file__).resolve().parent),
    }
    return info


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def git_info(where: Path) -> dict[str, Any]:
    """The commit checked out at ``where`` and whether tracked files differ from it."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                 timeout=5, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}
