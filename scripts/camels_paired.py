"""Paired per-stream comparison of one weighting against the others, from results files
that ``scripts/camels_results.py`` wrote.

    python scripts/camels_paired.py results/camels/results.json [MORE.json ...]
        [--method camels] [--against uniform tfidf salient oracle] [--section long|short]
        [--json PATH]

Every test stream is streamed with every weighting, so per stream the difference
``F1(method) − F1(baseline)`` cancels the stream's own difficulty. For each results file
and baseline this prints: the mean difference, its standard deviation over streams and
standard error, the paired t statistic, the streams won / tied / lost, and the exact
two-sided sign-test p-value (ties dropped) — whether a mean gain is a gain on most
streams or the work of one. Reads committed JSON only; nothing is re-run.
"""

from __future__ import annotations

import argparse
import json
import math
from math import comb
from pathlib import Path
from statistics import fmean, stdev

from metaopt.fileio import atomic_write_text

BASELINES = ("uniform", "tfidf", "salient", "oracle")


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign-test p-value for ``wins`` against ``losses``."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(runs: dict[str, list[dict]], method: str, baseline: str,
           tie: float = 1e-12) -> dict[str, float]:
    """Per-stream F1 differences of ``method`` over ``baseline`` and their summary."""
    for name in (method, baseline):
        if name not in runs:
            raise KeyError(f"no test runs for weighting '{name}' (have {sorted(runs)})")
    diffs = [a["f1"] - b["f1"] for a, b in zip(runs[method], runs[baseline], strict=True)]
    wins = sum(d > tie for d in diffs)
    losses = sum(d < -tie for d in diffs)
    mean = fmean(diffs)
    sd = stdev(diffs) if len(diffs) > 1 else 0.0
    se = sd / math.sqrt(len(diffs))
    return {"streams": len(diffs), "mean": mean, "std": sd, "stderr": se,
            "t": mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0),
            "wins": wins, "ties": len(diffs) - wins - losses, "losses": losses,
            "sign_test_p": sign_test_p(wins, losses), "diffs": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="results.json files of camels_results.py")
    ap.add_argument("--method", default="camels")
    ap.add_argument("--against", nargs="+", default=list(BASELINES))
    ap.add_argument("--section", default="long", choices=("long", "short"))
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    print(f"| results | {args.method} − | mean ± std (stderr) | t | won / tied / lost | "
          "sign-test p |")
    print("|---|---|---|---|---|---|")
    for path in args.results:
        data = json.loads(Path(path).read_text())
        if args.section not in data:
            raise SystemExit(f"{path}: no '{args.section}' section (has {sorted(data)})")
        runs = data[args.section]["test_runs"]
        out[path] = {}
        for baseline in args.against:
            r = paired(runs, args.method, baseline)
            out[path][baseline] = r
            print(f"| {path} | {baseline} | {r['mean']:+.4f} ± {r['std']:.4f} "
                  f"({r['stderr']:.4f}) | {r['t']:.1f} | {r['wins']} / {r['ties']} / "
                  f"{r['losses']} | {r['sign_test_p']:.3f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"method": args.method,
                                                 "section": args.section,
                                                 "results": out}, indent=1))


if __name__ == "__main__":
    main()
