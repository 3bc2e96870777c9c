"""Built-in experiments; importing this package registers them in ``EXPERIMENTS``.

Every module in this package is imported, so an experiment is added by dropping a
file here that uses :func:`metaopt.runner.experiment.register_experiment` — no edit
of this file or the CLI. A module that fails to import (an optional dependency is
missing, or it is being written) does not break the others; its error is kept in
:data:`IMPORT_ERRORS` and shown when a config names an unknown experiment.
"""

from __future__ import annotations

import importlib
import pkgutil

from metaopt.runner.experiments.ridge_hyper import RidgeHyper, RidgeHyperConfig

__all__ = ["IMPORT_ERRORS", "RidgeHyper", "RidgeHyperConfig"]

#: module name → "ExceptionType: message" for experiment modules that failed to import.
IMPORT_ERRORS: dict[str, str] = {}

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_") or _info.name == "ridge_hyper":
        continue
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except Exception as _e:  # keep the other experiments usable
        IMPORT_ERRORS[_info.name] = f"{type(_e).__name__}: {_e}"
