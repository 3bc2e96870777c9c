"""The learned-optimizer evaluation harness on a tiny suite."""

import json
import math

import pytest
import torch

from metaopt.lopt import SmallFCLOpt
from tasks.lopt_tasks import logreg_task, mlp_task
from tests.script_module import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_lopt")


def test_lr_grid_is_14_log_spaced(bench):
    grid = torch.tensor(bench.LR_GRID, dtype=torch.float64)
    assert len(grid) == 14 and bench.LR_GRID[0] == pytest.approx(1e-5)
    assert bench.LR_GRID[-1] == pytest.approx(1.0)
    ratios = grid[1:] / grid[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 10 ** (5 / 13)), rtol=1e-6,
                               atol=0)


def test_speedup_counts_reference_steps(bench):
    """Reference curve 10 - t over 10 steps (window 1) is 4.0 at its 7th step → 7/10."""
    ref = [10.0 - t for t in range(10)]
    assert bench.speedup(ref, 4.0, 10) == pytest.approx(0.7)
    assert bench.speedup(ref, 0.0, 10) is None
    assert bench.final_loss([1.0] * 18 + [3.0, 5.0]) == pytest.approx(4.0)  # last 10 %
    runs = [{"losses": [1.0] * 27 + [2.0, 2.0, 50.0], "test_metric": 0.5, "diverged": False}]
    summary = bench._summary(runs)  # a spike moves the mean of the last 10 %, not the median
    assert summary["final_median_loss"] == pytest.approx(2.0)
    assert summary["final_loss"] == pytest.approx(18.0)


def test_same_batches_for_every_optimizer(bench):
    task = logreg_task("digits")
    a = bench.run_optimizer(task, bench.adamw(1e-2), 5, seed=0)
    b = bench.run_optimizer(task, bench.adamw(1e-2), 5, seed=0)
    assert a["losses"] == b["losses"]
    # first loss is at the (zero) init: the same for any optimizer
    c = bench.run_optimizer(task, bench.adamw(1e-1), 5, seed=0)
    assert c["losses"][0] == a["losses"][0] == pytest.approx(math.log(10), rel=1e-6)


def test_divergence_is_flagged(bench):
    task = mlp_task("sp", 16, 1, "relu", "digits")
    run = bench.run_optimizer(task, lambda p: torch.optim.SGD(p, lr=math.inf), 10, seed=0)
    assert run["diverged"] and math.isinf(run["losses"][-1])


def test_evaluate_tiny_suite_json_and_plots(bench, tmp_path):
    tasks = [logreg_task("digits"), mlp_task("mup", 16, 1, "relu", "mnist1d")]
    res = bench.evaluate({"small_fc": SmallFCLOpt(), "sgd": lambda p: torch.optim.SGD(p, lr=0.1)},
                         tasks, steps=12, seeds=(0,), lr_grid=(1e-4, 1e-2, 1e-1))
    for name, entry in res["tasks"].items():
        rows = entry["optimizers"]
        assert set(rows) == {"adamw_tuned", "adamw_default", "small_fc", "sgd"}
        tuned = rows["adamw_tuned"]
        assert tuned["final_loss"] == min(entry["grid_final_loss"].values())
        assert tuned["speedup"] == pytest.approx(1.0) or tuned["speedup"] < 1.0
        for row in rows.values():
            assert len(row["curve"]) == 12 and 0.0 <= row["test_metric"] <= 1.0
        assert name in {t.name for t in tasks}
        for row in rows.values():
            assert row["ratio_to_tuned"] == pytest.approx(row["final_loss"] / tuned["final_loss"])
    for opt, worst in res["worst_ratio_to_tuned"].items():
        ratios = {n: e["optimizers"][opt]["ratio_to_tuned"] for n, e in res["tasks"].items()}
        assert worst == {"ratio": max(ratios.values()), "task": max(ratios, key=ratios.get)}
    assert res["worst_ratio_to_tuned"]["adamw_tuned"]["ratio"] == 1.0
    json.dumps(res)
    paths = bench.plot_curves(res, tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_mulo_gets_task_mup_scales(bench):
    """μLO on a μP task runs with the task's mup_scales, given in parameter order."""
    from metaopt.lopt.mulo import MuSmallFC

    task = mlp_task("mup", 256, 2, "relu", "digits")
    run = bench.run_optimizer(task, MuSmallFC(), 3, seed=0)
    assert not run["diverged"] and all(math.isfinite(v) for v in run["losses"])


def test_tuned_learned_optimizer_row(bench):
    """--tune-lopt-lr: NAME@tuned is the best of the step-multiplier grid; its lr 1.0 entry
    is the untuned row (same batches), and another multiplier gives another run."""
    task = mlp_task("mup", 16, 1, "relu", "digits")
    res = bench.evaluate({"small_fc": SmallFCLOpt()}, [task], steps=12, seeds=(0, 1),
                         lr_grid=(1e-2,), tune_lopt_lr=True, lopt_lr_grid=(0.5, 1.0, 2.0))
    rows = res["tasks"][task.name]["optimizers"]
    tuned, grid = rows["small_fc@tuned"], rows["small_fc@tuned"]["grid_final_loss"]
    assert set(grid) == {"0.5", "1.0", "2.0"}
    assert tuned["final_loss"] == min(grid.values()) == grid[str(tuned["lr"])]
    assert grid["1.0"] == rows["small_fc"]["final_loss"]
    assert len(set(grid.values())) == 3
    assert bench.LOPT_LR_GRID[7] == 1.0 and len(bench.LOPT_LR_GRID) == 10
