"""The hypergradient estimators a run config can name, and building one from a config.

:func:`register_estimators` puts metaopt's estimators into
:data:`metaopt.registry.ESTIMATORS` — this is the one place that does it, and calling
it again changes nothing. Experiments whose settings name an estimator
(``estimator: implicit`` + ``estimator_options: {solver: cg}``) validate and build it
with :func:`check_estimator` / :func:`build_estimator`, so a wrong name or option is a
:class:`~metaopt.errors.ConfigError` when the config is read, before any run
directory exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaopt.bilevel import BOME, F2SA, FirstOrder, Implicit, Unrolled
from metaopt.registry import ESTIMATORS

__all__ = ["BUILTIN_ESTIMATORS", "build_estimator", "check_estimator",
           "register_estimators"]

#: Registry name → estimator class, for every estimator metaopt ships.
BUILTIN_ESTIMATORS = {
    "unrolled": Unrolled,
    "first_order": FirstOrder,
    "implicit": Implicit,
    "f2sa": F2SA,
    "bome": BOME,
}


def register_estimators() -> None:
    """Register metaopt's estimators in ``ESTIMATORS`` (idempotent)."""
    for name, cls in BUILTIN_ESTIMATORS.items():
        ESTIMATORS.register(name, cls)


def build_estimator(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """The estimator registered as ``name``, built with keyword ``options``.

    Raises :class:`~metaopt.errors.ConfigError` for an unknown name, an option the
    class does not take, or a value it refuses.
    """
    register_estimators()
    return ESTIMATORS.build(name, options)


def check_estimator(name: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`~metaopt.errors.ConfigError` unless ``build_estimator`` would work."""
    build_estimator(name, options)
