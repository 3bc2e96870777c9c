"""Meta-training throughput: PES on small_fc_lopt, batched rows vs a per-row loop.

    python scripts/bench_lopt_metatrain.py [--tasks 1,8,32] [--outer-steps 3] [--threads 2]
                                           [--paths kernels,reference,loop] [--json PATH]

The reference workload of the "meta-training learned optimizers" issue: small_fc_lopt
(``AdafacMLPLOpt`` defaults) meta-trained with PES — truncation 50, σ = 0.01, episode
lengths log-uniform in [100, 1000] — on the teacher task (MLP 64→32→10 ReLU, softmax
cross-entropy, 8×8×1 N(0,1) inputs labelled by a fixed random linear teacher, batch
128). One outer step runs ``2 · tasks · 50`` inner steps (both particles of every
task); inner-steps/s counts them all, as learned_optimization's figure (~1,800/s at 8
tasks on this 2-core CPU, after ~20 s of jit compilation) does. One warm-up outer step
(no compilation here; it fills caches), then the mean over ``--outer-steps``. Each row
also gives the process CPU time per outer step (all threads): on a shared machine the
wall clock counts the time other processes held the cores, the CPU time does not (with
one thread it is the single-core throughput; with more it includes threads' waiting).

Paths: ``kernels`` — rows batched, the optimizer step through the fused CPU kernels
(``LearnedOptimizerSystem(backend="cpu_kernels")``, the task gradient vmapped);
``reference`` — everything vmapped through the pure reference step; ``loop`` — the
per-row Python loop over the reference step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metaopt.algorithms.lopt_training import LearnedOptimizerSystem, meta_parameters
from metaopt.bilevel import PES, LogUniformLength
from metaopt.lopt import SmallFCLOpt
from tasks.lopt_tasks import teacher_task

TRUNCATION = 50


PATHS = {"kernels": (True, "cpu_kernels"), "reference": (True, "reference"),
         "loop": (False, "reference")}


def measure(num_tasks: int, path: str, outer_steps: int) -> dict:
    lopt, task = SmallFCLOpt(), teacher_task()
    phi = meta_parameters(lopt)
    batched, backend = PATHS[path]
    system = LearnedOptimizerSystem(lopt, task, num_steps=1000, batched=batched,
                                    backend=backend)
    est = PES(num_tasks=num_tasks, truncation=TRUNCATION, sigma=0.01,
              schedule=LogUniformLength(100, 1000))
    t0 = time.perf_counter()
    hg = est(system, phi, None, None)
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(outer_steps):
        hg = est(system, phi, None, hg.state)
    per_outer = (time.perf_counter() - t0) / outer_steps
    cpu_per_outer = (time.process_time() - c0) / outer_steps
    inner = 2 * num_tasks * TRUNCATION
    return {"tasks": num_tasks, "path": path,
            "s_per_outer_step": round(per_outer, 4), "first_outer_step_s": round(first, 3),
            "inner_steps_per_s": round(inner / per_outer, 1),
            "cpu_s_per_outer_step": round(cpu_per_outer, 4),
            "inner_steps_per_cpu_s": round(inner / cpu_per_outer, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="1,8,32")
    ap.add_argument("--outer-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="kernels,reference,loop",
                    help=f"comma-separated, of {sorted(PATHS)}")
    ap.add_argument("--json", help="write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in [int(x) for x in args.tasks.split(",")]:
        for path in args.paths.split(","):
            if path not in PATHS:
                ap.error(f"--paths: unknown path {path!r}; expected one of {sorted(PATHS)}")
            row = measure(n, path, args.outer_steps)
            rows.append(row)
            print(f"{row['tasks']:>3} tasks  {row['path']:<13} {row['s_per_outer_step']:.3f} "
                  f"s/outer step  {row['inner_steps_per_s']:>8.0f} inner steps/s  "
                  f"(process CPU {row['cpu_s_per_outer_step']:.3f} s/outer step, "
                  f"{row['inner_steps_per_cpu_s']:.0f} inner steps per CPU-s)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
