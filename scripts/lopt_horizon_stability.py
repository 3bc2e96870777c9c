"""Does a learned optimizer stay stable when run far past its meta-training horizon?

    python scripts/lopt_horizon_stability.py [--opt NAME_OR_PATH ...] [--suite mlp_mup_val]
        [--width 128] [--tasks N] [--steps 5000] [--horizon 1000] [--seeds 0 1 2]
        [--report-every 100] [--step-scale S] [--backend auto] [--json PATH] [--plot PATH]

Each optimizer trains every task of ``--suite`` (at ``--width``) for ``--steps`` steps per
seed; from that one run :func:`evaluate_lopt_per_task` reports, every ``--report-every``
steps, the final loss a run of that length would have (the mean loss over its last 10 %).
A task is **stable** for an optimizer when no seed turned non-finite and its seed-mean
final loss at ``--steps`` is no higher than at ``--horizon`` (the meta-training horizon):
running longer must not make training worse. The script prints, per optimizer and task,
both losses and their ratio, writes them with the whole curves to ``--json``, and plots
the curves (one panel per task, log scale) to ``--plot``. Exit status 0 whatever the
verdict; ``stable`` is in the JSON per task and per optimizer (all tasks stable).
``--step-scale S`` runs every optimizer with its steps ``S`` times as large
(:func:`~metaopt.algorithms.lopt_calibration.rescale_step`; rows named ``NAME×S``): does
a smaller step remove a late rise or only delay it?
"""

from __future__ import annotations

import argparse
import json
import math
from statistics import fmean

from metaopt.algorithms.lopt_calibration import rescale_step
from metaopt.fileio import atomic_write_text
from metaopt.lopt import load_checkpoint
from metaopt.runner.experiments.lopt_metatrain import evaluate_lopt_per_task
from tasks.lopt_tasks import heldout_suite


def horizon_rows(name: str, suite: str, width: int, n_tasks: int | None, steps: int,
                 horizon: int, seeds: list[int], report_every: int,
                 backend: str, step_scale: float = 1.0) -> dict:
    """One optimizer's curves and verdicts on the suite's tasks (seed means)."""
    lopt = load_checkpoint(name)
    if step_scale != 1.0:
        lopt, name = rescale_step(lopt, step_scale), f"{name}×{step_scale:g}"
    tasks = heldout_suite(suite, widths=[width])[:n_tasks]
    marks = sorted({*range(report_every, steps + 1, report_every), horizon, steps})
    runs = [evaluate_lopt_per_task(lopt, tasks, steps, seed=s, backend=backend,
                                   report_at=marks) for s in seeds]
    per_task = []
    for i, task in enumerate(tasks):
        curve = {k: fmean(run[i]["final_loss_at"][k] for run in runs) for k in marks}
        diverged = sum(not math.isfinite(run[i]["final_loss"]) for run in runs)
        ratio = curve[steps] / curve[horizon]
        per_task.append({"task": task.name, "dataset": task.config["dataset"],
                         "loss_at_horizon": curve[horizon], "loss_at_steps": curve[steps],
                         "ratio": ratio, "diverged": diverged,
                         "stable": diverged == 0 and ratio <= 1.0,
                         "curve": {str(k): v for k, v in curve.items()}})
    return {"optimizer": name, "stable": all(t["stable"] for t in per_task),
            "tasks": per_task}


def plot(rows: list[dict], steps: int, horizon: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [t["dataset"] for t in rows[0]["tasks"]]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.4),
                             squeeze=False)
    for j, (ax, dataset) in enumerate(zip(axes[0], datasets)):
        for row in rows:
            curve = row["tasks"][j]["curve"]
            ks = [int(k) for k in curve]
            ax.plot(ks, [curve[str(k)] for k in ks], label=row["optimizer"])
        ax.axvline(horizon, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(dataset)
        ax.set_xlabel("steps")
    axes[0][0].set_ylabel("final training loss (last 10 %)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"loss of a run of that length, up to {steps} steps "
                 f"(dashed: meta-training horizon {horizon})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opt", action="append",
                    help="learned optimizer name or path (repeatable; default: "
                         "mulo-small-fc-w128)")
    ap.add_argument("--suite", default="mlp_mup_val")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=None, help="first N tasks (default all)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--horizon", type=int, default=1000,
                    help="the meta-training horizon the long run is compared with")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--report-every", type=int, default=100)
    ap.add_argument("--step-scale", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if not 1 <= args.horizon <= args.steps:
        ap.error(f"--horizon must lie in [1, --steps={args.steps}], got {args.horizon}")
    rows = [horizon_rows(name, args.suite, args.width, args.tasks, args.steps, args.horizon,
                         args.seeds, args.report_every, args.backend, args.step_scale)
            for name in (args.opt or ["mulo-small-fc-w128"])]
    for row in rows:
        for t in row["tasks"]:
            print(f"{row['optimizer']:28s} {t['dataset']:8s} loss@{args.horizon} "
                  f"{t['loss_at_horizon']:.4g}  loss@{args.steps} {t['loss_at_steps']:.4g}  "
                  f"×{t['ratio']:.2f}  {'stable' if t['stable'] else 'NOT stable'}")
        print(f"{row['optimizer']}: {'stable' if row['stable'] else 'NOT stable'} on "
              f"{args.suite}")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"suite": args.suite, "width": args.width, "steps": args.steps,
             "horizon": args.horizon, "seeds": args.seeds, "step_scale": args.step_scale,
             "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.steps, args.horizon, args.plot)


if __name__ == "__main__":
    main()
