"""Evaluate optimizers (torch.optim or learned) on a learned-optimizer task suite.

    python scripts/bench_lopt.py --suite mlp_mup_heldout --opt velo --opt adamw_default \
        --steps 1000 --seeds 0 1 2 --out runs/bench_lopt

Protocol (each task of the suite, each seed; the seed fixes init and the batch stream, so
every optimizer sees the same batches):

* **tuned AdamW** — ``torch.optim.AdamW`` (weight decay 0.01, its default) at each
  learning rate of :data:`LR_GRID`, 14 points log-spaced over ``[1e-5, 1]`` (VeLO's
  14-point log grid; the range is our choice); the lr with the lowest mean (over seeds)
  final training loss is kept per task. Diverged runs count as ``inf``.
* **AdamW at its default lr** 1e-3.
* each optimizer under test: a ``torch.optim`` factory, a learned optimizer (object,
  registered/published name via :func:`metaopt.lopt.hub.pretrained`, or a checkpoint path).
  μLO architectures (``mulo_*``) get the task's ``mup_scales``.
* with ``--tune-lopt-lr`` (``tune_lopt_lr=True``), each learned optimizer also gets a row
  ``NAME@tuned``: its step multiplier (the shell's ``lr``, 1.0 = as meta-trained) tuned
  per task on :data:`LOPT_LR_GRID` by the same rule as AdamW's learning rate — the
  comparison with tuned AdamW at an equal per-task tuning budget in kind.

Reported per task and optimizer: ``final_loss`` (mean training loss of the last 10 % of
steps), ``final_median_loss`` (its median there: loss spikes move the mean, not this),
``mean_loss`` (over all steps), ``test_metric`` (the task's metric — accuracy — on 4
test batches at the end) and ``speedup`` = (steps tuned AdamW needs until its
training-loss curve, smoothed the same way, first reaches the optimizer's final loss) /
(steps run); ``None`` with ``reached: false`` when tuned AdamW never reaches it (the
speed-up is then above 1); ``ratio_to_tuned`` = final_loss / tuned AdamW's. Per
optimizer, ``worst_ratio_to_tuned`` is the largest ratio over the suite and the task it
is on: the number that decides "within 1.5× of tuned AdamW on every task" (on a
validation suite, ``mlp_mup_val``, it chooses between candidates without touching the
test suite). JSON (``results.json``) and a loss-curve plot per task.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaopt.errors import NonFiniteError
from metaopt.fileio import atomic_write_text
from metaopt.lopt.base import LearnedOptimizer
from tasks.lopt_tasks import LoptTask, heldout_suite

__all__ = ["LR_GRID", "evaluate", "plot_curves", "run_optimizer", "smoothed", "speedup",
           "worst_ratios"]

#: AdamW learning-rate grid: 14 points log-spaced over [1e-5, 1].
LR_GRID = tuple(float(v) for v in np.logspace(-5, 0, 14))

#: Step-multiplier grid of a tuned learned optimizer: 2^(k/2), k = -7..2 (0.088 … 2.0).
LOPT_LR_GRID = tuple(2.0 ** (k / 2) for k in range(-7, 3))

OptSpec = Callable[[list[torch.Tensor]], torch.optim.Optimizer] | LearnedOptimizer | str


def adamw(lr: float) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """A factory of ``torch.optim.AdamW(params, lr)``."""
    return lambda params: torch.optim.AdamW(params, lr=lr)


def _resolve(spec: OptSpec) -> OptSpec:
    if isinstance(spec, str):
        if spec == "adamw_default":
            return adamw(1e-3)
        from metaopt.lopt.hub import pretrained

        if Path(spec).exists():
            from metaopt.lopt import load_checkpoint

            return load_checkpoint(spec)
        return pretrained(spec)
    return spec


def run_optimizer(task: LoptTask, spec: OptSpec, steps: int, seed: int, *,
                  lopt_lr: float = 1.0) -> dict[str, Any]:
    """Train ``task`` for ``steps`` with ``spec``; per-step training losses and the final
    test metric. A non-finite loss stops the run (``diverged: true``; later losses inf).
    ``lopt_lr``: a learned optimizer's step multiplier (the shell's ``lr``)."""
    opt_spec = _resolve(spec)
    gen = torch.Generator().manual_seed(seed)
    init = task.init_params(gen)
    names = list(init)
    tensors = [init[k].clone().requires_grad_(True) for k in names]
    if isinstance(opt_spec, LearnedOptimizer):
        kw = {}
        if opt_spec.architecture.startswith("mulo_") and task.mup_scales is not None:
            kw["mup_scales"] = [task.mup_scales[k] for k in names]
        opt = opt_spec.optimizer(tensors, steps, lr=lopt_lr, **kw)
    else:
        opt = opt_spec(tensors)
    data_gen = torch.Generator().manual_seed(seed + 7919)
    losses: list[float] = []
    diverged = False
    for _ in range(steps):
        batch = task.sample_batch(data_gen, "train")
        opt.zero_grad()
        loss = task.loss(dict(zip(names, tensors)), batch)
        if not bool(torch.isfinite(loss)):
            diverged = True
            break
        loss.backward()
        try:
            if isinstance(opt_spec, LearnedOptimizer):
                opt.step(loss=loss.detach())
            else:
                opt.step()
        except NonFiniteError:
            diverged = True
            break
        losses.append(float(loss.detach()))
    losses += [math.inf] * (steps - len(losses))
    metric = math.nan
    if task.metric is not None and not diverged:
        test_gen = torch.Generator().manual_seed(seed + 104729)
        with torch.no_grad():
            params = dict(zip(names, tensors))
            metric = float(np.mean([float(task.metric(params, task.sample_batch(test_gen, "test")))
                                    for _ in range(4)]))
    return {"losses": losses, "diverged": diverged, "test_metric": metric}


def smoothed(losses: Sequence[float]) -> np.ndarray:
    """Trailing mean over a window of 10 % of the run (at least 1 step)."""
    x = np.asarray(losses, dtype=np.float64)
    w = max(1, len(x) // 10)
    c = np.cumsum(np.concatenate([[0.0], x]))
    out = np.empty_like(x)
    for t in range(len(x)):
        lo = max(0, t + 1 - w)
        out[t] = (c[t + 1] - c[lo]) / (t + 1 - lo)
    return out


def final_loss(losses: Sequence[float]) -> float:
    """Mean training loss of the last 10 % of steps."""
    return float(smoothed(losses)[-1])


def speedup(reference_losses: Sequence[float], target: float, steps: int) -> float | None:
    """(first step at which the smoothed reference curve ≤ ``target``) / ``steps``."""
    curve = smoothed(reference_losses)
    hit = np.nonzero(curve <= target)[0]
    return None if len(hit) == 0 else float(hit[0] + 1) / steps


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [final_loss(r["losses"]) for r in runs]
    curve = np.mean([r["losses"] for r in runs], 0)
    medians = [float(np.median(np.asarray(r["losses"])[-max(1, len(r["losses"]) // 10):]))
               for r in runs]
    return {"final_loss": float(np.mean(finals)), "final_loss_per_seed": finals,
            "final_median_loss": float(np.mean(medians)),
            "mean_loss": float(np.mean([np.mean(r["losses"]) for r in runs])),
            "test_metric": float(np.mean([r["test_metric"] for r in runs])),
            "diverged": sum(r["diverged"] for r in runs), "curve": curve.tolist()}


def evaluate(optimizers: Mapping[str, OptSpec], tasks: Sequence[LoptTask], *, steps: int,
             seeds: Sequence[int] = (0, 1, 2), lr_grid: Sequence[float] = LR_GRID,
             tune_lopt_lr: bool = False, lopt_lr_grid: Sequence[float] = LOPT_LR_GRID
             ) -> dict[str, Any]:
    """Run the protocol (module docstring) and return a JSON-able result dict."""
    out: dict[str, Any] = {"steps": steps, "seeds": list(seeds), "lr_grid": list(lr_grid),
                           "tasks": {}}
    for task in tasks:
        grid = {}
        for lr in lr_grid:
            grid[lr] = _summary([run_optimizer(task, adamw(lr), steps, s) for s in seeds])
        best_lr = min(grid, key=lambda lr: grid[lr]["final_loss"])
        tuned = grid[best_lr]
        rows = {"adamw_tuned": {**tuned, "lr": best_lr},
                "adamw_default": _summary([run_optimizer(task, adamw(1e-3), steps, s)
                                           for s in seeds])}
        for name, spec in optimizers.items():
            rows[name] = _summary([run_optimizer(task, spec, steps, s) for s in seeds])
            resolved = _resolve(spec) if tune_lopt_lr else None
            if isinstance(resolved, LearnedOptimizer):
                by_lr = {lr: _summary([run_optimizer(task, resolved, steps, s, lopt_lr=lr)
                                       for s in seeds]) for lr in lopt_lr_grid}
                best = min(by_lr, key=lambda lr: by_lr[lr]["final_loss"])
                rows[f"{name}@tuned"] = {**by_lr[best], "lr": best,
                                         "grid_final_loss": {str(k): v["final_loss"]
                                                             for k, v in by_lr.items()}}
        for row in rows.values():
            sp = speedup(tuned["curve"], row["final_loss"], steps)
            row["speedup"], row["reached"] = sp, sp is not None
            row["ratio_to_tuned"] = _ratio(row["final_loss"], tuned["final_loss"])
        out["tasks"][task.name] = {"config": dict(task.config),
                                   "grid_final_loss": {str(k): v["final_loss"]
                                                       for k, v in grid.items()},
                                   "optimizers": rows}
    out["worst_ratio_to_tuned"] = worst_ratios(out)
    return out


def _ratio(value: float, reference: float) -> float:
    if reference > 0:
        return value / reference
    return 1.0 if value == reference else math.inf


def worst_ratios(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per optimizer: its largest ``ratio_to_tuned`` over the suite's tasks and the task."""
    worst: dict[str, dict[str, Any]] = {}
    for task_name, entry in results["tasks"].items():
        for opt, row in entry["optimizers"].items():
            if opt not in worst or row["ratio_to_tuned"] > worst[opt]["ratio"]:
                worst[opt] = {"ratio": row["ratio_to_tuned"], "task": task_name}
    return worst


def plot_curves(results: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """One PNG of training-loss curves per task; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, entry in results["tasks"].items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for opt, row in entry["optimizers"].items():
            ax.plot(smoothed(row["curve"]), label=opt)
        ax.set(xlabel="step", ylabel="train loss (smoothed)", title=name, yscale="log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="mlp_mup_heldout")
    ap.add_argument("--widths", type=int, nargs="*", default=None)
    ap.add_argument("--opt", action="append", default=[],
                    help="learned optimizer name/path, or adamw_default (repeatable)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_lopt")
    ap.add_argument("--tune-lopt-lr", action="store_true",
                    help="also tune each learned optimizer's step multiplier per task")
    args = ap.parse_args(argv)
    tasks = heldout_suite(args.suite, widths=args.widths)
    results = evaluate({o: o for o in args.opt}, tasks, steps=args.steps, seeds=args.seeds,
                       tune_lopt_lr=args.tune_lopt_lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot_curves(results, out)
    for name, entry in results["tasks"].items():
        for opt, row in entry["optimizers"].items():
            lr = f" lr {row['lr']:.3g}" if "lr" in row else ""
            print(f"{name:<44} {opt:<16} final {row['final_loss']:.4f} "
                  f"test {row['test_metric']:.3f} speedup {row['speedup']}{lr}")
    for opt, w in results["worst_ratio_to_tuned"].items():
        print(f"worst final / tuned AdamW  {opt:<16} {w['ratio']:.2f}x on {w['task']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
