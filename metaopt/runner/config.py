"""YAML files → typed, validated config dataclasses, with ``key.sub=value`` overrides.

A run config has generic fields (which experiment, seed, device, dtype, how many
outer steps, when to evaluate and checkpoint, logging) and one typed section,
``settings:``, whose dataclass is the registered experiment's ``Config``::

    experiment: ridge_hyper
    seed: 0
    steps: 200
    eval_every: 20
    settings:
      n_features: 20
      estimator: implicit
    executor: {kind: ray, num_workers: 2}   # optional; see runner/executor_config.py

Overrides use dotted keys and YAML values: ``settings.n_features=50``,
``log.progress=false``, ``settings.hidden=[40,40]``.

Every problem — an unknown key, a wrong type, a missing required field, a value
rejected by a dataclass's ``__post_init__`` — raises :class:`ConfigError` naming the
key, the expected type and where the value came from (file or override).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from metaopt.errors import ConfigError
from metaopt.runner.builtins import register_builtins
from metaopt.runner.executor_config import ExecutorConfig
from metaopt.runner.experiment import ExperimentConfig, get_experiment

__all__ = [
    "ConfigError",
    "ExecutorConfig",
    "LogConfig",
    "RunConfig",
    "apply_overrides",
    "from_dict",
    "load_run_config",
    "parse_run_config",
    "resume_overrides",
    "to_dict",
    "to_yaml",
]

T = TypeVar("T")

DTYPES = ("float32", "float64")
#: Top-level keys ``metaopt resume RUN_DIR KEY=VALUE`` may change (the others define
#: the run: changing them would not continue the same run). ``executor`` says where
#: the work runs, not what it computes.
RESUMABLE_KEYS = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log",
                  "executor")


@dataclass
class LogConfig:
    """How a run reports progress.

    Attributes:
        progress: show a tqdm bar (only when stderr is a terminal).
        tensorboard: also write TensorBoard event files when tensorboard is installed.
        print_every: without a bar (output not a terminal), print a one-line summary
            every this many steps (``None``: every ``steps // 20``; 0: only
            evaluations and the end).
    """

    progress: bool = True
    tensorboard: bool = True
    print_every: int | None = None

    def __post_init__(self) -> None:
        if self.print_every is not None and self.print_every < 0:
            raise ValueError("must be >= 0")


@dataclass
class RunConfig:
    """A complete, validated run: generic loop settings plus the experiment's own.

    Attributes:
        experiment: registered experiment name (``metaopt list`` shows them).
        steps: number of outer (meta) steps.
        settings: the experiment's typed config (its ``Config`` dataclass).
        seed: seeds Python ``random``, NumPy and torch before the experiment is built.
        device: torch device string (``cpu``, ``cuda``, ``cuda:1``).
        dtype: default floating dtype handed to the experiment.
        eval_every: evaluate on the experiment's first split every this many steps
            (0: only at the end).
        checkpoint_every: checkpoint every this many steps (0: only at the end and
            on SIGINT/SIGTERM).
        keep_checkpoints: keep only the newest this many checkpoints (0: keep all).
        name: run name shown in plot legends (default: the run directory's name).
        run_dir: where the run writes (default: ``runs/<experiment>-<timestamp>``).
        log: progress and logging settings.
        executor: where meta-steps run (default: this process; see
            :mod:`metaopt.runner.executor_config`).
    """

    experiment: str
    steps: int
    settings: ExperimentConfig = field(default_factory=ExperimentConfig)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    name: str | None = None
    run_dir: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        for what in ("steps",):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1, got {getattr(self, what)}")
        for what in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, what) < 0:
                raise ValueError(f"{what} must be >= 0, got {getattr(self, what)}")


# --------------------------------------------------------------------------- loading


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides, validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got "
                          f"{type(data).__name__}")
    data, overridden = apply_overrides(data, overrides)
    return parse_run_config(data, source=str(path), overridden=overridden)


def parse_run_config(data: Mapping[str, Any], *, source: str = "<dict>",
                     overridden: Mapping[str, str] | None = None) -> RunConfig:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`RunConfig`.

    The ``settings`` section is typed by the ``Config`` of the experiment that
    ``experiment`` names (the built-in experiments are registered first). Semantic
    checks — registry names, options accepted by the named class — run in the
    settings dataclass's ``__post_init__``, so every problem surfaces here.
    """
    ctx = _Context(source, dict(overridden or {}))
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    name = data.get("experiment")
    if name is None:
        raise ConfigError(f"{source}: missing required key 'experiment' (expected str: "
                          "a registered experiment name; see `metaopt list`)")
    if not isinstance(name, str):
        raise ConfigError(f"{ctx.where('experiment')}: key 'experiment': expected str, "
                          f"got {_show(name)}")
    register_builtins()
    try:
        exp_cls = get_experiment(name)
    except KeyError as e:
        raise ConfigError(f"{ctx.where('experiment')}: key 'experiment': {e.args[0]}") from None
    settings = from_dict(exp_cls.Config, data.get("settings") or {}, ctx=ctx, prefix="settings")
    rest = {k: v for k, v in data.items() if k != "settings"}
    cfg = from_dict(RunConfig, rest, ctx=ctx, prefix="", extra={"settings": settings})
    if not cfg.executor.is_default:
        try:
            exp_cls.check_executor(settings, cfg.executor)
        except ConfigError as e:
            raise ConfigError(f"{ctx.where('executor')}: {e}") from None
    return cfg


def from_dict(cls: type[T], data: Any, *, ctx: _Context | None = None, prefix: str = "",
              extra: Mapping[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    ``extra`` supplies already-built field values (not type-checked again).
    """
    ctx = ctx or _Context("<dict>", {})
    return _build_dataclass(cls, data, ctx, prefix, dict(extra or {}))


def apply_overrides(data: Mapping[str, Any],
                    overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a copy of ``data``.

    Returns the new mapping and ``{dotted key: override text}`` for error messages.
    """
    out = _deep_copy(data)
    overridden: dict[str, str] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, "
                              "e.g. settings.lr=0.1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(parts[:i + 1])}' is a "
                                  f"{type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
        overridden[key] = text
    return out, overridden


def resume_overrides(cfg: RunConfig, overrides: Sequence[str]
                     ) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
    """``cfg`` with ``key=value`` overrides given to ``metaopt resume`` applied.

    Only :data:`RESUMABLE_KEYS` (and keys under ``log``) may change, e.g.
    ``steps=600`` extends a finished 300-step run. Returns the new config and
    ``{key: (old, new)}`` for each top-level key whose value changed.
    """
    data, overridden = apply_overrides(to_dict(cfg), overrides)
    for key, text in overridden.items():
        if key.split(".")[0] not in RESUMABLE_KEYS:
            raise ConfigError(f"override '{text}': '{key}' cannot change when resuming (it "
                              f"defines the run); resume may change: "
                              f"{', '.join(RESUMABLE_KEYS)}")
    new = parse_run_config(data, source="resume", overridden=overridden)
    before, after = to_dict(cfg), to_dict(new)
    changes = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    return new, changes


# --------------------------------------------------------------------------- dumping


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, loadable again by :func:`load_run_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- internals


@dataclass
class _Context:
    source: str
    overridden: dict[str, str]

    def where(self, key: str) -> str:
        """Where the value at dotted ``key`` came from: an override or the file."""
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            text = self.overridden.get(".".join(parts[:i]))
            if text is not None:
                return f"{self.source} (override '{text}')"
        return self.source


def _build_dataclass(cls: type[T], data: Any, ctx: _Context, prefix: str,
                     extra: dict[str, Any]) -> T:
    section = prefix or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{ctx.where(prefix)}: key '{section}': expected a mapping "
                          f"({cls.__name__}), got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = _join(prefix, str(key))
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"{ctx.where(full)}: unknown key '{full}' "
                              f"(known keys in {section}: {known})")
    kwargs: dict[str, Any] = dict(extra)
    for name, f in fields.items():
        if name in kwargs:
            continue
        full = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{ctx.where(full)}: missing required key '{full}' "
                                  f"(expected {_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(hints[name], data[name], ctx, full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{ctx.where(prefix)}: invalid {section} ({cls.__name__}): {e}") \
            from None


def _convert(tp: Any, value: Any, ctx: _Context, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (int→float, list→tuple, …)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{ctx.where(key)}: key '{key}': expected {_type_name(tp)}, "
                          f"got {_show(value)}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, ctx, key)
            except ConfigError:
                continue
        fail()
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        fail()
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        return _build_dataclass(tp, value, ctx, key, {})
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                fail()
            return tuple(_convert(a, v, ctx, f"{key}[{i}]")
                         for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, ctx, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            fail()
        vt = args[1] if args else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{ctx.where(key)}: key '{key}': mapping keys must be "
                                  f"strings, got {_show(k)}")
            out[k] = _convert(vt, v, ctx, f"{key}.{k}")
        return out
    raise ConfigError(f"{ctx.where(key)}: key '{key}': unsupported field type "
                      f"{_type_name(tp)} in the config dataclass")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
