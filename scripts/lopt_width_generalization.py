"""μLO's width-generalisation claim at small scale: final loss vs width, μLO vs its SP twin.

    python scripts/lopt_width_generalization.py [--mulo NAME_OR_PATH] [--sp NAME_OR_PATH]
        [--widths 128 512 1024 2048] [--steps 1000] [--seeds 0 1 2] [--tasks 2]
        [--backend auto|reference|cpu_kernels] [--json PATH] [--plot PATH]

μLO (``mulo_small_fc``, meta-trained on μP MLPs of width 128 by
``configs/lopt_mulo.yaml``) trains the μP MLPs of the held-out suite ``mlp_mup_heldout``
at each width; its standard-parametrisation twin (``configs/lopt_sp.yaml``) trains the SP
MLPs of ``mlp_sp_heldout``. Each cell is the mean over seeds of the mean final training
loss (last 10 % of steps) over the first ``--tasks`` tasks of the suite; a run that turns
non-finite counts as ``inf`` (diverged). Each row also holds ``per_task``: the same
numbers for every task alone (its dataset, mean over seeds), since a task whose loss is
already near zero at width 128 cannot show a fall with width; the plot has one panel per
task. μLO's claim: its loss stays finite and falls as width grows; the SP twin degrades
or diverges.
"""

from __future__ import annotations

import argparse
import json
import math
from statistics import fmean

from metaopt.lopt import load_checkpoint
from metaopt.runner.experiments.lopt_metatrain import evaluate_lopt_per_task
from tasks.lopt_tasks import heldout_suite

METRICS = ("final_loss", "final_median_loss", "test_metric")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mulo", default="mulo-small-fc-w128")
    ap.add_argument("--sp", default="sp-small-fc-w128")
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--backend", default="auto",
                    help="learned-optimizer step backend (the kernels equal the reference "
                         "to float32 rounding; auto: kernels where a C compiler exists)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    rows = []
    for label, name, suite in (("μLO", args.mulo, "mlp_mup_heldout"),
                               ("SP twin", args.sp, "mlp_sp_heldout")):
        lopt = load_checkpoint(name)
        for width in args.widths:
            tasks = heldout_suite(suite, widths=[width])[:args.tasks]
            runs = [evaluate_lopt_per_task(lopt, tasks, args.steps, seed=s,
                                           backend=args.backend) for s in args.seeds]
            per_task = [{"task": task.name, "dataset": task.config["dataset"],
                         **{key: fmean(run[i][key] for run in runs) for key in METRICS},
                         "diverged": sum(not math.isfinite(run[i]["final_loss"])
                                         for run in runs)}
                        for i, task in enumerate(tasks)]
            rows.append({"optimizer": label, "width": width,
                         **{key: fmean(t[key] for t in per_task) for key in METRICS},
                         "diverged": sum(t["diverged"] for t in per_task),
                         "per_task": per_task})
            print(f"{label:<8} width {width:>5}  final loss {rows[-1]['final_loss']:.4f}  "
                  f"median {rows[-1]['final_median_loss']:.2e}  test metric "
                  f"{rows[-1]['test_metric']:.3f}  diverged {rows[-1]['diverged']}/"
                  f"{len(tasks) * len(runs)}  per task "
                  + " ".join(f"{t['dataset']} {t['final_loss']:.4f}" for t in per_task),
                  flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "rows": rows}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        first = rows[0]["per_task"]
        panels = [("mean of tasks", None)] + (
            [(t["dataset"], i) for i, t in enumerate(first)] if len(first) > 1 else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4),
                                 squeeze=False)
        for ax, (title, i) in zip(axes[0], panels):
            for label in ("μLO", "SP twin"):
                pts = [(r["width"], r["final_loss"] if i is None
                        else r["per_task"][i]["final_loss"])
                       for r in rows if r["optimizer"] == label]
                ax.plot([p[0] for p in pts], [min(p[1], 10.0) for p in pts], "o-",
                        label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("width")
        axes[0][0].set_ylabel(f"final training loss after {args.steps} steps")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
