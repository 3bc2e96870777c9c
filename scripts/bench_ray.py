"""Ray scaling on this machine: meta-steps per second with 1 vs 2 Ray workers.

    python scripts/bench_ray.py [--json PATH] [--steps N] [--quick]

Workloads: ``pes`` — a :class:`~metaopt.distributed.pes_pool.PESPool` over a
compute-bound InfluenceBalancing system (a 400-dimensional dense chain, 128 tasks
× 2 particles — a (256, 400) × (400, 400) product per inner step — truncations of 50
steps); ``pes_stale`` — the same pool on 2 workers with ``max_staleness=1`` (the next
truncation is queued before the previous estimate is formed, so the driver's work
and the round trip overlap the workers'; speedup against ``pes`` on 1 worker);
``maml`` — a MAML meta-batch (sinusoid regression, 16 tasks, 1-64-64-1 MLP, 5 inner
steps) sharded with
:func:`~metaopt.distributed.sharding.learner_meta_gradient`. Each runs ``--steps``
timed meta-steps after one warm-up step, on 1 and on 2 workers (one CPU each), and
records ``{workload, workers, steps_per_s, speedup, bytes_per_step}`` (bytes: the
tensor payload sent to and received from the workers per step; speedup: against 1
worker). ``rtt_s`` is the round trip of an empty call on every worker (Ray's
per-step overhead), for the scaling estimate in the README; ``worker_cores_used`` is
the CPU seconds the workers got per wall second (on a loaded machine, below the
worker count: the speed-up is then limited by the cores the scheduler gave).

Ray runs on loopback only: the script re-runs itself inside a network namespace
with only ``lo`` (``unshare --net``, needs root) with Ray's files in a temporary
directory it removes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from metaopt.algorithms.maml import MAML  # noqa: E402
from metaopt.bilevel.pes import PES  # noqa: E402
from metaopt.bilevel.reference_problems import InfluenceBalancing  # noqa: E402
from metaopt.bilevel.truncation import ConstantLength  # noqa: E402
from metaopt.distributed import RayExecutor  # noqa: E402
from metaopt.distributed.loopback import (  # noqa: E402
    can_unshare,
    init_loopback_ray,
    loopback_env,
    netns_command,
)
from metaopt.distributed.pes_pool import PESPool  # noqa: E402
from metaopt.distributed.sharding import learner_meta_gradient  # noqa: E402


def _noop(store: dict, arg: object) -> None:
    return None


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_pes(ex: RayExecutor, steps: int, tasks: int, staleness: int = 0
              ) -> tuple[float, float]:
    system = InfluenceBalancing(n=400, num_positive=200)
    est = PES(num_tasks=tasks, truncation=50, sigma=0.01, schedule=ConstantLength(200), seed=0)
    phi = {"theta": torch.tensor([0.1], dtype=torch.float64)}
    pool = PESPool(ex, est, system, phi, sync_every=steps + 10, max_staleness=staleness)
    pool.step(phi)
    t0 = time.perf_counter()
    for _ in range(steps):
        pool.step(phi)
    rate = steps / (time.perf_counter() - t0)
    per = pool.bytes_per_step[1:]
    return rate, sum(r["sent"] + r["received"] for r in per) / len(per)


def sinusoid_batch(tasks: int, shots: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(tasks, 2 * shots, 1, generator=g) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=g) * math.pi
    y = amp * torch.sin(x + phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def bench_maml(ex: RayExecutor, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    make = functools.partial(MAML, model, inner_lr=0.01, inner_steps=5, strategy="loop")
    phi = make().outer_parameters()
    data = sinusoid_batch(16, 20)
    learner_meta_gradient(ex, make, phi, *data, nn.functional.mse_loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        learner_meta_gradient(ex, make, phi, *data, nn.functional.mse_loss)
    rate = steps / (time.perf_counter() - t0)
    per_worker_phi = _nbytes(phi.values())
    # phi to each worker and back as its slice's gradient, every task tensor once.
    return rate, 2 * ex.num_workers * per_worker_phi + _nbytes(data)


def inside(args: argparse.Namespace) -> list[dict]:
    init_loopback_ray(args.inside, num_cpus=2)
    records = []
    pes_base = None
    for workload in args.workloads.split(","):
        base = pes_base if workload == "pes_stale" else None
        for workers in ((2,) if workload == "pes_stale" else (1, 2)):
            ex = RayExecutor(num_workers=workers, cpus_per_worker=1, timeout_s=300)
            ex.call_each(_noop, [None] * workers, init=True)
            t0 = time.perf_counter()
            for _ in range(20):
                ex.call_each(_noop, [None] * workers, init=True)
            rtt = (time.perf_counter() - t0) / 20
            pids = ex.pids()
            cpu0, wall0 = _cpu_seconds(pids), time.perf_counter()
            if workload in ("pes", "pes_stale"):
                rate, nbytes = bench_pes(ex, args.steps, 16 if args.quick else 128,
                                         staleness=1 if workload == "pes_stale" else 0)
            else:
                rate, nbytes = bench_maml(ex, args.steps)
            # CPU seconds the workers got per wall second (2.0: both ran flat out).
            cores = (_cpu_seconds(pids) - cpu0) / (time.perf_counter() - wall0)
            ex.shutdown()
            base = rate if base is None else base
            if workload == "pes" and workers == 1:
                pes_base = rate
            records.append({"workload": workload, "workers": workers,
                            "steps_per_s": round(rate, 4), "speedup": round(rate / base, 3),
                            "bytes_per_step": int(nbytes), "rtt_s": round(rtt, 5),
                            "worker_cores_used": round(cores, 2)})
            print(f"{workload:9s} workers={workers} steps/s={rate:8.3f} "
                  f"speedup={rate / base:5.2f} bytes/step={int(nbytes):9d} "
                  f"rtt={rtt * 1e3:6.2f} ms cores={cores:4.2f}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--steps", type=int, default=10, help="timed meta-steps per run")
    parser.add_argument("--quick", action="store_true", help="fewer PES tasks")
    parser.add_argument("--workloads", default="pes,pes_stale,maml",
                        help="comma-separated")
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # the re-run in the netns
    args = parser.parse_args(argv)
    if args.inside:
        records = inside(args)
        if args.json:
            args.json.write_text(json.dumps(records, indent=2) + "\n")
        return 0
    if not can_unshare():
        print("bench_ray.py needs 'unshare --net' (root) to keep Ray on loopback",
              file=sys.stderr)
        return 2
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
               "--workloads", args.workloads,
               "--inside", temp]
        if args.quick:
            cmd.append("--quick")
        if args.json:
            cmd += ["--json", str(args.json.resolve())]
        return subprocess.run(netns_command(cmd), env=loopback_env(os.environ, str(ROOT)),
                              cwd=ROOT).returncode
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
