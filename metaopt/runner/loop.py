"""The meta-training loop every experiment runs in.

Per outer step, top to bottom::

    metrics = experiment.meta_step(step)             # the algorithm's work
    write metrics.jsonl (+ TensorBoard)              # split "train"
    every eval_every steps and at the end: experiment.evaluate(first split)
    update the progress bar (ETA, live metrics)
    every checkpoint_every steps, at the end, or after SIGINT/SIGTERM: checkpoint

A checkpoint taken after step k holds the experiment's state, every RNG state and the
loop's clock, so resuming from it replays steps k+1… exactly as an uninterrupted run
would (see :func:`train`'s ``resume`` argument).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from metaopt.errors import ConfigError
from metaopt.runner.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_matches,
    clean_stale,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from metaopt.runner.config import RunConfig, parse_run_config, to_dict
from metaopt.runner.experiment import Experiment, get_experiment
from metaopt.runner.metrics import MetricsWriter, to_float_metrics
from metaopt.runner.rng import capture_rng_state, restore_rng_state, seed_everything
from metaopt.runner.rundir import CHECKPOINTS, RunLock, write_status
from metaopt.runner.signals import StopRequest
from metaopt.tree import tree_map_like

__all__ = [
    "TrainResult",
    "build_experiment",
    "checkpoint_state",
    "load_into",
    "resolve_dtype",
    "train",
]

#: Config keys that must agree between a checkpoint and the run resuming it.
IDENTITY_KEYS = ("experiment", "settings", "seed", "dtype")


@dataclass
class TrainResult:
    """How a call to :func:`train` ended."""

    step: int
    status: str  # "finished" or "interrupted"
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    signum: int | None = None
    checkpoint: Path | None = None


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32`` (only floating dtypes are allowed)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must name a floating torch dtype, got {name!r}")
    return dtype


def build_experiment(cfg: RunConfig, *, executor: Any = None) -> Experiment:
    """Seed every RNG with ``cfg.seed`` and build the configured experiment.

    With a non-default ``executor:`` section the executor (e.g. Ray workers) is built
    here too and handed to :meth:`Experiment.use_executor` — or ``executor``, an
    :class:`~metaopt.distributed.Executor` the caller already has (its workers are
    reused; the caller shuts it down).
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config asks for device '{cfg.device}' but CUDA is not available")
    cls = get_experiment(cfg.experiment)
    if not cfg.executor.is_default:
        cls.check_executor(cfg.settings, cfg.executor)
    seed_everything(cfg.seed)
    experiment = cls(cfg.settings, device=device, dtype=resolve_dtype(cfg.dtype),
                     seed=cfg.seed)
    if not cfg.executor.is_default:
        if executor is None:
            from metaopt.distributed import make_executor

            executor = make_executor(cfg.executor.options())
        experiment.use_executor(executor)
    return experiment


def checkpoint_state(experiment: Experiment, clock_s: float) -> dict[str, Any]:
    """The full state tree a checkpoint stores: experiment, RNGs, loop clock."""
    return {"experiment": experiment.state_dict(),
            "rng": capture_rng_state(experiment.generators()),
            "loop": {"time_s": clock_s}}


def load_into(experiment: Experiment, cfg: RunConfig,
              checkpoint_path: str | Path) -> Checkpoint:
    """Verify a checkpoint against ``cfg`` and ``experiment``, load it, return it.

    Raises :class:`CheckpointError` on corruption, a different experiment or config,
    a step outside ``[0, cfg.steps]``, or state whose keys, shapes or dtypes differ
    from the freshly built experiment's.
    """
    ckpt = read_checkpoint(checkpoint_path)
    if ckpt.step > cfg.steps:
        raise CheckpointError(f"checkpoint {ckpt.path} is at step {ckpt.step}, beyond the "
                              f"run's {cfg.steps} steps (extend the run with "
                              f"`metaopt resume RUN_DIR steps={ckpt.step}` or more)")
    mine = to_dict(cfg)
    # The checkpoint's config as this version reads it: a setting added since, with a
    # default that keeps the old behaviour, is filled in rather than called a mismatch.
    try:
        theirs = to_dict(parse_run_config(ckpt.config, source=f"{ckpt.path} (config)"))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {ckpt.path}: its config no longer parses: "
                              f"{err}") from None
    diffs = [k for k in IDENTITY_KEYS if theirs.get(k) != mine.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {mine.get(k)!r}"
                           for k in diffs)
        raise CheckpointError(f"checkpoint {ckpt.path} belongs to a different run ({detail})")
    template = experiment.state_dict()
    what = f"checkpoint {ckpt.path} does not match experiment '{cfg.experiment}'"
    for key in ("experiment", "rng", "loop"):
        if key not in ckpt.state:
            raise CheckpointError(f"{what}: no '{key}' section")
    check_state_matches(ckpt.state["experiment"], template, what=what)
    experiment.load_state_dict(tree_map_like(lambda t, like: t.to(like.device),
                                             ckpt.state["experiment"], template))
    try:
        restore_rng_state(ckpt.state["rng"], experiment.generators())
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{what}: RNG state: {e}") from None
    return ckpt


def train(cfg: RunConfig, run_dir: str | Path, *, resume: str | Path | None = None,
          progress: bool = True, out: TextIO | None = None,
          experiment: Experiment | None = None, lock: RunLock | None = None) -> TrainResult:
    """Run (or continue) meta-training of ``cfg`` in ``run_dir``.

    Args:
        cfg: the validated run config.
        run_dir: an existing run directory (see :mod:`metaopt.runner.rundir`).
        resume: a checkpoint directory to continue from (``None``: start at step 0).
        progress: report progress: a bar when ``cfg.log.progress`` is on and stderr is
            a terminal, else a summary line every ``cfg.log.print_every`` steps.
        out: where summary lines go (default stdout).
        experiment: the experiment, freshly built from ``cfg`` by
            :func:`build_experiment` (default: built here, and its executor shut
            down at the end).
        lock: this run directory's :class:`RunLock`, already held by the caller
            (default: acquired here for the duration of the call; a run directory
            another process is writing is refused with ``RunDirError``).

    Metrics records after the starting step (written by a run that was then killed)
    are dropped first, so ``metrics.jsonl`` always matches an uninterrupted run.
    On SIGINT/SIGTERM the current step finishes, a checkpoint is written and the
    result has ``status="interrupted"``.
    """
    run_dir = Path(run_dir)
    if lock is None:
        with RunLock(run_dir) as own:
            return train(cfg, run_dir, resume=resume, progress=progress, out=out,
                         experiment=experiment, lock=own)
    if not lock.held or lock.run_dir.resolve() != run_dir.resolve():
        raise ValueError(f"train() was given a lock that is not held for {run_dir}")
    if experiment is None:  # built here: its executor (workers) ends with the call
        experiment = build_experiment(cfg)
        try:
            return train(cfg, run_dir, resume=resume, progress=progress, out=out,
                         experiment=experiment, lock=lock)
        finally:
            if experiment.executor is not None:
                experiment.executor.shutdown()
    out = out or sys.stdout
    clean_stale(run_dir / CHECKPOINTS)
    start, clock = 0, 0.0
    if resume is not None:
        ckpt = load_into(experiment, cfg, resume)
        start, clock = ckpt.step, float(ckpt.state["loop"]["time_s"])
    split = experiment.splits[0] if experiment.splits else None
    show_bar = progress and cfg.log.progress and sys.stderr.isatty()
    print_every = _print_every(cfg) if progress and cfg.log.progress else \
        (cfg.log.print_every or 0)
    result = TrainResult(step=start, status="finished")
    write_status(run_dir, "running", start, cfg.steps)

    with MetricsWriter(run_dir, resume_step=start,
                       tensorboard=cfg.log.tensorboard) as writer, StopRequest() as stop:
        bar = tqdm(total=cfg.steps, initial=start, disable=not show_bar, unit="step",
                   dynamic_ncols=True, desc=cfg.name or cfg.experiment, file=sys.stderr)
        try:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                train_metrics = to_float_metrics(experiment.meta_step(step),
                                                 f"{cfg.experiment}.meta_step")
                clock += time.perf_counter() - t0
                writer.write(step, "train", train_metrics, clock)
                result.train_metrics = train_metrics
                evaluated = split is not None and (
                    step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                if evaluated:
                    t0 = time.perf_counter()
                    result.eval_metrics = to_float_metrics(experiment.evaluate(split),
                                                           f"{cfg.experiment}.evaluate")
                    clock += time.perf_counter() - t0
                    writer.write(step, split, result.eval_metrics, clock)
                result.step = step
                bar.update(1)
                if show_bar:
                    bar.set_postfix(_postfix(train_metrics, result.eval_metrics, split),
                                    refresh=False)
                elif evaluated or (print_every and step % print_every == 0):
                    print(_summary_line(step, cfg.steps, train_metrics,
                                        result.eval_metrics if evaluated else {}, split,
                                        clock), file=out, flush=True)
                due = step == cfg.steps or (cfg.checkpoint_every
                                            and step % cfg.checkpoint_every == 0)
                if due or stop.requested:
                    result.checkpoint = _save(experiment, cfg, run_dir, step, clock)
                if stop.requested:
                    result.status, result.signum = "interrupted", stop.signum
                    break
        finally:
            bar.close()
    write_status(run_dir, result.status, result.step, cfg.steps)
    return result


def _print_every(cfg: RunConfig) -> int:
    """Steps between summary lines without a bar (``log.print_every``; ``None``: ~20 a run)."""
    if cfg.log.print_every is not None:
        return cfg.log.print_every
    return max(1, cfg.steps // 20)


def _save(experiment: Experiment, cfg: RunConfig, run_dir: Path, step: int,
          clock: float) -> Path:
    ckpt_dir = run_dir / CHECKPOINTS
    path = write_checkpoint(ckpt_dir, step=step, experiment=cfg.experiment,
                            config=to_dict(cfg), state=checkpoint_state(experiment, clock))
    if cfg.keep_checkpoints:
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    return path


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _postfix(train_m: Mapping[str, float], eval_m: Mapping[str, float],
             split: str | None) -> dict[str, str]:
    shown = {k: _fmt(v) for k, v in list(train_m.items())[:3]}
    shown.update({f"{split}_{k}": _fmt(v) for k, v in list(eval_m.items())[:2]})
    return shown


def _summary_line(step: int, steps: int, train_m: Mapping[str, float],
                  eval_m: Mapping[str, float], split: str | None, clock: float) -> str:
    parts = [f"step {step}/{steps}", f"{clock:.1f}s"]
    parts += [f"{k}={_fmt(v)}" for k, v in train_m.items()]
    parts += [f"{split}_{k}={_fmt(v)}" for k, v in eval_m.items()]
    return "  ".join(parts)
