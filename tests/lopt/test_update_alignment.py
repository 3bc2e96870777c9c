"""The update-alignment diagnostic: its cosines are those of the step actually taken
(plain SGD's update is exactly −lr·g: cos(Δ, −g) = 1), and the script writes windows."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tasks.lopt_tasks import heldout_suite
from tests.script_module import load_script


def test_cosines_measure_the_step_taken(monkeypatch):
    script = load_script("lopt_update_alignment")
    task = heldout_suite("mlp_mup_heldout", widths=[16])[0]

    def sgd_stepper(spec, task, theta, steps):
        return lambda grads, params, loss: {k: params[k] - 0.1 * grads[k] for k in params}

    monkeypatch.setattr(script, "make_stepper", sgd_stepper)
    rows = script.alignment("sgd", task, 6, 3, seed=0, index=0)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert r["cos_neg_grad"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= r["cos_params"] <= 1.0 and r["param_norm"] > 0


def test_script_runs_a_learned_optimizer_and_adamw(tmp_path, monkeypatch):
    script = load_script("lopt_update_alignment")
    out = tmp_path / "a.json"
    monkeypatch.setattr(sys, "argv", [
        "lopt_update_alignment.py", "--opt", "mulo-small-fc-w128", "--opt", "adamw:0.01",
        "--suite", "mlp_mup_heldout", "--task", "0", "--width", "16", "--steps", "5",
        "--window", "2", "--json", str(out)])
    script.main()
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"mulo-small-fc-w128", "adamw:0.01"}
    for rows in data["rows"].values():
        assert [r["step"] for r in rows] == [2, 4, 5]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    monkeypatch.setattr(sys, "argv", ["lopt_update_alignment.py", "--task", "99"])
    with pytest.raises(SystemExit):
        script.main()
