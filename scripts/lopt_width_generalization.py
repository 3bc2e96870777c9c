"""μLO's width-generalisation claim at small scale: final loss vs width, μLO vs its SP twin.

    python scripts/lopt_width_generalization.py [--mulo NAME_OR_PATH] [--sp NAME_OR_PATH]
        [--widths 128 512 1024 2048] [--steps 1000] [--seeds 0 1 2] [--tasks 2]
        [--backend auto|reference|cpu_kernels] [--json PATH] [--plot PATH]

μLO (``mulo_small_fc``, meta-trained on μP MLPs of width 128 by
``configs/lopt_mulo.yaml``) trains the μP MLPs of the held-out suite ``mlp_mup_heldout``
at each width; its standard-parametrisation twin (``configs/lopt_sp.yaml``) trains the SP
MLPs of ``mlp_sp_heldout``. Each cell is the mean over seeds of the mean final training
loss (last 10 % of steps) over the first ``--tasks`` tasks of the suite; a run that turns
non-finite counts as ``inf`` (diverged). μLO's claim: its loss stays finite and falls as
width grows; the SP twin degrades or diverges.
"""

from __future__ import annotations

import argparse
import json
import math

from metaopt.lopt import load_checkpoint
from metaopt.runner.experiments.lopt_metatrain import evaluate_lopt
from tasks.lopt_tasks import heldout_suite


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
            runs = [evaluate_lopt(lopt, tasks, args.steps, seed=s, backend=args.backend)
                    for s in args.seeds]
            losses = [r["final_loss"] for r in runs]
            mean = sum(losses) / len(losses)
            median = sum(r["final_median_loss"] for r in runs) / len(runs)
            rows.append({"optimizer": label, "width": width, "final_loss": mean,
                         "final_median_loss": median,
                         "diverged": sum(not math.isfinite(v) for v in losses),
                         "test_metric": sum(r["test_metric"] for r in runs) / len(runs)})
            print(f"{label:<8} width {width:>5}  final loss {mean:.4f}  median {median:.2e}  "
                  f"test metric {rows[-1]['test_metric']:.3f}  diverged "
                  f"{rows[-1]['diverged']}/{len(losses)}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "rows": rows}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label in ("μLO", "SP twin"):
            pts = [(r["width"], r["final_loss"]) for r in rows if r["optimizer"] == label]
            ax.plot([p[0] for p in pts], [min(p[1], 10.0) for p in pts], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel(f"final training loss after {args.steps} steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
