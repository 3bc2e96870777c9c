"""The project's error hierarchy: every error metaopt raises on purpose is a
:class:`MetaoptError`, so callers can tell "metaopt refused this input" from a bug.

Each class also derives from the built-in exception a caller would already catch
(``ValueError`` for bad input, ``FloatingPointError`` for NaN/inf, ``ImportError``
for a missing optional extra), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FormatError",
    "MetaoptError",
    "MissingExtraError",
    "NonFiniteError",
    "StructureError",
]


class MetaoptError(Exception):
    """Base of every error metaopt raises deliberately."""


class StructureError(MetaoptError, ValueError):
    """Two parameter dicts that should match do not (keys, shapes or dtypes)."""


class NonFiniteError(MetaoptError, FloatingPointError):
    """A NaN or infinity appeared; the message names the tensor and where."""


class ConfigError(MetaoptError, ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class FormatError(MetaoptError, ValueError):
    """A file is unreadable, truncated, malformed or does not match what reads it.

    The message names the file and the field.
    """


class CheckpointError(FormatError):
    """A checkpoint is missing, corrupt, or does not match what is loading it."""


class MissingExtraError(MetaoptError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, what: str = "this feature") -> None:
        super().__init__(f"{what} needs the optional package '{module}': "
                         f"pip install 'metaopt[{extra}]'")
        self.module = module
        self.extra = extra
