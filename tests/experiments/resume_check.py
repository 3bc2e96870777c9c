"""The runner's exact-resume check shared by the experiments' tests."""

from __future__ import annotations

from pathlib import Path

import torch

from metaopt.runner.checkpoint import read_checkpoint
from metaopt.runner.config import RunConfig
from metaopt.runner.loop import TrainResult, train
from metaopt.runner.rundir import create_run_dir


def assert_resumed_run_matches(cfg: RunConfig, tmp_path: Path, key: str = "phi"
                               ) -> TrainResult:
    """Train ``cfg`` straight in one run directory; in another, train, then resume from the
    step-1 checkpoint (as after a kill) and finish. The evaluation metrics and the final
    checkpoint's ``state["experiment"][key]`` tensors must be identical. Returns the
    straight run's result."""
    straight = create_run_dir(tmp_path / "a", cfg, ["pytest"])
    result = train(cfg, straight, progress=False)
    other = create_run_dir(tmp_path / "b", cfg, ["pytest"])
    train(cfg, other, progress=False)
    again = train(cfg, other, resume=other / "checkpoints" / "step_00000001", progress=False)
    assert again.eval_metrics == result.eval_metrics
    last = f"step_{cfg.steps:08d}"
    a = read_checkpoint(straight / "checkpoints" / last).state["experiment"][key]
    b = read_checkpoint(other / "checkpoints" / last).state["experiment"][key]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return result
