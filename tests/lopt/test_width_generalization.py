"""The width-generalisation script: per-task rows that agree with the aggregate, and a
plot, on a tiny run (two widths, a few steps)."""

from __future__ import annotations

import json
import sys

import pytest

from metaopt.lopt import load_checkpoint
from metaopt.runner.experiments.lopt_metatrain import evaluate_lopt, evaluate_lopt_per_task
from tasks.lopt_tasks import heldout_suite
from tests.script_module import load_script


def test_per_task_evaluation_averages_to_the_suite_evaluation():
    lopt = load_checkpoint("mulo-small-fc-w128")
    tasks = heldout_suite("mlp_mup_heldout", widths=[32])[:2]
    per_task = evaluate_lopt_per_task(lopt, tasks, 6, seed=3)
    assert len(per_task) == 2 and per_task[0] != per_task[1]
    whole = evaluate_lopt(lopt, tasks, 6, seed=3)
    for key in ("final_loss", "final_median_loss", "test_metric"):
        assert whole[key] == pytest.approx((per_task[0][key] + per_task[1][key]) / 2, rel=1e-12)
    # task i's run does not depend on which other tasks are evaluated with it
    assert evaluate_lopt_per_task(lopt, tasks[:1], 6, seed=3) == per_task[:1]


def test_width_script_writes_per_task_rows_and_a_plot(tmp_path, monkeypatch):
    script = load_script("lopt_width_generalization")
    out, plot = tmp_path / "w.json", tmp_path / "w.png"
    monkeypatch.setattr(sys, "argv", [
        "lopt_width_generalization.py", "--widths", "16", "32", "--steps", "5", "--seeds",
        "0", "1", "--tasks", "2", "--json", str(out), "--plot", str(plot)])
    script.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["optimizer"], r["width"]) for r in rows] == [
        ("μLO", 16), ("μLO", 32), ("SP twin", 16), ("SP twin", 32)]
    for row in rows:
        assert [t["dataset"] for t in row["per_task"]] == ["digits", "mnist"]
        assert f"_w{row['width']}_" in row["per_task"][0]["task"]
        mean = sum(t["final_loss"] for t in row["per_task"]) / 2
        assert row["final_loss"] == pytest.approx(mean, rel=1e-12)
    assert plot.stat().st_size > 10_000
