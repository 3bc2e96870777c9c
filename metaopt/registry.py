"""Name → object registries, so algorithms, tasks, estimators and pretrained optimizers
plug in without touching the CLI (``metaopt list`` shows them all).

The registries start empty; nothing registers by being imported except through an
explicit decorator or call. metaopt's own entries are added in one place,
:func:`metaopt.runner.builtins.register_builtins` (idempotent), which the CLI and
the config loader call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from metaopt.errors import ConfigError, MetaoptError

T = TypeVar("T")

__all__ = ["ESTIMATORS", "EXPERIMENTS", "PRETRAINED_LOPTS", "TASKS", "Registry",
           "UnknownNameError"]


class UnknownNameError(MetaoptError, KeyError):
    """A name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named collection with a decorator to add entries and helpful look-up errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "",
                 replace: bool = False) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, acts as a decorator.

        Registering the same object under the same name again is a no-op, so
        registration functions are idempotent; a *different* object under a taken
        name raises ``KeyError`` unless ``replace=True``.
        """

        def add(o: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not o:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = o
            doc = help or (getattr(o, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The entry ``name``; :class:`UnknownNameError` (a ``KeyError``) lists the known."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none registered"
            raise UnknownNameError(f"unknown {self.kind} '{name}'; known: {known}") from None

    def check_options(self, name: str, options: Mapping[str, Any]) -> Callable[..., Any]:
        """The callable entry ``name``, after checking it accepts keyword ``options``.

        Raises :class:`~metaopt.errors.ConfigError` for an unknown name or an option
        the entry's signature does not take (listing the ones it does).
        """
        try:
            entry = self.get(name)
        except UnknownNameError as e:
            raise ConfigError(str(e)) from None
        if not callable(entry):
            raise ConfigError(f"{self.kind} '{name}' is not callable")
        try:
            signature = inspect.signature(entry)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            return entry
        params = signature.parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            accepted = [p.name for p in params if p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise ConfigError(f"{self.kind} '{name}' does not accept option(s) "
                                  f"{', '.join(unknown)}; it accepts: "
                                  f"{', '.join(accepted) or 'none'}")
        try:
            signature.bind(**options)
        except TypeError as e:
            raise ConfigError(f"{self.kind} '{name}': {e}") from None
        return entry

    def build(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Call entry ``name`` with keyword ``options``, checked first (:meth:`check_options`).

        A ``ValueError`` or ``TypeError`` raised by the entry itself (an option value
        it refuses) becomes a :class:`~metaopt.errors.ConfigError` naming the entry.
        """
        options = dict(options or {})
        entry = self.check_options(name, options)
        try:
            return entry(**options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.kind} '{name}' with options {options}: {e}") from None

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


#: Runnable experiments (algorithm + task + settings), used by ``metaopt train``.
EXPERIMENTS: Registry = Registry("experiment")
#: Task families and samplers (``tasks/`` registers into this).
TASKS: Registry = Registry("task")
#: Hypergradient estimators by name (filled by ``metaopt.runner.estimators``).
ESTIMATORS: Registry = Registry("estimator")
#: Pretrained learned optimizers loadable by name (``metaopt.lopt.register_pretrained``).
PRETRAINED_LOPTS: Registry = Registry("pretrained learned optimizer")
