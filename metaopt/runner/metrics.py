"""Metric records: ``metrics.jsonl`` (always) and TensorBoard event files (if installed).

One JSON object per line: ``{"step": 12, "split": "train", "time_s": 3.2, "loss": …}``.
``time_s`` is the run's cumulative training wall time (carried across resumes); every
other field is deterministic, so an interrupted-and-resumed run and an uninterrupted
one write identical records apart from ``time_s``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metaopt.fileio import atomic_write_text

__all__ = ["METRICS_FILE", "MetricsWriter", "read_metrics", "to_float_metrics"]

METRICS_FILE = "metrics.jsonl"
RESERVED = ("step", "split", "time_s")


def to_float_metrics(metrics: Mapping[str, Any], where: str) -> dict[str, float]:
    """Metrics as plain floats (tensors and numpy scalars converted), names checked."""
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or k in RESERVED:
            raise ValueError(f"{where}: metric name {k!r} is not allowed "
                             f"(names must be strings other than {RESERVED})")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: metric '{k}' is {type(v).__name__}, not a number") \
                from None
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (an incomplete last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a hard kill
    return records


class MetricsWriter:
    """Appends metric records; on resume first drops records after the checkpoint.

    Args:
        run_dir: the run directory.
        resume_step: the step the run starts from: the resumed checkpoint's, or 0
            when it starts over (``None``: append, keep everything). Records with a
            larger step — written after that point by a run that was then killed —
            are removed so the file matches an uninterrupted run.
        tensorboard: also write TensorBoard events under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [json.dumps(r, allow_nan=True) for r in read_metrics(run_dir)
                    if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step) \
            if tensorboard else None
        self._warned_nonfinite = False

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, step: int, split: str, metrics: Mapping[str, float], time_s: float) -> None:
        """Append one record (flushed at once, so a kill loses at most this line)."""
        record = {"step": step, "split": split, "time_s": round(time_s, 6), **metrics}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if not self._warned_nonfinite and not all(math.isfinite(v) for v in metrics.values()):
            warnings.warn(f"non-finite {split} metric at step {step}: {dict(metrics)}",
                          RuntimeWarning, stacklevel=2)
            self._warned_nonfinite = True
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_writer(log_dir: Path, resume_step: int | None) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge)
