"""Sweep files without Ray: every bad field is a one-line error naming it (fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metaopt.cli import main as cli
from metaopt.distributed.tune import (
    SweepResult,
    format_table,
    load_sweep,
    parse_sweep,
    trial_run_config,
)
from metaopt.errors import ConfigError
from metaopt.runner.config import load_run_config
from metaopt.runner.experiment import get_experiment

ROOT = Path(__file__).resolve().parents[2]
BASE = {"experiment": "sinusoid", "steps": 12, "eval_every": 4,
        "settings": {"hidden": [8], "meta_batch": 2, "eval_tasks": 4}}


@pytest.fixture()
def base(tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def sweep(base: Path, **fields) -> dict:
    return {"base": str(base), "metric": "val_mse_k5_step1", "mode": "min",
            "search": {"settings.inner_lr": {"grid": [0.01, 0.03]}}, **fields}


PBT = {"perturbation_interval": 4,
       "hyperparam_mutations": {"settings.outer_lr": {"loguniform": [1e-4, 1e-2]}}}


def test_shipped_sweeps_load():
    grid = load_sweep(ROOT / "configs/sweeps/maml_sinusoid_lr.yaml")
    assert grid.pbt is None and set(grid.search) == {"settings.inner_lr", "settings.outer_lr"}
    pbt = load_sweep(ROOT / "configs/sweeps/maml_sinusoid_pbt.yaml")
    assert pbt.pbt is not None and pbt.pbt.perturbation_interval == 100
    assert Path(pbt.base) == ROOT / "configs/maml_sinusoid.yaml"


@pytest.mark.parametrize("fields, words", [
    ({"serach": {}}, ["unknown key 'serach'"]),
    ({"mode": "lowest"}, ["mode", "lowest"]),
    ({"num_samples": 0}, ["num_samples must be >= 1"]),
    ({"search": {"settings.nope": {"grid": [1]}}}, ["settings.nope", "no key"]),
    ({"search": {"setings.inner_lr": {"grid": [1]}}}, ["setings.inner_lr", "no key"]),
    ({"search": {"settings.inner_lr": {"grid": ["fast"]}}}, ["settings.inner_lr", "fast"]),
    ({"search": {"settings.inner_lr": {"grid": [-1.0]}}}, ["search.settings.inner_lr",
                                                            "inner_lr"]),
    ({"search": {"settings.hidden": {"choice": [8]}}}, ["settings.hidden", "list"]),
    ({"search": {"settings.inner_lr": {"normal": [0, 1]}}}, ["unknown kind 'normal'"]),
    ({"search": {"settings.inner_lr": {"grid": [1], "choice": [2]}}}, ["exactly one"]),
    ({"search": {"settings.inner_lr": {"grid": []}}}, ["non-empty list"]),
    ({"search": {"settings.inner_lr": {"uniform": [0.1, 0.01]}}}, ["low < high"]),
    ({"search": {"settings.inner_lr": {"uniform": [0.1]}}}, ["[low, high]"]),
    ({"search": {"settings.inner_lr": {"loguniform": [0, 0.1]}}}, ["low > 0"]),
    ({"search": {"run_dir": {"grid": ["a"]}}}, ["'run_dir'", "set by the sweep"]),
    ({"set": {"experiment": "ridge_hyper"}}, ["'experiment'", "set by the sweep"]),
    ({"set": {"settings.meta_batch": "many"}}, ["settings.meta_batch"]),
    ({"resources": {"cpu": -1}}, ["cpu and gpu must be >= 0"]),
    ({"pbt": {**PBT, "hyperparam_mutations": {"settings.hidden": {"choice": [[8]]}}}},
     ["settings.hidden", "cannot change", "mid-run", "settings.inner_lr, settings.outer_lr"]),
    ({"pbt": {**PBT, "hyperparam_mutations": {"seed": {"choice": [1, 2]}}}},
     ["'seed'", "cannot change"]),
    ({"pbt": {**PBT, "perturbation_interval": 6}}, ["multiple of eval_every (4)"]),
    ({"pbt": {**PBT, "quantile_fraction": 0.9}}, ["quantile_fraction"]),
    ({"pbt": {**PBT, "hyperparam_mutations": {"settings.outer_lr": {"grid": [1e-3]}}}},
     ["unknown kind 'grid'"]),
    ({"pbt": {**PBT, "hyperparam_mutations": {}}}, ["at least one setting"]),
    ({"pbt": PBT, "keep_checkpoints": 2}, ["keep_checkpoints cannot be set with pbt"]),
    ({"keep_checkpoints": 0}, ["keep_checkpoints must be >= 1"]),
])
def test_bad_sweep_fields_are_one_line_errors(base, fields, words):
    with pytest.raises(ConfigError) as info:
        parse_sweep(sweep(base, **fields), source="s.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("s.yaml")
    for w in words:
        assert w in message


def test_missing_metric_and_base_are_named(base, tmp_path):
    data = sweep(base)
    del data["metric"]
    with pytest.raises(ConfigError, match="missing required key 'metric'"):
        parse_sweep(data, source="s.yaml")
    with pytest.raises(ConfigError, match="cannot read config file .*nowhere.yaml"):
        parse_sweep(sweep(tmp_path / "nowhere.yaml"))


def test_pbt_refuses_metasgd_inner_lr(base):
    # Meta-SGD's inner_lr only initialises learned rates held in the state.
    data = sweep(base, set={"settings.algorithm": "metasgd"},
                 pbt={**PBT, "hyperparam_mutations": {
                     "settings.inner_lr": {"choice": [0.01, 0.02]}}})
    with pytest.raises(ConfigError, match=r"mutable: settings\.outer_lr\)"):
        parse_sweep(data, source="s.yaml")


def test_mutable_settings_of_experiments():
    cfg = load_run_config(ROOT / "configs/maml_sinusoid.yaml")
    sinusoid = get_experiment("sinusoid")
    assert sinusoid.mutable_settings(cfg.settings) == ("inner_lr", "outer_lr")
    cfg = load_run_config(ROOT / "configs/metasgd_sinusoid.yaml")
    assert sinusoid.mutable_settings(cfg.settings) == ("outer_lr",)
    ridge = load_run_config(ROOT / "configs/ridge_hyper.yaml")
    assert get_experiment("ridge_hyper").mutable_settings(ridge.settings) == ()


def test_trial_config_applies_set_then_params(base, tmp_path):
    spec = parse_sweep(sweep(base, set={"steps": 8, "settings.meta_batch": 3}))
    cfg = trial_run_config(spec, {"settings.inner_lr": 0.03, "seed": 5}, tmp_path / "t")
    assert (cfg.steps, cfg.seed, cfg.settings.meta_batch, cfg.settings.inner_lr) == \
        (8, 5, 3, 0.03)
    assert cfg.run_dir == str(tmp_path / "t") and cfg.settings.hidden == [8]


def test_summary_table_marks_the_best(base):
    spec = parse_sweep(sweep(base))
    rows = [{"trial": f"trial_{i}", "state": "finished", "step": 12,
             "params": {"settings.inner_lr": lr}, "val_mse_k5_step1": m,
             "run_dir": f"/s/trials/trial_{i}"} for i, (lr, m) in enumerate([(0.01, 2.0),
                                                                              (0.03, 1.5)])]
    text = format_table(rows, spec, rows[1])
    lines = text.splitlines()
    assert lines[2].startswith("*  trial_1") and not lines[1].startswith("*")
    assert lines[-1] == "best: trial_1  val_mse_k5_step1=1.5  run dir /s/trials/trial_1"
    assert SweepResult.__dataclass_fields__.keys() >= {"rows", "best", "restored"}


def test_cli_sweep_without_ray_names_the_extra(base, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(base)))
    code = ("import sys; sys.modules['ray'] = None; from metaopt.cli import main; "
            f"sys.exit(main(['sweep', {str(path)!r}, '--dir', {str(tmp_path / 'd')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("metaopt: error: metaopt sweep needs the optional "
                                   "package 'ray': pip install 'metaopt[ray]'")
    assert not (tmp_path / "d").exists()


def test_cli_sweep_bad_file_is_one_line(base, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(base, search={"settings.nope": {"grid": [1]}})))
    assert cli(["sweep", str(path), "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "settings.nope" in err
    assert not (tmp_path / "d").exists()


def test_rerun_on_a_sweep_dir_holding_another_sweep_is_refused(base, tmp_path):
    from metaopt.distributed.tune import _claim_sweep_dir

    _claim_sweep_dir(parse_sweep(sweep(base)), tmp_path)
    _claim_sweep_dir(parse_sweep(sweep(base)), tmp_path)  # the same sweep: fine
    other = parse_sweep(sweep(base, num_samples=2))
    with pytest.raises(ConfigError, match=r"holds a different sweep \(num_samples differ\)"):
        _claim_sweep_dir(other, tmp_path)
