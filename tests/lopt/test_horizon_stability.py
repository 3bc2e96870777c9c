"""Horizon stability: the loss a shorter run would have, read off one long run, equals
the shorter run's own final loss; runs that turn non-finite count as infinite loss from
then on; the script's verdict is the ratio it reports, and it writes curves and a plot."""

from __future__ import annotations

import json
import math
import sys

import pytest

from metaopt.algorithms.lopt_calibration import rescale_step
from metaopt.lopt import load_checkpoint
from metaopt.runner.experiments.lopt_metatrain import evaluate_lopt_per_task
from tasks.lopt_tasks import heldout_suite
from tests.script_module import load_script


def test_losses_reported_along_a_run_are_the_final_losses_of_shorter_runs():
    lopt = load_checkpoint("mulo-small-fc-w128")
    tasks = heldout_suite("mlp_mup_heldout", widths=[32])[:2]
    long = evaluate_lopt_per_task(lopt, tasks, 20, seed=1, report_at=[7, 14, 20])
    for k in (7, 14):
        short = evaluate_lopt_per_task(lopt, tasks, k, seed=1)
        assert [r["final_loss_at"][k] for r in long] == [r["final_loss"] for r in short]
    assert [r["final_loss_at"][20] for r in long] == [r["final_loss"] for r in long]
    assert evaluate_lopt_per_task(lopt, tasks, 20, seed=1)[0]["final_loss"] == \
        long[0]["final_loss"]
    with pytest.raises(ValueError, match="report_at"):
        evaluate_lopt_per_task(lopt, tasks, 10, report_at=[11])


def test_a_run_that_turns_non_finite_is_infinite_from_then_on():
    blown = rescale_step(load_checkpoint("mulo-small-fc-w128"), 1e30)
    task = heldout_suite("mlp_mup_heldout", widths=[32])[:1]
    row = evaluate_lopt_per_task(blown, task, 40, report_at=[1, 40])[0]
    assert row["final_loss"] == math.inf and row["test_metric"] == 0.0
    assert math.isfinite(row["final_loss_at"][1]) and row["final_loss_at"][40] == math.inf


def test_script_reports_ratios_verdicts_curves_and_a_plot(tmp_path, monkeypatch):
    script = load_script("lopt_horizon_stability")
    out, png = tmp_path / "h.json", tmp_path / "h.png"
    monkeypatch.setattr(sys, "argv", [
        "lopt_horizon_stability.py", "--opt", "mulo-small-fc-w128", "--suite",
        "mlp_mup_heldout", "--width", "32", "--tasks", "2", "--steps", "12", "--horizon",
        "4", "--report-every", "4", "--seeds", "0", "1", "--json", str(out), "--plot",
        str(png)])
    script.main()
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert [t["dataset"] for t in row["tasks"]] == ["digits", "mnist"]
    for t in row["tasks"]:
        assert list(t["curve"]) == ["4", "8", "12"]
        assert t["loss_at_horizon"] == t["curve"]["4"] and t["loss_at_steps"] == t["curve"]["12"]
        assert t["ratio"] == pytest.approx(t["loss_at_steps"] / t["loss_at_horizon"])
        assert t["stable"] == (t["diverged"] == 0 and t["ratio"] <= 1.0)
    assert row["stable"] == all(t["stable"] for t in row["tasks"])
    assert png.stat().st_size > 10_000
    small = ["lopt_horizon_stability.py", "--opt", "mulo-small-fc-w128", "--suite",
             "mlp_mup_heldout", "--width", "32", "--tasks", "1", "--steps", "4", "--horizon",
             "2", "--report-every", "2", "--seeds", "0", "--json", str(out)]
    curves = {}
    for extra in ([], ["--step-scale", "0.5"]):
        monkeypatch.setattr(sys, "argv", small + extra)
        script.main()
        data = json.loads(out.read_text())
        curves[data["step_scale"]] = data["rows"][0]
    assert curves[0.5]["optimizer"] == "mulo-small-fc-w128×0.5"
    assert curves[0.5]["tasks"][0]["curve"]["4"] != curves[1.0]["tasks"][0]["curve"]["4"]
    monkeypatch.setattr(sys, "argv", ["lopt_horizon_stability.py", "--steps", "10",
                                      "--horizon", "20"])
    with pytest.raises(SystemExit):
        script.main()
