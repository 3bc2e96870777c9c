"""The one place metaopt's built-in experiments, estimators and tasks are registered.

:func:`register_builtins` fills :data:`metaopt.registry.EXPERIMENTS`,
``ESTIMATORS`` and ``TASKS`` explicitly from the fixed list below (no directory
scan, no swallowed import errors: a built-in that fails to import is a bug and says
so). It is idempotent; :func:`metaopt.runner.config.parse_run_config` and the CLI
call it, and a script that looks names up in the registries itself calls it first.

Your own experiment registers with :func:`metaopt.runner.experiment.register_experiment`
when its module is imported; import that module before loading a config naming it.
"""

from __future__ import annotations

import importlib

from metaopt.runner.estimators import register_estimators

__all__ = ["BUILTIN_EXPERIMENT_MODULES", "register_builtins"]

#: Modules whose import registers metaopt's experiments (each with its decorator).
BUILTIN_EXPERIMENT_MODULES = (
    "metaopt.runner.experiments.ridge_hyper",
    "metaopt.runner.experiments.hypercleaning",
    "metaopt.runner.experiments.few_shot",
    "metaopt.runner.experiments.sinusoid",
)


def register_builtins() -> None:
    """Register every built-in estimator, task family and experiment (idempotent)."""
    register_estimators()
    importlib.import_module("tasks")  # its package registers the task families in TASKS
    for module in BUILTIN_EXPERIMENT_MODULES:
        importlib.import_module(module)
