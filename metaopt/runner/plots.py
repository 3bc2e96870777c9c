"""Learning curves from ``metrics.jsonl``: one subplot per (split, metric), runs overlaid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from metaopt.runner.metrics import RESERVED, read_metrics

__all__ = ["curves", "plot_runs"]

Curves = dict[tuple[str, str], tuple[list[int], list[float]]]


def curves(run_dir: str | Path) -> Curves:
    """``{(split, metric): (steps, values)}`` of one run, in file order."""
    out: Curves = {}
    for rec in read_metrics(run_dir):
        split = str(rec.get("split", "?"))
        for k, v in rec.items():
            if k in RESERVED or not isinstance(v, (int, float)):
                continue
            steps, values = out.setdefault((split, k), ([], []))
            steps.append(int(rec["step"]))
            values.append(float(v))
    return out


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *,
              names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write a PNG with every metric of every run against the outer step.

    Args:
        run_dirs: one or more run directories.
        out: the PNG path (parent directories are created).
        names: legend labels (default: each run directory's name).
        title: figure title (default: the run names).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    run_dirs = [Path(r) for r in run_dirs]
    names = list(names) if names else [_run_name(r) for r in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    per_run = [curves(r) for r in run_dirs]
    keys = sorted({k for c in per_run for k in c}, key=lambda k: (k[0] != "train", k))
    if not keys:
        raise ValueError("no metrics to plot in " + ", ".join(map(str, run_dirs)))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        positive = True
        for name, c in zip(names, per_run):
            if key not in c:
                continue
            steps, values = c[key]
            marker = "o" if len(steps) <= 30 and key[0] != "train" else None
            ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.3)
            positive &= all(v > 0 for v in values if math.isfinite(v))
        finite = [v for c in per_run if key in c for v in c[key][1] if math.isfinite(v)]
        if positive and finite and max(finite) / min(finite) > 30:
            ax.set_yscale("log")
        ax.set_title(f"{key[0]} / {key[1]}")
        ax.set_xlabel("outer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title or ", ".join(names), fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _run_name(run_dir: Path) -> str:
    """The config's ``name`` if set, else the directory's name."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        if cfg.get("name"):
            return str(cfg["name"])
    except (OSError, ValueError, AttributeError):
        pass
    return run_dir.resolve().name
