"""Ray Tune grid sweeps on a real, loopback-only Ray (PBT and kill/resume: the slow
``test_tune_pbt.py`` and ``test_tune_resume.py``, which reuse :func:`run_checks`).

All Ray work runs in ONE subprocess (``tune_checks.py grid``) started inside a
network namespace that has only ``lo`` (``unshare --net``), with
``RAY_AUTH_MODE=disabled``, ``HOME`` pointing at a directory this module owns, and
Ray's session files under a short temporary directory it removes afterwards; the
tests assert on what that subprocess measured. Skipped without ``ray`` or without
the right to create a network namespace.
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

pytest.importorskip("ray.tune", exc_type=ImportError)  # also: tune extra missing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tune_checks.py")


def run_checks(parts: list[str], timeout: float) -> dict:
    """Run ``tune_checks.py`` on ``parts`` in its own namespace and temp dirs."""
    if not can_unshare():
        pytest.skip("needs 'unshare --net' (root) to keep Ray on loopback")
    temp = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
    try:
        work, home = os.path.join(temp, "w"), os.path.join(temp, "h")
        os.makedirs(work)
        os.makedirs(home)
        out = os.path.join(temp, "out.json")
        env = {**loopback_env(os.environ, str(ROOT)), "HOME": home}
        proc = subprocess.run(
            netns_command([sys.executable, str(SCRIPT), os.path.join(temp, "r"), work, out,
                           *parts]),
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            pytest.fail(f"tune_checks.py failed (rc {proc.returncode}):\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            result = json.load(f)
        result["home_files"] = os.listdir(home)
        return result
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks(["grid"], timeout=240)


def test_ray_stays_on_loopback_and_writes_nothing_in_home(checks):
    addresses = [*checks["node_ips"], checks["driver_ip"]]
    assert addresses and all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8")
                             for a in addresses)
    assert checks["home_files"] == [] and not checks["home_ray_results"]


def test_grid_trials_are_runner_run_dirs(checks):
    assert sorted(r["params"]["settings.inner_lr"] for r in checks["grid_rows"]) == [0.01, 0.03]
    for t in checks["grid_trials"]:
        assert {"config.yaml", "env.json", "status.json", "metrics.jsonl",
                "checkpoints"} <= set(t["files"])
        assert t["status"] == {"state": "finished", "step": 12, "steps": 12}
        assert t["inner_lr"] == t["row_inner_lr"]  # config.yaml holds the trial's value
        # 12 train records + evaluations at 4, 8, 12
        assert t["n_records"] == 15 and t["checkpoint_step"] == 12


def test_grid_trial_equals_the_runner_alone(checks):
    # Same config, same seed: every train loss and evaluation bit-identical to a plain
    # `train` of the trial's config.yaml (the sweep runs the runner's own loop, resumed
    # at each report — the runner's exact resume).
    assert all(t["equal_to_standalone"] for t in checks["grid_trials"])
    for t in checks["grid_trials"]:
        # what Tune got == metrics.jsonl == the checkpoint re-loaded and re-evaluated
        assert t["reported"] == t["final_eval"] == t["reload_eval"]


def test_grid_run_dirs_work_with_the_plain_cli(checks):
    assert checks["grid_cli_eval_rc"] == 0
    assert checks["grid_cli_resume_rc"] == 0   # `metaopt resume DIR steps=16`
    assert checks["grid_cli_resume_status"] == {"state": "finished", "step": 16, "steps": 16}


def test_grid_summary_names_the_best_trial(checks):
    rows, best = checks["grid_rows"], checks["grid_best"]
    assert best["val_mse_k5_step1"] == min(r["val_mse_k5_step1"] for r in rows)
    assert checks["grid_summary_file"]
    assert f"best: {best['trial']}" in checks["grid_output"]
    assert best["run_dir"] in checks["grid_output"]
    table = [line for line in checks["grid_output"].splitlines() if "  finished  " in line]
    assert len(table) == 2
