"""Name → object registries, so algorithms, tasks, estimators and pretrained optimizers
plug in without touching the CLI (``metaopt list`` shows them all)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["ESTIMATORS", "EXPERIMENTS", "PRETRAINED_LOPTS", "TASKS", "Registry"]


class Registry(Generic[T]):
    """A named collection with a decorator to add entries and helpful look-up errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "",
                 replace: bool = False) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, acts as a decorator."""

        def add(o: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not o:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = o
            doc = help or (getattr(o, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none registered"
            raise KeyError(f"unknown {self.kind} '{name}'; known: {known}") from None

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
#: Hypergradient estimators by name (``metaopt.bilevel`` registers into this).
ESTIMATORS: Registry = Registry("estimator")
#: Pretrained learned optimizers loadable by name (``metaopt.lopt`` registers into this).
PRETRAINED_LOPTS: Registry = Registry("pretrained learned optimizer")
