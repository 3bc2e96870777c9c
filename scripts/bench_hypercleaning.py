"""Data hyper-cleaning shoot-out: every hypergradient estimator on the same problem.

    python scripts/bench_hypercleaning.py [--quick] [--json PATH] [--plot PNG]

For each corruption rate p, seed and estimator, runs the ``hypercleaning``
experiment for a fixed number of outer steps and records
``{p, estimator, seed, test_acc, clean_f1, seconds}`` (seconds = wall time of the
outer steps, evaluation excluded), plus the two baselines (``corrupted``: all data,
weight 1; ``oracle``: only the clean samples) fitted by the same final trainer.
Prints a mean ± std table per p, writes the records as JSON with ``--json`` and, with
``--plot``, a figure of test accuracy against wall time (``--curve-every`` sets how
often along the run the accuracy is measured; those evaluations are not timed).

``--quick`` is a seconds-long smoke run (one p, one seed, few steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaopt.runner.experiments.hypercleaning import (
    ESTIMATOR_NAMES,
    HyperCleaning,
    HyperCleaningConfig,
    baseline_metrics,
    method_settings,
)

#: Outer steps per estimator in the full benchmark (sized so that each run takes
#: roughly the same, modest wall time on a busy 2-core CPU).
OUTER_STEPS = {"unrolled": 15, "truncated": 15, "ift_cg": 15, "ift_neumann": 15,
               "f2sa": 15, "bome": 15}
#: Settings shared by every estimator in the benchmark (see HyperCleaningConfig); the
#: estimators' own options come from ``method_settings`` (linear_iters, truncate).
METHOD_OPTIONS = {"linear_iters": 10, "truncate": 5}
BENCH_SETTINGS = {"outer_lr": 0.3, "inner_steps": 10,
                  "final_steps": 200}


def run_one(p: float, estimator: str, seed: int, steps: int, curve_every: int,
            overrides: dict, start_acc: float | None = None
            ) -> tuple[dict, list[tuple[float, float]]]:
    """One run; returns its record and the (seconds, test_acc) curve.

    ``start_acc`` is the test accuracy at w = 0 (the same for every estimator at a
    given p and seed), passed in to avoid refitting it per estimator.
    """
    torch.manual_seed(seed)
    method = method_settings(estimator, **METHOD_OPTIONS,
                             inner_lr=overrides.get("inner_lr", 1.0))
    cfg = HyperCleaningConfig(p=p, **method, **overrides)
    exp = HyperCleaning(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    if start_acc is None:
        start_acc = exp.evaluate("test")["acc"]
    curve = [(0.0, start_acc)]
    seconds = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        exp.meta_step(step)
        seconds += time.perf_counter() - t0
        if curve_every and step % curve_every == 0 and step != steps:
            curve.append((seconds, exp.evaluate("test")["acc"]))
    final = exp.evaluate("test")
    curve.append((seconds, final["acc"]))
    record = {"p": p, "estimator": estimator, "seed": seed, "test_acc": final["acc"],
              "clean_f1": final["clean_f1"], "seconds": seconds, "outer_steps": steps}
    return record, curve


def summarise(records: list[dict]) -> str:
    """Markdown table: mean ± std of test accuracy, clean F1 and seconds per (p, method)."""
    def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        m = statistics.fmean(values) * scale
        s = (statistics.stdev(values) * scale) if len(values) > 1 else 0.0
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    ps = sorted({r["p"] for r in records})
    methods = list(dict.fromkeys(r["estimator"] for r in records))
    lines = ["| p | method | test acc (%) | clean F1 | seconds | seeds |",
             "|---|---|---|---|---|---|"]
    for p in ps:
        for m in methods:
            rs = [r for r in records if r["p"] == p and r["estimator"] == m]
            if not rs:
                continue
            lines.append(f"| {p} | {m} | {fmt([r['test_acc'] for r in rs], 100)} | "
                         f"{fmt([r['clean_f1'] for r in rs], 1, 3)} | "
                         f"{fmt([r['seconds'] for r in rs], 1, 1)} | {len(rs)} |")
    return "\n".join(lines)


def check_targets(records: list[dict], p: float = 0.5, margin: float = 0.03) -> list[str]:
    """The issue's targets at ``p``: every estimator's mean test accuracy above the
    corrupted baseline's, and the best within ``margin`` of the oracle's."""
    def mean_acc(name: str) -> float:
        return statistics.fmean(r["test_acc"] for r in records
                                if r["p"] == p and r["estimator"] == name)

    names = [n for n in dict.fromkeys(r["estimator"] for r in records if r["p"] == p)
             if n not in ("corrupted", "oracle")]
    if not names:
        return []
    corrupted, oracle = mean_acc("corrupted"), mean_acc("oracle")
    lines = []
    for n in names:
        ok = mean_acc(n) > corrupted
        lines.append(f"{'PASS' if ok else 'FAIL'}: p={p} {n} {100 * mean_acc(n):.1f}% > "
                     f"corrupted {100 * corrupted:.1f}%")
    best = max(names, key=mean_acc)
    ok = mean_acc(best) >= oracle - margin
    lines.append(f"{'PASS' if ok else 'FAIL'}: p={p} best ({best}) {100 * mean_acc(best):.1f}% "
                 f"within {100 * margin:.0f} points of oracle {100 * oracle:.1f}%")
    return lines


def plot(curves: dict, baselines: dict, path: Path) -> None:
    """Test accuracy vs wall time per estimator (mean over seeds), one panel per p."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, len(ps), figsize=(5 * len(ps), 4), squeeze=False)
    for ax, p in zip(axes[0], ps):
        for (pp, est), runs in curves.items():
            if pp != p:
                continue
            n = min(len(c) for c in runs)
            t = [statistics.fmean(c[i][0] for c in runs) for i in range(n)]
            a = [100 * statistics.fmean(c[i][1] for c in runs) for i in range(n)]
            ax.plot(t, a, marker="o", ms=3, label=est)
        for name, style in (("corrupted", ":"), ("oracle", "--")):
            accs = [b[name]["test_acc"] for (pp, _), b in baselines.items() if pp == p]
            ax.axhline(100 * statistics.fmean(accs), color="k", ls=style, lw=1,
                       label=f"{name} baseline")
        ax.set_title(f"p = {p}")
        ax.set_xlabel("wall time of outer steps (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _save(path: Path, records: list[dict], curves: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": records,
                                "curves": {f"{p}/{e}": c for (p, e), c in curves.items()}},
                               indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--json", type=Path, help="write all records here")
    ap.add_argument("--plot", type=Path, help="write the accuracy-vs-time figure here")
    ap.add_argument("--ps", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATOR_NAMES),
                    choices=ESTIMATOR_NAMES)
    ap.add_argument("--steps", type=int, default=None, help="outer steps (all estimators)")
    ap.add_argument("--curve-every", type=int, default=5,
                    help="measure test accuracy every this many outer steps (0: only end)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--from-json", type=Path,
                    help="no runs: rebuild the table (and --plot) from a saved --json file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(summarise(saved["records"]))
        print("\n".join(check_targets(saved["records"])))
        if args.plot:
            curves = {(float(k.split("/")[0]), k.split("/")[1]): v
                      for k, v in saved["curves"].items()}
            base: dict = {}
            for r in saved["records"]:
                if r["estimator"] in ("corrupted", "oracle"):
                    base.setdefault((r["p"], r["seed"]), {})[r["estimator"]] = r
            plot(curves, base, args.plot)
        return 0

    overrides: dict = dict(BENCH_SETTINGS)
    if args.quick:
        args.ps, args.seeds = [0.5], [0]
        args.steps = args.steps or 3
        overrides.update(final_steps=100, inner_steps=5)
        METHOD_OPTIONS["linear_iters"] = 5
    records, curves, baselines = [], {}, {}
    for p in args.ps:
        for seed in args.seeds:
            base = baseline_metrics(HyperCleaningConfig(p=p, **overrides), seed)
            baselines[(p, seed)] = base
            for name, m in base.items():
                records.append({"p": p, "estimator": name, "seed": seed,
                                "test_acc": m["test_acc"], "clean_f1": m["clean_f1"],
                                "seconds": 0.0, "outer_steps": 0})
            start_acc = None
            for est in args.estimators:
                steps = args.steps or OUTER_STEPS[est]
                rec, curve = run_one(p, est, seed, steps, args.curve_every, overrides,
                                     start_acc)
                start_acc = curve[0][1]
                records.append(rec)
                curves.setdefault((p, est), []).append(curve)
                print(f"p={p} seed={seed} {est:12s} test_acc={rec['test_acc']:.4f} "
                      f"clean_f1={rec['clean_f1']:.3f} seconds={rec['seconds']:.1f}",
                      flush=True)
                if args.json:  # saved as we go, so an interrupted run keeps its records
                    _save(args.json, records, curves)
    print()
    print(summarise(records))
    if args.quick:
        print("(--quick: 3 outer steps; the targets below are meant for the full run)")
    print("\n".join(check_targets(records)))
    if args.json:
        _save(args.json, records, curves)
    if args.plot:
        plot(curves, baselines, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
