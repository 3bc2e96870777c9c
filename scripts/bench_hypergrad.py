"""Hypergradient estimators on ridge regression: accuracy, time and memory.

For d ∈ {100, 1000, 10000} and each estimator, the number of inner steps K is doubled
until the estimator reaches its accuracy target against the closed-form hypergradient
(IFT: 1e-5, unrolled family and F2SA: 1e-3), and the first K that does is reported.
A second set of records compares plain and checkpointed unrolling at K = 1000.

Each (d, estimator) runs in a fresh process so that ``peak_mem_mb`` — the rise of the
process's peak resident memory over its level once the problem is built and a 2-step
warm-up has run — belongs to that estimator alone. Small values (a few MB) are at the
resolution of this measurement.

    python scripts/bench_hypergrad.py [--quick] [--json PATH] [--dims 100 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ESTIMATORS = {
    # name: (accuracy target or None for a single run at K_fixed)
    "unrolled": 1e-3,
    "unrolled_checkpointed": 1e-3,
    "truncated_unrolled": 1e-3,
    "ift_cg": 1e-5,
    "ift_neumann": 1e-5,
    "f2sa": 1e-3,
    "first_order": None,
}
K_GRID = [25, 50, 100, 200, 400, 800, 1600, 3200, 6400]
N_SAMPLES = 500  # training and validation points; d > n makes the large cases over-parameterised


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _estimator(name: str, K: int):
    from metaopt.bilevel import F2SA, FirstOrder, Implicit, Unrolled

    segment = max(1, round(K**0.5))
    return {
        "unrolled": lambda: Unrolled(),
        "unrolled_checkpointed": lambda: Unrolled(checkpoint_segment=segment),
        "truncated_unrolled": lambda: Unrolled(truncate=max(1, K // 4)),
        "ift_cg": lambda: Implicit(solver="cg", max_iter=1000, tol=1e-8, warn=False),
        "ift_neumann": lambda: Implicit(solver="neumann", max_iter=1000, warn=False),
        "f2sa": lambda: F2SA(lam_init=1e4, lam_max=1e4),
        "first_order": lambda: FirstOrder(),
    }[name]()


def _rel_error(grad, exact) -> float:
    return float((grad["penalty"] - exact["penalty"]).norm() / exact["penalty"].norm())


def run_one(d: int, estimator: str, fixed_k: int | None) -> dict:
    """Worker: sweep K for one (d, estimator) in this process and return its record."""
    import torch

    from metaopt.bilevel import BilevelProblem
    from metaopt.bilevel.reference_problems import ridge_problem

    torch.manual_seed(0)
    ref = ridge_problem(d=d, n_train=N_SAMPLES, n_val=N_SAMPLES, per_feature=True,
                        penalty=0.05, inner_steps=1)
    exact = ref.exact_hypergradient(ref.phi)
    target = None if fixed_k else ESTIMATORS[estimator]
    ks = [fixed_k] if fixed_k else ([100] if target is None else K_GRID)
    # Warm up autograd and the allocator on a tiny run, then take the resident level.
    warm = BilevelProblem(ref.problem.inner_loss, ref.problem.outer_loss,
                          ref.problem.inner_optimizer, 2, name="ridge")
    _estimator(estimator, 2)(warm, ref.phi, ref.theta0)
    baseline = _rss_mb()
    record = {}
    for K in ks:
        problem = BilevelProblem(ref.problem.inner_loss, ref.problem.outer_loss,
                                 ref.problem.inner_optimizer, K, name="ridge")
        est = _estimator(estimator, K)
        start = time.perf_counter()
        hg = est(problem, ref.phi, ref.theta0)
        seconds = time.perf_counter() - start
        err = _rel_error(hg.grad, exact)
        record = {"problem": "ridge", "d": d, "estimator": estimator, "rel_error": err,
                  "seconds": seconds, "peak_mem_mb": max(0.0, _peak_mb() - baseline),
                  "inner_steps": K, "target": target, "reached_target":
                  None if target is None else err <= target}
        if fixed_k:
            record["grad"] = hg.grad["penalty"].tolist()
        if target is not None and err <= target:
            break
    return record


def _note(r: dict, not_met: str) -> str:
    """Whether a record met its accuracy target, or its memory/agreement vs plain unrolling."""
    if "memory_ratio_vs_plain" in r:
        return (f"memory {r['memory_ratio_vs_plain']:.2f}× plain, "
                f"max rel. diff {r['agreement_vs_plain']:.1e}")
    if r.get("target") is not None:
        return f"target {r['target']:.0e} " + ("met" if r["reached_target"] else not_met)
    return ""


def markdown_table(records: list[dict]) -> str:
    """The records as a README table."""
    rows = ["| d | estimator | K | rel. error | seconds | peak mem (MB) | note |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        note = _note(r, not_met="**not met**")
        rows.append(f"| {r['d']} | {r['estimator']} | {r['inner_steps']} | {r['rel_error']:.1e} "
                    f"| {r['seconds']:.2f} | {r['peak_mem_mb']:.1f} | {note} |")
    return "\n".join(rows)


def _spawn(d: int, estimator: str, fixed_k: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(d), estimator]
    if fixed_k:
        cmd += ["--fixed-k", str(fixed_k)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 100 and 1000 only")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--json", type=Path, default=None,
                        help="write records here (rewritten after every record)")
    parser.add_argument("--estimators", nargs="+", default=None, choices=list(ESTIMATORS),
                        help="only these estimators (default: all)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="print the markdown table of an earlier run's records and exit")
    parser.add_argument("--worker", nargs=2, metavar=("D", "ESTIMATOR"), help=argparse.SUPPRESS)
    parser.add_argument("--fixed-k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(int(args.worker[0]), args.worker[1], args.fixed_k)))
        return []
    if args.from_json:
        records = json.loads(args.from_json.read_text())
        print(markdown_table(records))
        return records

    from tqdm.auto import tqdm

    dims = args.dims or ([100, 1000] if args.quick else [100, 1000, 10000])
    chosen = args.estimators or list(ESTIMATORS)
    # Checkpointed vs plain unrolling at K = 1000 first: agreement and memory ratio.
    jobs = [(d, e, 1000) for d in dims for e in ("unrolled", "unrolled_checkpointed")]
    jobs += [(d, e, None) for d in dims for e in chosen]
    records: list[dict] = []
    for d, est, k in tqdm(jobs, desc="bench_hypergrad"):
        rec = _spawn(d, est, k)
        if k:
            rec["estimator"] = f"{est}@K=1000"
        if est == "unrolled_checkpointed" and k:
            plain = next(r for r in records
                         if r["d"] == d and r["estimator"] == "unrolled@K=1000")
            a, b = plain.pop("grad"), rec.pop("grad")
            diff = max(abs(x - y) for x, y in zip(a, b)) / max(max(abs(x) for x in a), 1e-300)
            rec["agreement_vs_plain"] = diff
            rec["memory_ratio_vs_plain"] = rec["peak_mem_mb"] / max(plain["peak_mem_mb"], 1e-9)
        records.append(rec)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(records, indent=2))

    header = (f"{'d':>6} {'estimator':<28} {'K':>5} {'rel_error':>10} {'seconds':>8} "
              f"{'peak_mem_mb':>11}  note")
    print(header)
    print("-" * len(header))
    for r in records:
        note = _note(r, not_met="NOT met")
        print(f"{r['d']:>6} {r['estimator']:<28} {r['inner_steps']:>5} {r['rel_error']:>10.2e} "
              f"{r['seconds']:>8.3f} {r['peak_mem_mb']:>11.1f}  {note}")
    for d in dims:
        cg = next((r for r in records if r["d"] == d and r["estimator"] == "ift_cg"), None)
        un = next((r for r in records if r["d"] == d and r["estimator"] == "unrolled"), None)
        if cg and un:
            print(f"d={d}: IFT-CG to 1e-5 in {cg['seconds']:.3f}s vs unrolled to 1e-3 in "
                  f"{un['seconds']:.3f}s ({un['seconds'] / cg['seconds']:.1f}x)")
    return records


if __name__ == "__main__":
    main()
