"""Ray checks run by tests/distributed/test_ray.py in one subprocess (loopback only).

Usage: ``python ray_checks.py TEMP_DIR OUT_JSON``. Starts one Ray session with its
files under TEMP_DIR, runs every check (the runner-level ones are in
``runner_checks.py``), writes the measured numbers to OUT_JSON (the
test module asserts on them). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import ray
import runner_checks
import torch
from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.bilevel.pes import PES
from metaopt.bilevel.reference_problems import InfluenceBalancing
from metaopt.bilevel.truncation import ConstantLength
from metaopt.distributed import RayExecutor, WorkerError
from metaopt.distributed.loopback import init_loopback_ray
from metaopt.distributed.pes_pool import PESPool
from metaopt.distributed.sharding import learner_meta_gradient


class KillOnce:
    """An inner system whose first step anywhere SIGKILLs its own process, mid-truncation.

    The first process to create ``marker`` (O_EXCL: exactly one) kills itself inside
    ``step``; every later step (the restarted worker's replay included) runs normally.
    """

    def __init__(self, system: InfluenceBalancing, marker: str, at_step: int) -> None:
        self.system, self.marker, self.at_step, self.calls = system, marker, at_step, 0

    def init(self, phi, seeds):
        return self.system.init(phi, seeds)

    def step(self, phi, state, seeds, steps):
        self.calls += 1
        if self.calls == self.at_step:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.system.step(phi, state, seeds, steps)


def max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300))
               for k in b)


def maml_check(ex: RayExecutor, dtype: torch.dtype) -> float:
    """Sinusoid regression, 5 tasks, 2 inner steps: sharded vs one-process meta-gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    make = functools.partial(MAML, model, inner_lr=0.05, inner_steps=2, strategy="loop")
    learner = make()
    T = 5
    amp = torch.rand(T, 1, 1, dtype=dtype) + 0.5
    phase = torch.rand(T, 1, 1, dtype=dtype) * math.pi
    x = torch.rand(T, 20, 1, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x + phase)
    data = (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    learner.meta_loss(*data, nn.functional.mse_loss).backward()
    ref = {k: p.grad.clone() for k, p in learner.outer_parameters().items()}
    for p in learner.parameters():
        p.grad = None
    got = learner_meta_gradient(ex, make, learner.outer_parameters(), *data, nn.functional.mse_loss)
    return max_rel(got.grads, ref)


def pes_reference(steps: int) -> tuple[PES, InfluenceBalancing, dict, list]:
    system = InfluenceBalancing()
    est = PES(num_tasks=6, truncation=4, sigma=0.1, schedule=ConstantLength(7), seed=1)
    phi = {"theta": torch.tensor([0.5], dtype=torch.float64)}
    state, grads = None, []
    for _ in range(steps):
        hg = est(system, phi, None, state)
        state = hg.state
        grads.append(hg.grad["theta"])
    return est, system, phi, grads


def main() -> None:
    temp_dir, out_path = sys.argv[1], sys.argv[2]
    t0 = time.monotonic()
    # 4 logical CPUs: two 2-worker executors may be alive at once (only one computes).
    out: dict = {"node_ips": init_loopback_ray(temp_dir, num_cpus=4)}
    out["init_s"] = time.monotonic() - t0
    # Independently of init_loopback_ray's own check:
    out["driver_ip"] = ray.util.get_node_ip_address()
    assert all(ipaddress.ip_address(a).is_loopback for a in out["node_ips"]), out

    ex = RayExecutor(num_workers=2, cpus_per_worker=1, max_restarts=1, timeout_s=60)
    out["worker_pids"] = ex.pids()
    out["maml_rel_float64"] = maml_check(ex, torch.float64)
    out["maml_rel_float32"] = maml_check(ex, torch.float32)

    est, system, phi, ref = pes_reference(3)
    pool = PESPool(ex, est, system, phi, sync_every=2)
    got = [pool.step(phi).grad["theta"] for _ in range(3)]
    out["pes_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    out["pes_bytes_per_step"] = pool.bytes_per_step

    # Fault tolerance: kill worker 1 after the first step (its slots live only there
    # since the snapshot); steps 2 and 3 must rebuild it and match the reference.
    pool = PESPool(ex, est, system, phi, sync_every=10)
    got = [pool.step(phi).grad["theta"]]
    victim = ex.pids()[1]
    os.kill(victim, signal.SIGKILL)
    got += [pool.step(phi).grad["theta"] for _ in range(2)]
    out["killed_pid"] = victim
    out["pids_after_kill"] = ex.pids()
    out["kill_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    out["kill_steps"] = len(pool.bytes_per_step)
    out["kill_calls"] = pool.state.calls
    out["rebuilds"] = list(ex.rebuilds)

    # Restarts used up: a second kill of the same worker is a clear error.
    os.kill(ex.pids()[1], signal.SIGKILL)
    try:
        pool.step(phi)
        out["second_kill"] = "no error"
    except WorkerError as e:
        out["second_kill"] = str(e)

    # A hung worker: bounded wait, clear error.
    ex.timeout_s = 1.0
    t1 = time.monotonic()
    try:
        ex.map(time.sleep, [4.0])
        out["timeout"] = "no error"
    except WorkerError as e:
        out["timeout"] = str(e)
    out["timeout_wait_s"] = time.monotonic() - t1
    ex.shutdown()

    # GPU workers on a cluster without GPUs: refused at once, not left pending.
    t1 = time.monotonic()
    try:
        RayExecutor(num_workers=2, gpus_per_worker=1, timeout_s=60)
        out["no_gpu"] = "no error"
    except WorkerError as e:
        out["no_gpu"] = str(e)
    out["no_gpu_wait_s"] = time.monotonic() - t1

    # A worker killed in the middle of a truncation (inside an inner step of the
    # second outer step), on a fresh pair of workers.
    # max_restarts=3: this pair also serves the staleness kills and the runner checks.
    ex = RayExecutor(num_workers=2, cpus_per_worker=1, max_restarts=3, timeout_s=60)
    killer = KillOnce(system, os.path.join(temp_dir, "killed"), at_step=4 + 2)
    pool = PESPool(ex, est, killer, phi, sync_every=10)
    got = [pool.step(phi).grad["theta"] for _ in range(3)]
    out["midstep_killed"] = os.path.exists(killer.marker)
    out["midstep_rebuilds"] = list(ex.rebuilds)
    out["midstep_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(got, ref))

    # Bounded staleness (s = 1) under faults: a worker killed between steps while a
    # truncation is queued on it, and one killed inside a queued truncation.
    out.update(runner_checks.stale_pool_kill(ex, lambda pid: os.kill(pid, signal.SIGKILL)))
    from test_staleness import STEPS, run_pool, setup, stale_reference

    stale_ref, _ = stale_reference(1)
    est1, system1, phi1 = setup()
    before = len(ex.rebuilds)
    killer = KillOnce(system1, os.path.join(temp_dir, "killed-stale"), at_step=3 * 3 + 1)
    stale_got, _ = run_pool(PESPool(ex, est1, killer, phi1, sync_every=3, max_staleness=1),
                            phi1, STEPS)
    out["stale_midstep_killed"] = os.path.exists(killer.marker)
    out["stale_midstep_rebuilds"] = ex.rebuilds[before:]
    out["stale_midstep_max_abs"] = max(float((a - b).abs().max())
                                       for a, b in zip(stale_got, stale_ref))
    out["pes_s"] = time.monotonic() - t0

    # The executor: switch through the runner loop (run directories under temp_dir);
    # runs after the first reuse this executor's (restarted, healthy) workers.
    root = Path(temp_dir) / "runs"
    root.mkdir()
    out.update(runner_checks.sinusoid_switch(root, ex))
    out["sinusoid_s"] = time.monotonic() - t0
    out.update(runner_checks.lopt_switch_and_resume(root, ex))
    ex.shutdown()
    out["total_s"] = time.monotonic() - t0
    with open(out_path, "w") as f:
        json.dump(out, f)
    ray.shutdown()


if __name__ == "__main__":
    main()
