"""The experiment runner: typed configs, the meta-training loop, checkpoints, plots.

* :mod:`metaopt.runner.experiment` — the :class:`Experiment` contract and registration;
* :mod:`metaopt.runner.config` — YAML → typed, validated :class:`RunConfig`.
"""

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
    "register_experiment",
]
