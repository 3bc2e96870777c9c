"""Ray executor, sharding, PES pool and fault tolerance on a real (loopback-only) Ray.

All Ray work runs in ONE subprocess (``ray_checks.py``) started inside a network
namespace that has only ``lo`` (``unshare --net``), with ``RAY_AUTH_MODE=disabled``
and Ray's session files under a short temporary directory this module owns and
removes; the tests assert on the numbers it reports. Skipped without ``ray`` or
without the right to create a network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from metaopt.distributed.loopback import can_unshare, loopback_env, netns_command

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ray_checks.py")


@pytest.fixture(scope="module")
def checks() -> dict:
    if not can_unshare():
        pytest.skip("needs 'unshare --net' (root) to keep Ray on loopback")
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
    try:
        out = os.path.join(temp, "out.json")
        proc = subprocess.run(netns_command([sys.executable, str(SCRIPT), temp, out]),
                              env=loopback_env(os.environ, str(ROOT)), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not os.path.exists(out):
            pytest.fail(f"ray_checks.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_stays_on_loopback(checks):
    addresses = [*checks["node_ips"], checks["driver_ip"]]
    assert addresses and all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8")
                             for a in addresses)


def test_two_workers_are_two_processes(checks):
    assert len(set(checks["worker_pids"])) == 2


def test_sharded_maml_meta_gradient_equals_one_process(checks):
    # The mean-gradient of N tasks is sum_i (n_i / N) grad_i over the slices: equal up
    # to one rounding per slice weight.
    assert checks["maml_rel_float64"] <= 1e-13
    assert checks["maml_rel_float32"] <= 1e-6


def test_pes_pool_equals_in_process_pes(checks):
    # Same rows, same seeds: bitwise the in-process estimate over 3 outer steps.
    assert checks["pes_max_abs"] == 0.0
    sent = [r["sent"] for r in checks["pes_bytes_per_step"]]
    # phi (1 float64) + an 8-byte seed + an 8-byte index to each of 2 workers.
    assert sent == [2 * (8 + 8 + 8)] * 3


def test_killed_worker_is_rebuilt_and_results_are_identical(checks):
    assert checks["killed_pid"] not in checks["pids_after_kill"]
    assert checks["rebuilds"] == [1]          # only the killed worker, once
    assert checks["kill_max_abs"] == 0.0      # no step lost or counted twice
    assert checks["kill_steps"] == checks["kill_calls"] == 3


def test_worker_killed_inside_a_step_is_rebuilt(checks):
    assert checks["midstep_killed"]
    assert len(checks["midstep_rebuilds"]) == 1
    assert checks["midstep_max_abs"] == 0.0


def test_restarts_used_up_and_hung_worker_give_clear_errors(checks):
    assert "no restarts left (max_restarts=1)" in checks["second_kill"]
    assert "within timeout_s=1.0" in checks["timeout"]
    assert checks["timeout_wait_s"] < 3.0


def test_stale_pool_survives_killed_workers(checks):
    # s = 1: the killed worker had a truncation queued; rebuilt once, then the stale
    # schedule's estimates are bitwise the in-process reference's.
    assert checks["stale_kill_rebuilds"] == [1]
    assert checks["stale_kill_max_abs"] == 0.0
    assert checks["stale_midstep_killed"]
    assert len(checks["stale_midstep_rebuilds"]) == 1
    assert checks["stale_midstep_max_abs"] == 0.0


def test_executor_switch_gives_the_local_run(checks):
    # Same config, `executor: {kind: ray, num_workers: 2}` vs none: the sharded
    # meta-gradient is the batch mean up to one rounding per slice weight.
    assert checks["sinusoid_float64_state_rel"] <= 1e-12
    assert checks["sinusoid_float64_metric_rel"] <= 1e-12
    assert checks["sinusoid_float32_state_rel"] <= 1e-6
    assert checks["sinusoid_float32_metric_rel"] <= 1e-6
    assert checks["sinusoid_float64_records"] == [4, 4]  # 3 train steps + 1 evaluation
    # PES through the pool: bitwise, metrics.jsonl included.
    assert checks["lopt_ray_equal"] and checks["lopt_ray_metrics_equal"]


def test_interrupted_ray_run_resumes_to_the_uninterrupted_state(checks):
    assert checks["interrupted"] == ["interrupted", 2]
    assert checks["resumed"] == ["finished", 4]
    assert checks["lopt_stale_resume_equal"] and checks["lopt_stale_metrics_equal"]
    assert checks["lopt_stale_differs_from_plain"]


def test_gpu_workers_without_gpus_are_refused_at_once(checks):
    assert "workers need 2 GPUs, the Ray cluster has 0" in checks["no_gpu"]
    assert checks["no_gpu_wait_s"] < 5.0
