"""Package a meta-trained learned optimizer from a run directory, with its provenance.

    python scripts/ship_pretrained.py RUN_DIR NAME [--out metaopt/lopt/pretrained]
        [--step N] [--calibrate-step meta|final [--horizon H] [--select-step]]

Reads the run's config and latest checkpoint (``--step N``: the step-N one) of a
``metaopt train`` run directory (e.g. ``out/lopt_mulo``), rebuilds the ``lopt_metatrain``
experiment, and writes the learned optimizer as a native checkpoint
(:func:`metaopt.lopt.save_checkpoint`: checksummed, atomic) under ``OUT/NAME`` with
metadata: the training command, config, seed, commit (from the run's ``env.json``), the
outer step reached, and its held-out evaluation.

``--calibrate-step meta|final``: before writing, pick the step multiplier from
:data:`STEP_GRID` with the lowest objective on the run's own training tasks, 4 fresh
rows each (:func:`metaopt.algorithms.lopt_calibration.calibrate_step_scale`; no held-out
task is looked at). ``meta`` is the run's meta-objective (its ``meta_loss``, ``max_loss``
and horizon schedule). ``final`` is the log of the final training loss after
``--horizon`` steps (default: the run's ``eval_steps``) — the log of each task's mean
loss over the last 10 % of steps, as the benchmark reports it — averaged over the tasks. The
scale is folded into ``step_mult``, and the grid and every objective value go into the
metadata under ``step_scale_calibration``. ``--select-step`` calibrates every
checkpoint of the run and ships the one with the lowest calibrated objective, like early
stopping on validation tasks (all values in ``checkpoint_selection``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from metaopt.algorithms.lopt_calibration import (
    calibrate_step_scale,
    final_window_weights,
    rescale_step,
    schedule_step_weights,
)
from metaopt.bilevel.truncation import LogUniformLength
from metaopt.lopt import save_checkpoint
from metaopt.runner.checkpoint import latest_checkpoint
from metaopt.runner.config import to_dict
from metaopt.runner.experiments.lopt_metatrain import build_task
from metaopt.runner.loop import build_experiment, load_into
from metaopt.runner.rundir import git_info, load_run_dir_config

#: Step multipliers tried by ``--calibrate-step``: 2^(k/4), k = -6 … 1 (0.35 … 1.19).
STEP_GRID = tuple(2.0 ** (k / 4) for k in range(-6, 2))
#: Rows per training task and their seed for the calibration objective.
CALIBRATION_ROWS, CALIBRATION_SEED = 4, 1


def _checkpoint(run: Path, step: int | None) -> Path:
    if step is None:
        ckpt = latest_checkpoint(run / "checkpoints")
    else:
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt = ckpt if ckpt.exists() else None
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint under {run / 'checkpoints'}"
                         + ("" if step is None else f" for step {step}"))
    return ckpt


def _objective_kwargs(cfg: Any, objective: str, horizon: int | None) -> dict[str, Any]:
    """``step_scale_objective`` arguments: the run's meta-objective, or the log of the
    final training loss after ``horizon`` steps (default: the run's ``eval_steps``)."""
    s = cfg.settings
    common = {"rows": CALIBRATION_ROWS, "seed": CALIBRATION_SEED, "max_loss": s.max_loss,
              "backend": s.backend}
    if objective == "meta":
        return {**common, "meta_loss": s.meta_loss, "num_steps": s.horizon_high,
                "weights": schedule_step_weights(LogUniformLength(s.horizon_low,
                                                                  s.horizon_high))}
    h = horizon or s.eval_steps
    return {**common, "meta_loss": "loss", "per_task_log": True, "num_steps": h,
            "weights": final_window_weights(h)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--out", default="metaopt/lopt/pretrained")
    ap.add_argument("--step", type=int, default=None,
                    help="ship the step-N checkpoint (default: the latest)")
    ap.add_argument("--calibrate-step", choices=("meta", "final"), default=None,
                    help="fold the step multiplier that is best on the run's training tasks "
                         "into step_mult, by the run's meta-objective or the final loss")
    ap.add_argument("--horizon", type=int, default=None,
                    help="steps of the 'final' objective (default: settings.eval_steps)")
    ap.add_argument("--select-step", action="store_true",
                    help="with --calibrate-step: ship the checkpoint whose calibrated "
                         "objective is lowest")
    raw_args = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw_args)
    if args.select_step and (args.calibrate_step is None or args.step is not None):
        raise SystemExit("--select-step needs --calibrate-step and no --step")
    run = Path(args.run_dir)
    cfg = load_run_dir_config(run)
    exp = build_experiment(cfg)
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    if args.select_step:
        candidates = sorted((run / "checkpoints").glob("step_*"))
        if not candidates:
            raise SystemExit(f"{run}: no checkpoint under {run / 'checkpoints'}")
    else:
        candidates = [_checkpoint(run, args.step)]
    extra: dict[str, Any] = {}
    if args.calibrate_step is None:
        step = load_into(exp, cfg, candidates[0]).step
        lopt = exp.trained_optimizer()
    else:
        kw = _objective_kwargs(cfg, args.calibrate_step, args.horizon)
        tasks = [build_task(spec, cfg.seed) for spec in cfg.settings.task_specs]
        results = {}
        for ckpt in candidates:
            at = load_into(exp, cfg, ckpt).step
            trained = exp.trained_optimizer()
            cal = calibrate_step_scale(trained, tasks, STEP_GRID, **kw)
            results[at] = (trained, cal)
            print(f"step {at}: scale {cal.scale:.3g}: " + ", ".join(
                f"{k:.3g} → {v:.4f}" for k, v in cal.objective.items()))
        step = min(results, key=lambda k: results[k][1].objective[results[k][1].scale])
        trained, cal = results[step]
        lopt = rescale_step(trained, cal.scale)
        extra["step_scale_calibration"] = {
            **cal.as_dict(), "objective_kind": args.calibrate_step,
            "horizon": kw["num_steps"], "meta_loss": kw["meta_loss"],
            "per_task_log": kw.get("per_task_log", False),
            "rows": CALIBRATION_ROWS, "seed": CALIBRATION_SEED,
            "tasks": "the run's training tasks (settings.task), fresh rows"}
        if args.select_step:
            extra["checkpoint_selection"] = {
                str(k): c.objective[c.scale] for k, (_, c) in results.items()}
    evaluation = exp.evaluate_optimizer(lopt, "test")
    metadata = {"name": args.name, "trained_by": "metaopt lopt_metatrain",
                "command": " ".join(env.get("command", [])), "config": to_dict(cfg),
                "seed": cfg.seed, "commit": env.get("git", {}).get("commit"),
                "outer_steps": step, "heldout_eval": evaluation,
                "torch": env.get("torch"),
                "ship_command": " ".join(["python scripts/ship_pretrained.py", *raw_args]),
                "ship_git": git_info(Path(__file__).resolve().parent),
                **extra}
    path = save_checkpoint(lopt, Path(args.out) / args.name, metadata=metadata)
    print(f"wrote {path} (outer step {step}; held-out {evaluation})")


if __name__ == "__main__":
    main()
