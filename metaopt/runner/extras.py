"""Optional dependencies checked up front: a command that needs an extra says so at once.

``require_extras([("matplotlib", "plot")], "metaopt plot")`` raises
:class:`~metaopt.errors.MissingExtraError` (one line: ``metaopt plot needs the
optional package 'matplotlib': pip install 'metaopt[plot]'``) before any work starts,
instead of a ``ModuleNotFoundError`` after a training run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from metaopt.errors import MissingExtraError

__all__ = ["PLOT", "require_extras"]

#: What plotting needs.
PLOT = (("matplotlib", "plot"),)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or not a package
        return False


def require_extras(needs: Iterable[tuple[str, str]], what: str) -> None:
    """Raise :class:`MissingExtraError` for the first ``(module, extra)`` not installed."""
    for module, extra in needs:
        if not _installed(module):
            raise MissingExtraError(module, extra, what)
