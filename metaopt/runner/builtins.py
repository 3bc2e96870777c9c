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

from metaopt.runner.estimators import register_estimators

__all__ = ["register_builtins"]


def register_builtins() -> None:
    """Register every built-in estimator, task family and experiment (idempotent).

    The experiment modules register themselves with their ``register_experiment``
    decorator when first imported here (importing them again changes nothing).
    """
    register_estimators()
    import tasks  # noqa: F401  (the package registers its task families in TASKS)
    from metaopt.runner.experiments import (  # noqa: F401
        camels,
        few_shot,
        hypercleaning,
        lopt_metatrain,
        ridge_hyper,
        sinusoid,
    )
