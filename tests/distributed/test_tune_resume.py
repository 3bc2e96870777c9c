"""A sweep killed mid-way (driver and running trial SIGKILLed) and rerun resumes.

Slow (two sweep CLI processes on one loopback-only Ray head, ~60–100 s on 2 cores):
run with ``-m slow``. Same hermetic setup as :mod:`test_tune`.
"""

from __future__ import annotations

import pytest
from test_tune import run_checks  # same directory (pytest puts it on sys.path)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks(["resume"], timeout=400)


def test_kill_lands_mid_sweep(checks):
    when = checks["resume_killed_when"]
    assert when is not None, checks["resume_first_output"]
    states = [when[k] for k in sorted(when)]
    assert states[0]["state"] == "finished"
    assert states[1]["state"] == "running" and 8 <= states[1]["step"] < 40


def test_rerun_restores_and_finishes_every_trial(checks):
    assert checks["resume_rc"] == 0, checks["resume_stderr"]
    assert "restoring" in checks["resume_output"]
    rows = checks["resume_rows"]
    assert len(rows) == 3 and all(r["state"] == "finished" and r["step"] == 40 for r in rows)


def test_finished_trial_not_rerun_and_killed_one_continued(checks):
    trials = checks["resume_trials"]
    first, second, third = (trials[k] for k in sorted(trials))
    assert first["metrics_unchanged"] and first["env_unchanged"]   # not touched again
    assert not second["metrics_unchanged"] and second["resumes"] >= 1  # continued
    assert all(t["equal_to_standalone"] for t in trials.values())  # exact resume
    assert third["status"]["state"] == "finished"
