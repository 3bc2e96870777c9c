"""Population-based training: an exploit restores the donor's runner state, applies the
mutated settings, and the run continues exactly as the runner would from there.

Slow (PBT pauses and restarts every trial at each perturbation; ~40–60 s on 2 busy
cores): run with ``-m slow``. Same hermetic setup as :mod:`test_tune`.
"""

from __future__ import annotations

import math

import pytest
from test_tune import run_checks  # same directory (pytest puts it on sys.path)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks(["pbt"], timeout=300)


def test_pbt_exploits_copy_the_donor_state_and_apply_the_mutation(checks):
    exploits = checks["pbt_exploits"]
    assert len(exploits) >= 1
    assert any(name.startswith("pbt_policy_") for name in checks["pbt_tune_logs"])
    for e in exploits:
        assert e["donor"] != e["trial"] and e["step"] == 4
        assert e["same_state_as_donor"] is True    # tensors equal to the donor's step-4 state
        assert e["mutated"] and all(e["applied"].values())
        assert set(e["mutated"]) <= {"settings.outer_lr", "settings.inner_lr"}
        assert all(c["donor"] != c["new"] for c in e["mutated"].values())
        # the runner alone, from the adopted checkpoint with the mutated config,
        # reproduces the trial's records after the exploit: the new value was used
        assert e["replay_equal"] and e["replay_records"] == 5
        assert e["resumes_in_env"] >= 1            # env.json records the config change


def test_pbt_trials_finish(checks):
    rows = checks["pbt_rows"]
    assert len(rows) == 2 and all(r["state"] == "finished" and r["step"] == 8 for r in rows)
    assert all(math.isfinite(r["val_mse_k5_step1"]) for r in rows)
