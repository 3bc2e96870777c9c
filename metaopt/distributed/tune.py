"""Ray Tune sweeps over any registered experiment's settings, grid or population-based.

A sweep file names a run config, fixes some of its keys, searches over others and
says which evaluation metric ranks the trials::

    # configs/sweeps/maml_sinusoid_lr.yaml      metaopt sweep configs/sweeps/maml_sinusoid_lr.yaml
    base: ../maml_sinusoid.yaml        # a run config (relative to this file)
    set:                               # fixed dotted keys (YAML values)
      steps: 60
      eval_every: 20
      settings.meta_batch: 5
    search:                            # dotted keys -> one of grid / choice / uniform / loguniform
      settings.inner_lr: {grid: [0.003, 0.01, 0.03]}
      settings.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
    metric: val_mse_k10_step1          # <split>_<metric> of the experiment's evaluation,
    mode: min                          #   or train_<metric>
    num_samples: 1                     # samples of the random keys per grid point
    max_concurrent: 2                  # trials at once (default: as resources allow)
    resources: {cpu: 1, gpu: 0}        # per trial
    keep_checkpoints: 2                # Tune checkpoints kept per trial (default: all;
                                       #   not with pbt, see below)
    pbt:                               # optional: population-based training
      perturbation_interval: 20        # outer steps (a multiple of eval_every)
      hyperparam_mutations:            # only settings the experiment can change mid-run
        settings.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
        settings.inner_lr: {choice: [0.003, 0.01, 0.03]}
      quantile_fraction: 0.25
      resample_probability: 0.25
      synch: false

Layout under the sweep directory (``--dir``, default ``sweeps/<sweep file name>``)::

    sweep.yaml            the resolved sweep (a rerun must match it)
    tune/                 Ray Tune's storage: experiment state, per-trial Tune checkpoints
    trials/<trial>/       a normal run directory per trial (config.yaml, metrics.jsonl,
                          checkpoints/, env.json, status.json; pbt.jsonl after exploits)
    summary.json          the final table (also printed)

Each trial is the runner's own :func:`metaopt.runner.loop.train`, called once per
reporting interval (``eval_every`` steps) and resumed from its own checkpoint in
between — the runner's exact resume, so a trial's ``metrics.jsonl`` equals an
uninterrupted ``metaopt train`` of its ``config.yaml`` (apart from ``time_s``). After
each interval the trial reports ``step``, ``train_*`` and ``<split>_*`` metrics and a
Tune checkpoint that *contains* the runner checkpoint plus the name of the trial that
wrote it.

**PBT exploit.** A trial restarted by PBT receives the donor's Tune checkpoint and a
config that is the donor's with mutated hyperparameters. It copies the donor's runner
state into its own run directory as a checkpoint under the new config, drops its own
checkpoints and metrics after that step, rewrites ``config.yaml``, and records the
exploit in ``pbt.jsonl`` and ``env.json``. Only settings an experiment lists in
:meth:`~metaopt.runner.experiment.Experiment.mutable_settings` may be mutated (the
MAML family: ``outer_lr`` and ``inner_lr``, not Meta-SGD's ``inner_lr``, which only
initialises learned rates); anything else is refused when the sweep is loaded.

**Resume.** Rerunning the same sweep on an existing sweep directory restores Tune's
state (``Tuner.restore``): finished trials are not rerun, unfinished ones continue
from their newest Tune checkpoint. A trial whose run directory already says
``finished`` with the same config reports its final metrics instead of training again.

Ray is imported only when a sweep runs; without it the error names ``metaopt[ray]``.
Loading and checking a sweep file (:func:`load_sweep`) needs no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metaopt.errors import ConfigError, MetaoptError, MissingExtraError

__all__ = [
    "PBTSpec",
    "SweepResult",
    "SweepSpec",
    "TrialResources",
    "load_sweep",
    "parse_sweep",
    "run_sweep",
    "trial_run_config",
]

#: Search-space kinds and what each takes.
KINDS = ("grid", "choice", "uniform", "loguniform")
#: Top-level run-config keys a sweep may not search over or set (the sweep owns them).
OWNED_KEYS = ("experiment", "run_dir", "name")
SWEEP_FILE = "sweep.yaml"
SUMMARY_FILE = "summary.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
PBT_FILE = "pbt.jsonl"
TRAIN_LOG = "train.log"
#: Inside a Tune checkpoint: who wrote it, and the runner checkpoint itself.
TRIAL_INFO = "trial.json"
RUNNER_CKPT = "runner"


@dataclass
class TrialResources:
    """Resources Ray reserves for each trial."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.gpu < 0:
            raise ValueError(f"cpu and gpu must be >= 0, got {self.cpu}, {self.gpu}")


@dataclass
class PBTSpec:
    """Population-based training (Ray Tune's ``PopulationBasedTraining``).

    Attributes:
        perturbation_interval: outer steps between exploit/explore decisions (a
            multiple of the base config's ``eval_every``, the reporting interval).
        hyperparam_mutations: dotted ``settings.*`` keys → ``choice``/``uniform``/
            ``loguniform`` specs; only the experiment's mutable settings.
        quantile_fraction: fraction of trials in the top (donors) and bottom
            (exploiters) quantiles.
        resample_probability: chance of resampling a mutated value instead of
            perturbing it by ×1.2 or ×0.8.
        burn_in_period: outer steps before the first perturbation.
        synch: wait for every trial at each interval (deterministic exploits).
    """

    perturbation_interval: int
    hyperparam_mutations: dict[str, dict[str, Any]]
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    burn_in_period: int = 0
    synch: bool = False

    def __post_init__(self) -> None:
        if self.perturbation_interval < 1:
            raise ValueError(f"perturbation_interval must be >= 1, got "
                             f"{self.perturbation_interval}")
        if not 0 < self.quantile_fraction <= 0.5:
            raise ValueError(f"quantile_fraction must be in (0, 0.5], got "
                             f"{self.quantile_fraction}")
        if not 0 <= self.resample_probability <= 1:
            raise ValueError(f"resample_probability must be in [0, 1], got "
                             f"{self.resample_probability}")
        if self.burn_in_period < 0:
            raise ValueError(f"burn_in_period must be >= 0, got {self.burn_in_period}")
        if not self.hyperparam_mutations:
            raise ValueError("hyperparam_mutations must name at least one setting")


@dataclass
class SweepSpec:
    """A validated sweep file (see the module docstring for the format).

    Attributes:
        base: the run config's path (resolved against the sweep file's directory).
        metric: the reported metric that ranks trials (``<split>_<name>`` or
            ``train_<name>``).
        mode: ``min`` or ``max``.
        set: fixed dotted keys applied to the base config.
        search: dotted keys → ``{grid|choice|uniform|loguniform: values}``.
        num_samples: samples of the random keys (per grid point).
        max_concurrent: trials running at once (None: as resources allow).
        resources: per-trial resources.
        keep_checkpoints: Tune checkpoints kept per trial (None: all). Not allowed with
            PBT: Ray would delete a donor's checkpoint that a pending exploit still
            needs (seen with 2: "Could not recover from checkpoint as it does not
            exist on storage anymore").
        pbt: population-based training, or None.
    """

    base: str
    metric: str
    mode: Literal["min", "max"] = "min"
    set: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent: int | None = None
    resources: TrialResources = field(default_factory=TrialResources)
    keep_checkpoints: int | None = None
    pbt: PBTSpec | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.metric:
            raise ValueError("metric must name a reported metric")


@dataclass
class SweepResult:
    """What a finished (or interrupted) sweep produced."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    restored: bool

    @property
    def finished(self) -> bool:
        """Whether every trial ran all its steps."""
        return bool(self.rows) and all(r["state"] == "finished" for r in self.rows)


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and fully check a sweep YAML file (no Ray needed).

    Every problem — an unknown field, a search key the run config does not have, a
    value of the wrong type, an empty grid, a mutation of a setting the experiment
    cannot change mid-run — raises a one-line :class:`ConfigError`.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping")
    if isinstance(data.get("base"), str):
        data["base"] = str((path.parent / data["base"]).resolve())
    return parse_sweep(data, source=str(path))


def parse_sweep(data: Mapping[str, Any], *, source: str = "<sweep>") -> SweepSpec:
    """Validate a sweep mapping (``base`` already an absolute or cwd-relative path)."""
    from metaopt.runner.config import _Context as Context  # one loader, one error style
    from metaopt.runner.config import from_dict

    ctx = Context(source, {})
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a sweep must be a mapping")
    # Built apart so its errors name the field (an optional dataclass would not).
    pbt = data.get("pbt")
    pbt = None if pbt is None else from_dict(PBTSpec, pbt, ctx=ctx, prefix="pbt")
    rest = {k: v for k, v in data.items() if k != "pbt"}
    spec = from_dict(SweepSpec, rest, ctx=ctx, extra={"pbt": pbt})
    spec.base = str(Path(spec.base).resolve())
    for key in [*spec.set, *spec.search]:
        if key.split(".")[0] in OWNED_KEYS:
            raise ConfigError(f"{source}: '{key}' is set by the sweep itself and cannot "
                              f"be set or searched")
    base = _base_config(spec, source)
    for key, dist in spec.search.items():
        for value in _representatives(dist, f"search.{key}", source, KINDS):
            _check_value(base, key, value, f"{source}: search.{key}")
    if spec.pbt is not None:
        _check_pbt(spec, base, source)
    return spec


def _base_config(spec: SweepSpec, source: str) -> dict[str, Any]:
    """The base run config with ``set`` applied, validated, as plain data."""
    from metaopt.runner.config import load_run_config, to_dict

    overrides = [_override(k, v) for k, v in spec.set.items()]
    try:
        cfg = load_run_config(spec.base, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: base/set: {e}") from None
    return to_dict(cfg)


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value as JSON (which YAML reads back unchanged)."""
    return f"{key}={json.dumps(value)}"


def _representatives(dist: Any, where: str, source: str, kinds: Sequence[str]) -> list[Any]:
    """The values to type-check for one search spec (every grid/choice value, both bounds)."""
    if not isinstance(dist, Mapping) or len(dist) != 1:
        raise ConfigError(f"{source}: {where} must be a mapping with exactly one of "
                          f"{', '.join(kinds)}, got {dist!r}")
    (kind, values), = dist.items()
    if kind not in kinds:
        raise ConfigError(f"{source}: {where}: unknown kind '{kind}' (known: "
                          f"{', '.join(kinds)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {where}.{kind} must be a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return list(values)
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise ConfigError(f"{source}: {where}.{kind} must be [low, high] numbers, got "
                          f"{values!r}")
    low, high = (float(v) for v in values)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{source}: {where}.{kind} needs finite low < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{source}: {where}.loguniform needs low > 0, got {values!r}")
    return [low, high]


def _is_number(v: Any) -> bool:
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            float(v)
        except ValueError:
            return False
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(base: Mapping[str, Any], key: str, value: Any, where: str) -> None:
    """Refuse ``key=value`` unless the run config accepts it (key exists, type fits)."""
    from metaopt.runner.config import apply_overrides, parse_run_config

    if not _has_key(base, key):
        raise ConfigError(f"{where}: the run config of experiment '{base['experiment']}' "
                          f"has no key '{key}'")
    data, _ = apply_overrides(base, [_override(key, value)])
    try:
        parse_run_config(data, source=f"{where} = {value!r}")
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _has_key(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _check_pbt(spec: SweepSpec, base: Mapping[str, Any], source: str) -> None:
    from metaopt.runner.builtins import register_builtins
    from metaopt.runner.config import parse_run_config
    from metaopt.runner.experiment import get_experiment

    pbt = spec.pbt
    assert pbt is not None
    if spec.keep_checkpoints is not None:
        raise ConfigError(f"{source}: keep_checkpoints cannot be set with pbt (Ray would "
                          f"delete donor checkpoints that pending exploits restore)")
    every = base["eval_every"]
    if "eval_every" in spec.search:
        raise ConfigError(f"{source}: search.eval_every: pbt needs one reporting interval "
                          f"for every trial")
    if not every:
        raise ConfigError(f"{source}: pbt needs eval_every > 0 in the run config (trials "
                          f"report at evaluations)")
    if pbt.perturbation_interval % every:
        raise ConfigError(f"{source}: pbt.perturbation_interval ({pbt.perturbation_interval}) "
                          f"must be a multiple of eval_every ({every})")
    register_builtins()
    cls = get_experiment(base["experiment"])
    mutable = cls.mutable_settings(parse_run_config(base, source=source).settings)
    allowed = [f"settings.{name}" for name in mutable]
    for key, dist in pbt.hyperparam_mutations.items():
        where = f"pbt.hyperparam_mutations.{key}"
        if key not in allowed:
            raise ConfigError(f"{source}: {where}: experiment '{base['experiment']}' cannot "
                              f"change '{key}' mid-run (mutable: "
                              f"{', '.join(allowed) or 'none'})")
        for value in _representatives(dist, where, source, ("choice", "uniform",
                                                             "loguniform")):
            _check_value(base, key, value, f"{source}: {where}")


def trial_run_config(spec: SweepSpec, params: Mapping[str, Any], run_dir: str | Path) -> Any:
    """The :class:`~metaopt.runner.config.RunConfig` of one trial.

    The base config, then ``set``, then the trial's sampled ``params`` (dotted keys),
    with ``run_dir`` pointing at the trial's run directory.
    """
    from metaopt.runner.config import load_run_config

    overrides = [_override(k, v) for k, v in spec.set.items()]
    overrides += [_override(k, _plain(v)) for k, v in params.items()]
    overrides.append(_override("run_dir", str(run_dir)))
    return load_run_config(spec.base, overrides)


def _plain(v: Any) -> Any:
    """numpy scalars (Tune samples them) as Python values."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict)) else v


def _spec_dict(spec: SweepSpec) -> dict[str, Any]:
    from metaopt.runner.config import to_dict

    return to_dict(spec)


# --------------------------------------------------------------------------- running


def _import_tune() -> Any:
    try:
        from ray import tune
    except ImportError as e:
        raise MissingExtraError("ray", "ray", "metaopt sweep") from e
    return tune


def _tune_domain(tune: Any, dist: Mapping[str, Any], *, pbt: bool = False) -> Any:
    (kind, values), = dist.items()
    if kind == "grid":
        return tune.grid_search(list(values))
    if kind == "choice":
        return list(values) if pbt else tune.choice(list(values))
    low, high = (float(v) for v in values)
    return tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, address: str | None = None,
              command: Sequence[str] = ("metaopt", "sweep"),
              out: Any = None, callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or resume) the sweep ``spec`` in ``sweep_dir``; print progress and a summary.

    Args:
        spec: a sweep from :func:`load_sweep`.
        sweep_dir: where everything goes (see the module docstring); an existing one
            with Tune state is restored, and must hold the same sweep.
        address: Ray cluster to join (``auto``, ``host:port``); None starts a local
            one unless this process already called ``ray.init``.
        command: the command line recorded in each trial's ``env.json``.
        out: where the summary table goes (default stdout; progress lines go to the
            driver's stdout, from a Tune callback).
        callbacks: extra ``ray.tune.Callback`` objects (kept across restores).
    """
    tune = _import_tune()
    import ray

    out = out or sys.stdout
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _claim_sweep_dir(spec, sweep_dir)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False)
        except ConnectionError as e:
            raise ConfigError(f"address {address!r}: no Ray cluster reachable ({e})") \
                from None
    plan = {"spec": _spec_dict(spec), "sweep_dir": str(sweep_dir), "command": list(command)}
    trainable = tune.with_resources(_trainable(plan),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    storage = sweep_dir / TUNE_DIR
    restored = tune.Tuner.can_restore(str(storage))
    if restored:
        print(f"sweep {sweep_dir}: restoring (finished trials are kept)", file=out, flush=True)
        tuner = tune.Tuner.restore(str(storage), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(tune, spec),
                           tune_config=_tune_config(tune, spec),
                           run_config=tune.RunConfig(
                               name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                               # a trial at its last step is done: PBT must not clone
                               # into it (it would end without training or reporting)
                               stop={"finished": True},
                               checkpoint_config=tune.CheckpointConfig(
                                   num_to_keep=spec.keep_checkpoints),
                               callbacks=[_progress_callback(spec.metric),
                                          *callbacks]))
    grid = tuner.fit()
    rows = _rows(grid, spec, sweep_dir)
    best = _best(rows, spec)
    from metaopt.fileio import atomic_write_text

    atomic_write_text(sweep_dir / SUMMARY_FILE,
                      json.dumps({"metric": spec.metric, "mode": spec.mode, "best": best,
                                  "trials": rows}, indent=1) + "\n")
    print(format_table(rows, spec, best), file=out, flush=True)
    unfinished = [r["trial"] for r in rows if r["state"] != "finished"]
    if unfinished:
        print(f"{len(unfinished)} of {len(rows)} trials unfinished; rerun the same command "
              f"to resume them", file=out, flush=True)
    return SweepResult(sweep_dir=sweep_dir, rows=rows, best=best, restored=restored)


def _claim_sweep_dir(spec: SweepSpec, sweep_dir: Path) -> None:
    """Write sweep.yaml, or check that an existing one describes the same sweep."""
    from metaopt.fileio import atomic_write_text

    mine = _spec_dict(spec)
    path = sweep_dir / SWEEP_FILE
    if path.exists():
        theirs = yaml.safe_load(path.read_text())
        diff = [k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k]]
        if diff:
            raise ConfigError(f"{sweep_dir} holds a different sweep ({', '.join(diff)} "
                              f"differ); choose another --dir")
        return
    atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))


def _param_space(tune: Any, spec: SweepSpec) -> dict[str, Any]:
    space = {k: _tune_domain(tune, d) for k, d in spec.search.items()}
    if spec.pbt is not None:  # PBT starts each mutated key from its own distribution
        for k, d in spec.pbt.hyperparam_mutations.items():
            space.setdefault(k, _tune_domain(tune, d))
    return space


def _tune_config(tune: Any, spec: SweepSpec) -> Any:
    scheduler = None
    if spec.pbt is not None:
        from ray.tune.schedulers import PopulationBasedTraining

        p = spec.pbt
        scheduler = PopulationBasedTraining(
            time_attr="step", perturbation_interval=p.perturbation_interval,
            burn_in_period=p.burn_in_period,
            hyperparam_mutations={k: _tune_domain(tune, d, pbt=True)
                                  for k, d in p.hyperparam_mutations.items()},
            quantile_fraction=p.quantile_fraction,
            resample_probability=p.resample_probability, synch=p.synch)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                           num_samples=spec.num_samples,
                           max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                           trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)


def _trial_name(trial: Any) -> str:
    """``trial_<id>``: Tune's unique trial id, also the run directory's name."""
    return f"trial_{trial.trial_id}"


def _trainable(plan: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def metaopt_trial(params: dict[str, Any]) -> None:
        run_trial(plan, params)

    return metaopt_trial


def _progress_callback(metric: str) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One line per trial report, completion and error (the driver's stdout)."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"{trial}: step {result.get('step')}/{result.get('steps')}  "
                  f"{metric}={shown}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"{trial}: finished", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{trial}: failed (see {trial.path})", flush=True)

    return Progress()


# --------------------------------------------------------------------------- one trial


def run_trial(plan: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Body of one Tune trial (runs in a Ray worker): the runner's loop, in intervals.

    ``plan`` holds the resolved sweep, the sweep directory and the command line;
    ``params`` the trial's sampled (or PBT-mutated) dotted keys.
    """
    from ray import tune

    from metaopt.runner.config import from_dict
    from metaopt.runner.rundir import CONFIG_FILE, RunLock, create_run_dir

    spec = from_dict(SweepSpec, plan["spec"])
    name = tune.get_context().get_trial_name()
    run_dir = Path(plan["sweep_dir"]) / TRIALS_DIR / name
    cfg = trial_run_config(spec, params, run_dir)
    command = list(plan["command"])
    with RunLock(run_dir) as lock:
        if not (run_dir / CONFIG_FILE).exists():
            create_run_dir(run_dir, cfg, command)
        restored = tune.get_checkpoint()
        if restored is None:
            if _already_finished(run_dir, cfg):
                tune.report(_final_metrics(run_dir, cfg))
                return
            start = _start_over(run_dir, cfg, command)
        else:
            with restored.as_directory() as d:
                own = _checkpoint_writer(Path(d)) == name
                if own and _already_finished(run_dir, cfg):
                    # Tune's state predates this trial's end (the driver was killed).
                    tune.report(_final_metrics(run_dir, cfg))
                    return
                start = _adopt(Path(d), run_dir, cfg, name, command)
        _train_in_intervals(spec, cfg, run_dir, start, name, lock)


def _checkpoint_writer(tune_ckpt: Path) -> str:
    """The trial that wrote a Tune checkpoint (recorded in it by :func:`_report`)."""
    return json.loads((tune_ckpt / TRIAL_INFO).read_text())["trial"]


def _already_finished(run_dir: Path, cfg: Any) -> bool:
    from metaopt.runner.config import to_yaml
    from metaopt.runner.rundir import CONFIG_FILE, read_status

    status = read_status(run_dir)
    return (status.get("state") == "finished" and status.get("step") == cfg.steps
            and (run_dir / CONFIG_FILE).read_text() == to_yaml(cfg))


def _final_metrics(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """The last train and evaluation records of a finished run, as a Tune report."""
    from metaopt.runner.metrics import read_metrics

    out: dict[str, Any] = {"step": cfg.steps, "steps": cfg.steps, "finished": True,
                           "run_dir": str(run_dir)}
    for r in read_metrics(run_dir):
        if r.get("step") == cfg.steps:
            out.update({f"{r['split']}_{k}": v for k, v in r.items()
                        if k not in ("step", "split", "time_s")})
    return out


def _start_over(run_dir: Path, cfg: Any, command: list[str]) -> int:
    """A trial without a Tune checkpoint starts at step 0 (its run dir may hold a killed
    attempt: its checkpoints are discarded; the runner drops its metrics)."""
    from metaopt.runner.rundir import CHECKPOINTS, record_resume, update_run_config

    if _discard_checkpoints_after(run_dir / CHECKPOINTS, 0):
        record_resume(run_dir, cfg.device, command)
    update_run_config(run_dir, cfg)
    return 0


def _adopt(tune_ckpt: Path, run_dir: Path, cfg: Any, name: str, command: list[str]) -> int:
    """Continue from a Tune checkpoint (this trial's own, or a PBT donor's).

    The contained runner checkpoint is written into this run directory under this
    trial's config, after checking that only mutable settings differ. Returns its step.
    """
    from metaopt.runner.checkpoint import list_checkpoints, read_checkpoint, write_checkpoint
    from metaopt.runner.config import to_dict
    from metaopt.runner.experiment import get_experiment
    from metaopt.runner.rundir import (
        CHECKPOINTS,
        load_run_dir_config,
        record_resume,
        update_run_config,
    )

    info = json.loads((tune_ckpt / TRIAL_INFO).read_text())
    found = list_checkpoints(tune_ckpt / RUNNER_CKPT)
    if len(found) != 1:
        raise MetaoptError(f"Tune checkpoint {tune_ckpt} holds {len(found)} runner "
                           f"checkpoints, expected 1")
    ckpt = read_checkpoint(found[0][1])
    mine = to_dict(cfg)
    mutated = _setting_changes(ckpt.config, mine)
    for key in ("experiment", "seed", "dtype"):
        if ckpt.config.get(key) != mine[key]:
            mutated[key] = (ckpt.config.get(key), mine[key])
    allowed = {f"settings.{n}" for n in
               get_experiment(cfg.experiment).mutable_settings(cfg.settings)}
    refused = sorted(set(mutated) - allowed)
    if refused:
        raise ConfigError(f"trial {name}: cannot continue from {info['trial']}'s checkpoint: "
                          f"'{refused[0]}' differs and experiment '{cfg.experiment}' cannot "
                          f"change it mid-run")
    ckpt_dir = run_dir / CHECKPOINTS
    previous = to_dict(load_run_dir_config(run_dir))
    _discard_checkpoints_after(ckpt_dir, ckpt.step)
    write_checkpoint(ckpt_dir, step=ckpt.step, experiment=cfg.experiment, config=mine,
                     state=ckpt.state)
    own_changes = _setting_changes(previous, mine)
    update_run_config(run_dir, cfg)
    record_resume(run_dir, cfg.device, command, own_changes)
    if info["trial"] != name:
        record = {"step": ckpt.step, "donor": info["trial"], "donor_run_dir": info["run_dir"],
                  "mutated": {k: {"donor": a, "new": b} for k, (a, b) in mutated.items()}}
        with open(run_dir / PBT_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    return ckpt.step


def _setting_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """``{settings.<key>: (old, new)}`` for every setting whose value differs."""
    a, b = old.get("settings") or {}, new.get("settings") or {}
    return {f"settings.{k}": (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)}


def _discard_checkpoints_after(ckpt_dir: Path, step: int) -> list[Path]:
    """Remove this run's checkpoints newer than ``step`` (a lineage being replaced).

    Each is renamed to the runner's hidden ``.trash-`` name first (one atomic step;
    :func:`~metaopt.runner.checkpoint.clean_stale` removes leftovers of a kill).
    """
    from metaopt.runner.checkpoint import list_checkpoints

    gone = []
    for s, path in list_checkpoints(ckpt_dir):
        if s > step:
            trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            gone.append(path)
    return gone


def _train_in_intervals(spec: SweepSpec, cfg: Any, run_dir: Path, start: int, name: str,
                        lock: Any) -> None:
    """The runner's :func:`train` up to each reporting step; report to Tune after each."""
    from ray import tune

    from metaopt.runner.checkpoint import latest_checkpoint
    from metaopt.runner.loop import build_experiment, train
    from metaopt.runner.rundir import CHECKPOINTS, write_status

    every = cfg.eval_every or cfg.steps
    split = _eval_split(cfg)
    resume = latest_checkpoint(run_dir / CHECKPOINTS) if start else None
    step = start
    with open(run_dir / TRAIN_LOG, "a") as log:
        while step < cfg.steps:
            end = min(cfg.steps, (step // every + 1) * every)
            chunk = dataclasses.replace(cfg, steps=end)
            result = train(chunk, run_dir, resume=resume, progress=False, out=log,
                           experiment=build_experiment(chunk), lock=lock)
            if result.status != "finished":
                write_status(run_dir, "interrupted", result.step, cfg.steps)
                return
            if end < cfg.steps:
                write_status(run_dir, "running", end, cfg.steps)
            metrics: dict[str, Any] = {"step": end, "steps": cfg.steps,
                                       "finished": end == cfg.steps, "run_dir": str(run_dir)}
            metrics.update({f"train_{k}": v for k, v in result.train_metrics.items()})
            metrics.update({f"{split}_{k}": v for k, v in result.eval_metrics.items()})
            if spec.metric not in metrics:
                known = ", ".join(k for k in metrics if "_" in k and k != "run_dir")
                raise ConfigError(f"sweep metric '{spec.metric}' is not reported by "
                                  f"experiment '{cfg.experiment}' (reported: {known})")
            _report(tune, metrics, result.checkpoint, name, run_dir)
            resume, step = result.checkpoint, end


def _eval_split(cfg: Any) -> str:
    """The split the runner evaluates periodically (the experiment class's first)."""
    from metaopt.runner.experiment import get_experiment

    splits = get_experiment(cfg.experiment).splits
    return splits[0] if splits else "eval"


def _report(tune: Any, metrics: dict[str, Any], runner_ckpt: Path, name: str,
            run_dir: Path) -> None:
    """``tune.report`` with a Tune checkpoint holding a copy of the runner checkpoint."""
    with tempfile.TemporaryDirectory(prefix=".tune-", dir=run_dir) as tmp:
        shutil.copytree(runner_ckpt, Path(tmp) / RUNNER_CKPT / runner_ckpt.name)
        (Path(tmp) / TRIAL_INFO).write_text(json.dumps(
            {"trial": name, "run_dir": str(run_dir), "step": metrics["step"]}) + "\n")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# --------------------------------------------------------------------------- summary


def _rows(grid: Any, spec: SweepSpec, sweep_dir: Path) -> list[dict[str, Any]]:
    keys = [*spec.search, *(spec.pbt.hyperparam_mutations if spec.pbt else {})]
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        # Tune's trial directory is named like the trial (and its run directory); a
        # reported "run_dir" may be a PBT donor's (PBT copies the donor's last result).
        trial = Path(result.path).name
        run_dir = str(sweep_dir / TRIALS_DIR / trial)
        state = "error" if result.error else (
            "finished" if metrics.get("finished") else "stopped")
        rows.append({"trial": trial, "state": state, "step": metrics.get("step"),
                     "params": {k: _plain(config.get(k)) for k in dict.fromkeys(keys)},
                     spec.metric: metrics.get(spec.metric), "run_dir": run_dir})
    return sorted(rows, key=lambda r: r["trial"])


def _best(rows: list[dict[str, Any]], spec: SweepSpec) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r.get(spec.metric), (int, float))
              and math.isfinite(r[spec.metric])]
    if not scored:
        return None
    pick = min if spec.mode == "min" else max
    return pick(scored, key=lambda r: r[spec.metric])


def format_table(rows: list[dict[str, Any]], spec: SweepSpec,
                 best: dict[str, Any] | None) -> str:
    """The summary table: one line per trial, the best marked ``*``, then the best's run dir."""
    keys = list(rows[0]["params"]) if rows else []
    head = ["", "trial", "state", "step", *keys, spec.metric, "run_dir"]
    lines = [head]
    for r in rows:
        value = r.get(spec.metric)
        lines.append(["*" if best is not None and r is best else "", r["trial"], r["state"],
                      str(r["step"]), *(_short(r["params"][k]) for k in keys),
                      _short(value), str(r["run_dir"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)
    if best is None:
        return text + "\nno trial reported a finite " + spec.metric
    return (text + f"\nbest: {best['trial']}  {spec.metric}={_short(best[spec.metric])}  "
                   f"run dir {best['run_dir']}")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
