"""The ``metaopt`` command: train, resume, eval, plot and list experiments.

::

    metaopt train configs/ridge_hyper.yaml settings.estimator=first_order --run-dir runs/a
    metaopt resume runs/a                 # continue after Ctrl-C / SIGTERM / a crash
    metaopt resume runs/a steps=600       # extend a run (recorded in env.json)
    metaopt eval runs/a --split test      # evaluate the newest checkpoint
    metaopt plot runs/a runs/b --out cmp.png
    metaopt list                          # experiments, tasks, estimators, pretrained lopts
    metaopt sweep configs/sweeps/maml_sinusoid_lr.yaml --dir sweeps/lr   # Ray Tune; rerun resumes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

#: Commands that take ``KEY=VALUE`` overrides after their positional arguments.
OVERRIDABLE = ("train", "resume")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaopt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`train CFG --run-dir D a.b=1`).
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and args.command not in OVERRIDABLE):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from metaopt.errors import MetaoptError

    try:
        return args.func(args, ["metaopt", *argv])
    except MetaoptError as e:  # every error metaopt raises on purpose: one line
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (permissions, disk full, ...)
        where = f" ({e.filename})" if e.filename else ""
        print(f"metaopt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaopt: aborted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaopt", description="metaopt experiment runner")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="start a run from a YAML config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides with YAML values, e.g. settings.inner_steps=20")
    t.add_argument("--run-dir", help="run directory (default: runs/<experiment>-<time>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("resume", help="continue (or extend) a run from its newest checkpoint")
    r.add_argument("run_dir")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="change steps, eval_every, checkpoint_every, keep_checkpoints or "
                        "log.* (e.g. steps=600 extends the run)")
    r.add_argument("--checkpoint", help="a specific checkpoint directory to resume from")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_resume)

    e = sub.add_parser("eval", help="evaluate a run's newest (or given) checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--split", default=None, help="split (default: the experiment's first)")
    e.add_argument("--checkpoint", help="a specific checkpoint directory")
    e.set_defaults(func=_cmd_eval)

    pl = sub.add_parser("plot", help="PNG learning curves of one run or several overlaid")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/plots/metrics.png for one "
                                  "run, ./metaopt-compare.png for several)")
    pl.add_argument("--names", nargs="+", help="legend labels, one per run")
    pl.set_defaults(func=_cmd_plot)

    sw = sub.add_parser("sweep", help="Ray Tune sweep (grid / random / PBT) over an "
                                      "experiment's settings; rerun to resume")
    sw.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sw.add_argument("--dir", help="sweep directory (default: sweeps/<sweep file name>)")
    sw.add_argument("--address", help="Ray cluster to join (auto, host:port; default: "
                                      "start a local one)")
    sw.set_defaults(func=_cmd_sweep)

    ls = sub.add_parser("list", help="registered experiments, tasks, estimators, lopts")
    ls.set_defaults(func=_cmd_list)
    return p


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.runner.config import load_run_config
    from metaopt.runner.loop import build_experiment
    from metaopt.runner.rundir import (
        CONFIG_FILE,
        RunDirError,
        RunLock,
        create_run_dir,
        default_run_dir,
    )

    # Everything that can fail on the config or the environment fails here, before
    # the run directory exists: settings (parsed and checked), extras, the experiment.
    cfg = load_run_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    if (run_dir / CONFIG_FILE).exists():  # checked again under the lock
        raise RunDirError(f"{run_dir} already holds a run; continue it with "
                          f"`metaopt resume {run_dir}` or choose another --run-dir")
    _require_extras(cfg)
    experiment = build_experiment(cfg)
    with RunLock(run_dir) as lock:
        create_run_dir(run_dir, cfg, argv)
        print(f"run directory: {run_dir}", flush=True)
        return _run(cfg, run_dir, None, progress=not args.no_progress,
                    experiment=experiment, lock=lock)


def _cmd_resume(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.runner.checkpoint import latest_checkpoint
    from metaopt.runner.config import resume_overrides
    from metaopt.runner.loop import build_experiment
    from metaopt.runner.rundir import (
        CHECKPOINTS,
        RunLock,
        load_run_dir_config,
        record_resume,
        update_run_config,
    )

    run_dir = Path(args.run_dir)
    load_run_dir_config(run_dir)  # a run directory? (before the lock creates anything)
    with RunLock(run_dir) as lock:
        cfg = load_run_dir_config(run_dir)
        cfg, changes = resume_overrides(cfg, args.overrides)
        _require_extras(cfg)
        ckpt = Path(args.checkpoint) if args.checkpoint else \
            latest_checkpoint(run_dir / CHECKPOINTS)
        experiment = build_experiment(cfg)
        if ckpt is None:
            print(f"{run_dir}: no checkpoint yet; starting from step 0", flush=True)
        if changes:
            update_run_config(run_dir, cfg)
            print("changed: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                          for k, (old, new) in changes.items()), flush=True)
        record_resume(run_dir, cfg.device, argv, changes)
        return _run(cfg, run_dir, ckpt, progress=not args.no_progress,
                    experiment=experiment, lock=lock)


def _require_extras(cfg) -> None:
    """Fail now, naming the extra, if the configured experiment needs a missing one."""
    from metaopt.runner.experiment import get_experiment
    from metaopt.runner.extras import require_extras

    needs = get_experiment(cfg.experiment).required_extras(cfg.settings)
    require_extras(needs, f"experiment '{cfg.experiment}'")


def _run(cfg, run_dir: Path, ckpt: Path | None, *, progress: bool, experiment=None,
         lock=None) -> int:
    from metaopt.runner.loop import train

    result = train(cfg, run_dir, resume=ckpt, progress=progress, experiment=experiment,
                   lock=lock)
    if result.status == "interrupted":
        print(f"interrupted at step {result.step}/{cfg.steps}; checkpoint {result.checkpoint}\n"
              f"continue with: metaopt resume {run_dir}", flush=True)
        return 128 + (result.signum or 0)
    final = {**{f"train_{k}": v for k, v in result.train_metrics.items()},
             **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}
    print(f"finished {result.step}/{cfg.steps} steps: " + json.dumps(final), flush=True)
    return 0


def _cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.runner.checkpoint import CheckpointError, latest_checkpoint
    from metaopt.runner.loop import build_experiment, load_into
    from metaopt.runner.metrics import to_float_metrics
    from metaopt.runner.rundir import CHECKPOINTS, load_run_dir_config

    run_dir = Path(args.run_dir)
    cfg = load_run_dir_config(run_dir)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir / CHECKPOINTS)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to evaluate")
    experiment = build_experiment(cfg)
    step = load_into(experiment, cfg, ckpt).step
    split = args.split or experiment.splits[0]
    if split not in experiment.splits:
        print(f"metaopt: error: experiment '{cfg.experiment}' has splits "
              f"{list(experiment.splits)}, not '{split}'", file=sys.stderr)
        return 2
    metrics = to_float_metrics(experiment.evaluate(split), f"{cfg.experiment}.evaluate")
    record = {"step": step, "split": split, "checkpoint": str(ckpt), **metrics}
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


def _cmd_plot(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.runner.extras import PLOT, require_extras
    from metaopt.runner.plots import plot_runs
    from metaopt.runner.rundir import PLOTS

    require_extras(PLOT, "metaopt plot")
    if args.out:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0]) / PLOTS / "metrics.png"
    else:
        out = Path("metaopt-compare.png")
    try:
        path = plot_runs(args.run_dirs, out, names=args.names)
    except ValueError as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.distributed.tune import load_sweep, run_sweep

    spec = load_sweep(args.sweep)  # every sweep-file error before Ray starts
    sweep_dir = Path(args.dir) if args.dir else Path("sweeps") / Path(args.sweep).stem
    result = run_sweep(spec, sweep_dir, address=args.address, command=argv)
    return 0 if result.finished else 1


def _cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
    from metaopt.registry import ESTIMATORS, EXPERIMENTS, PRETRAINED_LOPTS, TASKS
    from metaopt.runner.builtins import register_builtins

    register_builtins()
    import metaopt.lopt.hub  # noqa: F401 (registers the published learned optimizers)

    for title, reg in (("experiments", EXPERIMENTS), ("tasks", TASKS),
                       ("estimators", ESTIMATORS), ("pretrained learned optimizers",
                                                    PRETRAINED_LOPTS)):
        print(f"{title}:")
        if not len(reg):
            print("  (none registered)")
        for name in reg.names():
            doc = reg.describe(name)
            print(f"  {name:<24} {doc}".rstrip())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
