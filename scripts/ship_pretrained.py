"""Package a meta-trained learned optimizer from a run directory, with its provenance.

    python scripts/ship_pretrained.py RUN_DIR NAME [--out metaopt/lopt/pretrained]
        [--step N] [--calibrate-step]

Reads the run's config and latest checkpoint (``--step N``: the step-N one) of a
``metaopt train`` run directory (e.g. ``out/lopt_mulo``), rebuilds the ``lopt_metatrain``
experiment, and writes the learned optimizer as a native checkpoint
(:func:`metaopt.lopt.save_checkpoint`: checksummed, atomic) under ``OUT/NAME`` with
metadata: the training command, config, seed, commit (from the run's ``env.json``), the
outer step reached, and its held-out evaluation.

``--calibrate-step``: before writing, pick the step multiplier with the lowest
meta-objective of the run (its ``meta_loss``, ``max_loss`` and horizon schedule) on
its own training tasks, 4 rows each, from :data:`STEP_GRID`
(:func:`metaopt.algorithms.lopt_calibration.calibrate_step_scale`; no held-out task is
looked at). The scale is folded into ``step_mult``, and the grid and every objective
value go into the metadata under ``step_scale_calibration``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaopt.algorithms.lopt_calibration import calibrate_step_scale, rescale_step
from metaopt.bilevel.truncation import LogUniformLength
from metaopt.lopt import save_checkpoint
from metaopt.runner.checkpoint import latest_checkpoint
from metaopt.runner.config import to_dict
from metaopt.runner.experiments.lopt_metatrain import build_task
from metaopt.runner.loop import build_experiment, load_into
from metaopt.runner.rundir import load_run_dir_config

#: Step multipliers tried by ``--calibrate-step``: 2^(k/4), k = -6 … 1 (0.35 … 1.19).
STEP_GRID = tuple(2.0 ** (k / 4) for k in range(-6, 2))
#: Rows per training task and their seed for the calibration objective.
CALIBRATION_ROWS, CALIBRATION_SEED = 4, 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--out", default="metaopt/lopt/pretrained")
    ap.add_argument("--step", type=int, default=None,
                    help="ship the step-N checkpoint (default: the latest)")
    ap.add_argument("--calibrate-step", action="store_true",
                    help="fold the best step multiplier on the training tasks into step_mult")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    cfg = load_run_dir_config(run)
    if args.step is None:
        ckpt = latest_checkpoint(run / "checkpoints")
    else:
        ckpt = run / "checkpoints" / f"step_{args.step:08d}"
        ckpt = ckpt if ckpt.exists() else None
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint under {run / 'checkpoints'}"
                         + ("" if args.step is None else f" for step {args.step}"))
    exp = build_experiment(cfg)
    step = load_into(exp, cfg, ckpt).step
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    lopt = exp.trained_optimizer()
    extra = {}
    if args.calibrate_step:
        s = cfg.settings
        tasks = [build_task(spec, cfg.seed) for spec in s.task_specs]
        cal = calibrate_step_scale(lopt, tasks, STEP_GRID,
                                   schedule=LogUniformLength(s.horizon_low, s.horizon_high),
                                   rows=CALIBRATION_ROWS, seed=CALIBRATION_SEED,
                                   meta_loss=s.meta_loss, max_loss=s.max_loss,
                                   backend=s.backend)
        lopt = rescale_step(lopt, cal.scale)
        extra["step_scale_calibration"] = {
            **cal.as_dict(), "rows": CALIBRATION_ROWS, "seed": CALIBRATION_SEED,
            "meta_loss": s.meta_loss, "tasks": "the run's training tasks (settings.task)"}
        print(f"step scale {cal.scale:.3g}: " + ", ".join(
            f"{k:.3g} → {v:.4f}" for k, v in cal.objective.items()))
    evaluation = exp.evaluate_optimizer(lopt, "test")
    metadata = {"name": args.name, "trained_by": "metaopt lopt_metatrain",
                "command": " ".join(env.get("command", [])), "config": to_dict(cfg),
                "seed": cfg.seed, "commit": env.get("git", {}).get("commit"),
                "outer_steps": step, "heldout_eval": evaluation,
                "torch": env.get("torch"), **extra}
    path = save_checkpoint(lopt, Path(args.out) / args.name, metadata=metadata)
    print(f"wrote {path} (outer step {step}; held-out {evaluation})")


if __name__ == "__main__":
    main()
