"""The experiment runner: typed configs, the meta-training loop, checkpoints, plots.

* :mod:`metaopt.runner.experiment` — the :class:`Experiment` contract and registration;
* :mod:`metaopt.runner.config` — YAML → typed, validated :class:`RunConfig`;
* :mod:`metaopt.runner.builtins` — :func:`register_builtins`, the one place metaopt's
  experiments, estimators and tasks are registered.
"""

from metaopt.runner.builtins import register_builtins
from metaopt.runner.config import ConfigError, LogConfig, RunConfig, load_run_config
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    get_experiment,
    register_experiment,
)

__all__ = [
    "ConfigError",
    "Experiment",
    "ExperimentConfig",
    "LogConfig",
    "Metrics",
    "RunConfig",
    "StateDict",
    "get_experiment",
    "load_run_config",
    "register_builtins",
    "register_experiment",
]
