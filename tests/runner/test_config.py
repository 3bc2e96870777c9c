"""Config loading: typed values, overrides, and errors that name key, type and source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from metaopt.runner.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
    parse_run_config,
    to_yaml,
)
from metaopt.runner.experiment import Experiment, ExperimentConfig, register_experiment
from metaopt.runner.experiments.ridge_hyper import RidgeHyperConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Inner:
    width: int = 4
    acts: list[str] = field(default_factory=lambda: ["relu"])


@dataclass
class ToyConfig(ExperimentConfig):
    lr: float  # required
    depth: int = 2
    shape: tuple[int, ...] = (1, 2)
    scale: float | None = None
    mode: str = "a"
    inner: Inner = field(default_factory=Inner)
    extras: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@register_experiment("cfg_toy", config=ToyConfig)
class CfgToy(Experiment):
    """Config-only toy experiment."""

    def __init__(self, config, *, device, dtype, seed):  # pragma: no cover - not built
        raise NotImplementedError

    meta_step = evaluate = state_dict = load_state_dict = __init__


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = "experiment: cfg_toy\nsteps: 5\nsettings:\n  lr: 0.1\n"


def test_valid_file_gives_typed_objects(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE + "  shape: [3, 4]\n  inner: {width: 8}\n"
                                "  extras: {a: 1}\n"))
    assert isinstance(cfg, RunConfig) and isinstance(cfg.settings, ToyConfig)
    assert cfg.settings.lr == 0.1 and cfg.settings.shape == (3, 4)
    assert cfg.settings.inner == Inner(width=8) and cfg.settings.extras == {"a": 1}
    assert cfg.log.progress is True and cfg.dtype == "float32"


def test_int_is_accepted_for_float_and_yaml_exponent_strings(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE), ["settings.lr=1", "settings.scale=1e-3"])
    assert cfg.settings.lr == 1.0 and isinstance(cfg.settings.lr, float)
    assert cfg.settings.scale == pytest.approx(1e-3)


@pytest.mark.parametrize("extra, key", [("bogus: 1\n", "bogus"),
                                        ("log:\n  colour: red\n", "log.colour")])
def test_unknown_key_is_named_with_file(tmp_path, extra, key):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key '{key}'"):
        load_run_config(path)


def test_unknown_nested_settings_key(tmp_path):
    path = write(tmp_path, BASE + "  inner: {widht: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'settings.inner.widht'.*known keys.*width"):
        load_run_config(path)


@pytest.mark.parametrize("line, key, expected", [
    ("  depth: 2.5\n", "settings.depth", "expected int"),
    ("  depth: true\n", "settings.depth", "expected int"),
    ("  mode: 3\n", "settings.mode", "expected str"),
    ("  shape: 7\n", "settings.shape", r"expected tuple\[int, \.\.\.\]"),
    ("  shape: [1, x]\n", r"settings.shape\[1\]", "expected int"),
    ("  scale: abc\n", "settings.scale", "expected float | null"),
    ("  extras: {a: b}\n", "settings.extras.a", "expected int"),
])
def test_wrong_type_names_key_type_and_file(tmp_path, line, key, expected):
    path = write(tmp_path, BASE + line)
    with pytest.raises(ConfigError, match=rf"{path}: key '{key}': {expected}, got"):
        load_run_config(path)


def test_wrong_literal_dtype(tmp_path):
    path = write(tmp_path, "dtype: float16\n" + BASE)
    with pytest.raises(ConfigError, match=r"key 'dtype': expected one of 'float32', 'float64'"):
        load_run_config(path)


def test_missing_required_fields(tmp_path):
    path = write(tmp_path, "experiment: cfg_toy\nsteps: 5\nsettings: {}\n")
    with pytest.raises(ConfigError, match=rf"{path}: missing required key 'settings.lr' "
                                          r"\(expected float\)"):
        load_run_config(path)
    path = write(tmp_path, "experiment: cfg_toy\nsettings: {lr: 1}\n")
    with pytest.raises(ConfigError, match=r"missing required key 'steps' \(expected int\)"):
        load_run_config(path)
    path = write(tmp_path, "steps: 3\n")
    with pytest.raises(ConfigError, match=r"missing required key 'experiment'"):
        load_run_config(path)


def test_unknown_experiment_lists_known_ones(tmp_path):
    path = write(tmp_path, "experiment: nope\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope'.*ridge_hyper"):
        load_run_config(path)


def test_value_checks_from_post_init_name_the_file(tmp_path):
    path = write(tmp_path, BASE + "  depth: 0\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid settings.*depth must be >= 1"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"steps must be >= 1"):
        load_run_config(path, ["steps=0", "settings.depth=1"])


def test_overrides_apply_and_errors_name_the_override(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_run_config(path, ["settings.inner.acts=[tanh, relu]", "seed=7",
                                 "log.progress=false"])
    assert cfg.settings.inner.acts == ["tanh", "relu"] and cfg.seed == 7
    assert cfg.log.progress is False
    with pytest.raises(ConfigError, match=r"override 'settings.depth=deep'.*key "
                                          r"'settings.depth': expected int"):
        load_run_config(path, ["settings.depth=deep"])
    with pytest.raises(ConfigError, match=r"override 'settings.nope=1'.*unknown key"):
        load_run_config(path, ["settings.nope=1"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["settings.lr"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["a..b=1"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE), ["settings.shape=[5]"])
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_run_config(again) == cfg


def test_shipped_ridge_config_is_valid():
    cfg = load_run_config(REPO / "configs" / "ridge_hyper.yaml")
    assert isinstance(cfg.settings, RidgeHyperConfig) and cfg.experiment == "ridge_hyper"


def test_parse_from_dict_without_file():
    with pytest.raises(ConfigError, match=r"<dict>: key 'seed': expected int"):
        parse_run_config({"experiment": "cfg_toy", "steps": 1, "seed": "x",
                          "settings": {"lr": 1}})
