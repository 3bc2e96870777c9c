"""Calibrating a meta-trained learned optimizer's step scale on its training tasks.

PES moves all of φ through noisy loss differences. One direction in φ is the overall
size of the learned step, and the estimates point along it only weakly. A small_fc
optimizer fine-tuned on the log-loss objective still did better at 0.5–0.7× its step.
This module searches that one scalar directly.

:func:`step_scale_objective` runs ``lopt`` unperturbed through the meta-training system,
:class:`LearnedOptimizerSystem`, so its ``meta_loss`` and ``max_loss`` apply. Each
task's rows run one episode of ``len(weights)`` steps. Row batches depend only on (row
seed, step), so a shorter episode is exactly a prefix of this one. The value is the
weighted mean of the per-step terms, averaged over rows and then over the tasks (a
mixture's meta-gradient is the mean of its entries'). Two weightings:

* :func:`schedule_step_weights` — the meta-objective the truncated estimators optimise.
  Step t counts with P(h > t) under the episode-length schedule, which is the share of
  truncated meta-training's steps that sit at position t: every t < low, then
  log(high / t) / log(high / low) for the log-uniform schedule.
* :func:`final_window_weights` — the mean term over the last 10 % of an H-step run. With
  ``meta_loss="loss"`` and ``per_task_log=True`` each task's value is the log of its
  mean final training loss, the number ``scripts/bench_lopt.py`` reports. Averaged over
  tasks, that ranks optimizers the way per-task loss ratios to a baseline do. The mean
  of per-step logs (``meta_loss="log"``) would not: it forgives rare loss spikes that
  the arithmetic mean counts. A meta-trained small_fc at 1e-5 typical loss with
  occasional spikes scored 1e-5 by it and 0.016 by the benchmark.

:func:`calibrate_step_scale` evaluates the objective on a grid of step multipliers (the
rows follow the same seeds at every scale) and keeps the best. :func:`rescale_step`
folds the chosen scale into the architecture's ``step_mult``. For small_fc, μLO and
VeLO a tensor's step is linear in ``step_mult``, so the result equals the torch.optim
shell at ``lr = scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.algorithms.lopt_training import (
    LOG_LOSS_FLOOR,
    LearnedOptimizerSystem,
    meta_parameters,
)
from metaopt.bilevel.truncation import LogUniformLength, mix_seed
from metaopt.lopt import ARCHITECTURES, LearnedOptimizer

__all__ = ["StepScaleCalibration", "calibrate_step_scale", "final_window_weights",
           "rescale_step", "schedule_step_weights", "step_scale_objective"]


def schedule_step_weights(schedule: LogUniformLength) -> Tensor:
    """P(episode length > t) for t = 0 … high − 1 under the log-uniform schedule."""
    lo, hi = float(schedule.low), float(schedule.high)
    t = torch.arange(int(schedule.high), dtype=torch.float64)
    if hi == lo:
        return torch.ones_like(t)
    tail = torch.log(hi / t.clamp_min(lo)) / math.log(hi / lo)
    return torch.where(t < lo, torch.ones_like(t), tail)


def final_window_weights(horizon: int, fraction: float = 0.1) -> Tensor:
    """Weight 1 on the last ``fraction`` of ``horizon`` steps (at least one), else 0."""
    if horizon < 1 or not 0 < fraction <= 1:
        raise ValueError(f"need horizon >= 1 and 0 < fraction <= 1, got {horizon}, {fraction}")
    w = torch.zeros(int(horizon), dtype=torch.float64)
    w[int(horizon) - max(1, int(horizon * fraction)):] = 1.0
    return w


def rescale_step(lopt: LearnedOptimizer, scale: float) -> LearnedOptimizer:
    """A copy of ``lopt`` whose every step is ``scale`` times as large (its ``step_mult``
    multiplied by ``scale``; architectures without one are refused)."""
    config = lopt.config()
    if "step_mult" not in config:
        raise ValueError(f"rescale_step: {lopt.architecture} has no step_mult in its config "
                         f"(keys {sorted(config)})")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"rescale_step: scale must be finite and > 0, got {scale}")
    out = ARCHITECTURES[lopt.architecture](**{**config,
                                              "step_mult": config["step_mult"] * scale})
    out.load_state_dict(lopt.state_dict(), strict=True)
    return out


@torch.no_grad()
def step_scale_objective(lopt: LearnedOptimizer, tasks: Sequence[Any], *, weights: Tensor,
                         num_steps: int | None = None, rows: int = 4, seed: int = 0,
                         meta_loss: str = "log", max_loss: float | None = 10.0,
                         backend: str = "reference", per_task_log: bool = False
                         ) -> dict[str, Any]:
    """The weighted mean per-step term of ``lopt`` (unperturbed) on ``tasks``.

    ``weights``: one per step of the episode (:func:`schedule_step_weights`,
    :func:`final_window_weights`); ``num_steps``: the horizon ``lopt.init`` is told
    (default ``len(weights)``; meta-training tells it the schedule's longest episode).
    ``per_task_log``: each task's value is the log of its weighted mean term.
    Returns ``{"objective": float, "per_task": [float, ...]}``. Row r of task i is
    seeded ``mix_seed(seed, i, r)``, so two optimizers meet the same task instances.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if weights.dim() != 1 or len(weights) == 0 or not bool((weights >= 0).all()) \
            or not float(weights.sum()) > 0:
        raise ValueError("weights must be a non-empty 1-D tensor, >= 0, not all zero")
    steps = len(weights)
    phi_rows = {k: v.expand(rows, *v.shape).clone() for k, v in meta_parameters(lopt).items()}
    per_task = []
    for i, task in enumerate(tasks):
        system = LearnedOptimizerSystem(lopt, task, num_steps=num_steps or steps,
                                        max_loss=max_loss, backend=backend,
                                        meta_loss=meta_loss)
        seeds = torch.tensor([mix_seed(seed, i, r) for r in range(rows)], dtype=torch.long)
        state = system.init(phi_rows, seeds)
        total = 0.0
        for t in range(steps):
            state, term = system.step(phi_rows, state, seeds,
                                      torch.full((rows,), t, dtype=torch.long))
            if not bool(torch.isfinite(term).all()):
                raise FloatingPointError(f"step_scale_objective: non-finite meta-loss term "
                                         f"at step {t} of task {i}")
            total += float(weights[t]) * float(term.double().mean())
        value = total / float(weights.sum())
        if per_task_log:
            value = math.log(max(value, LOG_LOSS_FLOOR))
        per_task.append(value)
    return {"objective": sum(per_task) / len(per_task), "per_task": per_task}


@dataclass(frozen=True)
class StepScaleCalibration:
    """The grid search's outcome: the best scale and the objective at every scale."""

    scale: float
    objective: dict[float, float]
    per_task: dict[float, list[float]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (for a checkpoint's metadata)."""
        return {"scale": self.scale,
                "objective": {repr(k): v for k, v in self.objective.items()},
                "per_task": {repr(k): v for k, v in self.per_task.items()}}


def calibrate_step_scale(lopt: LearnedOptimizer, tasks: Sequence[Any],
                         grid: Sequence[float], **objective_kw: Any) -> StepScaleCalibration:
    """The multiplier in ``grid`` with the lowest :func:`step_scale_objective`.

    A scale whose episodes turn non-finite counts as ``inf``.
    """
    if not grid:
        raise ValueError("calibrate_step_scale: the grid is empty")
    objective, per_task = {}, {}
    for scale in grid:
        try:
            out = step_scale_objective(rescale_step(lopt, float(scale)), tasks, **objective_kw)
        except FloatingPointError:
            out = {"objective": math.inf, "per_task": [math.inf] * len(tasks)}
        objective[float(scale)] = out["objective"]
        per_task[float(scale)] = out["per_task"]
    best = min(objective, key=objective.__getitem__)
    return StepScaleCalibration(best, objective, per_task)
