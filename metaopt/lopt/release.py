"""Import learned_optimization release checkpoints without JAX.

A release is a folder holding ``params`` — flax's msgpack serialisation of a
``ParameterCheckpoint(params=theta, gen_id, step)`` — and ``config.gin``, the gin
bindings that name the architecture (``run_train.lopt = @HyperV2()``) and its
constructor arguments (``HyperV2.lstm_hidden_size = 512``). This module reads both with
plain ``msgpack`` and a small gin parser, then hands the meta-parameter tree to the
architecture:

    ARCHITECTURES[arch].from_release(params_tree, gin_bindings) -> LearnedOptimizer

(for VeLO and small_fc_lopt that classmethod delegates to
:mod:`metaopt.lopt.release_arch`, which knows their layouts and argument bounds).

Contract for ``from_release``:

* ``params_tree`` — nested ``dict[str, ...]`` of ``numpy.ndarray`` leaves, exactly the
  pytree of theta (keys as JAX wrote them, e.g. ``tree["nn"]["~"]["w0"]``; haiku module
  names can contain ``/``, e.g. ``tree["rnn_params"]["rnn/linear"]["w"]``). Legacy
  named-tuple maps (``{"name", "fields", "values"}``) are already converted to
  ``{field: value}`` maps.
* ``gin_bindings`` — ``{argument: value}`` bound for the architecture's gin class
  (macros resolved; ``@ref`` values arrive as :class:`GinReference`).
* Check the tree with :func:`check_tree` / :func:`check_leaves` (they raise
  :class:`ReleaseFormatError` listing missing / unexpected / mis-shaped / non-float /
  non-finite leaves) and raise :class:`UnsupportedReleaseError` for gin arguments it
  cannot honour.

Hostile input: every malformed file raises :class:`ReleaseFormatError` (a
:class:`~metaopt.errors.FormatError`) naming the file and the field. Files are read only
if they are regular files within :data:`MAX_PARAMS_BYTES` / :data:`MAX_CONFIG_BYTES`;
map nesting is bounded by :data:`MAX_DEPTH`, gin value nesting by
:data:`MAX_GIN_DEPTH` and macro expansion by :data:`MAX_GIN_NODES`; arrays must hold
exactly the bytes their shape and dtype need, and only numeric dtypes decode (theta
leaves must then be floating point and finite). Nothing here unpickles anything:
msgpack maps, strings, numbers and raw bytes only.

Gin class names map to architectures through :data:`RELEASE_CLASS_NAMES` and through an
optional ``release_names: tuple[str, ...]`` attribute on architecture classes.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from metaopt.errors import FormatError
from metaopt.fileio import read_regular_file

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_GIN_DEPTH",
    "MAX_GIN_NODES",
    "MAX_PARAMS_BYTES",
    "RELEASE_CLASS_NAMES",
    "GinConfig",
    "GinMacro",
    "GinReference",
    "GinUnparsed",
    "ReleaseFormatError",
    "UnsupportedReleaseError",
    "architecture_for_release",
    "check_leaves",
    "check_tree",
    "flatten_release_tree",
    "flatten_tree",
    "is_release",
    "load_release",
    "parse_gin",
    "read_flax_msgpack",
    "read_release_params",
]

#: Gin class name in a release's config.gin → metaopt architecture name.
RELEASE_CLASS_NAMES: dict[str, str] = {
    "AdafacMLPLOpt": "small_fc_lopt",
    "HyperV2": "velo",
}

PARAMS_FILE = "params"
CONFIG_FILE = "config.gin"

#: Largest ``params`` file read (the released VeLO is 9 MB).
MAX_PARAMS_BYTES = 1 << 30
#: Largest ``config.gin`` read (released ones are a few kB).
MAX_CONFIG_BYTES = 1 << 18
#: Deepest map nesting accepted in a msgpack tree (theta trees are about 5 deep).
MAX_DEPTH = 64
#: Deepest bracket nesting accepted in a gin value.
MAX_GIN_DEPTH = 64
#: Most values one gin lookup may expand to through macros (stops "billion laughs").
MAX_GIN_NODES = 100_000
#: Highest array rank and largest axis accepted in a msgpack array.
MAX_RANK = 32
MAX_AXIS = 1 << 40

# flax.serialization's msgpack extension codes.
_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
#: dtype names (as flax writes ``x.dtype.name``) that decode; anything else is refused.
_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
})
_LIST_LIMIT = 12  # keys listed per category in an error message


class ReleaseFormatError(FormatError):
    """A release file is unreadable, truncated, or does not match the architecture."""


class UnsupportedReleaseError(ReleaseFormatError, NotImplementedError):
    """The release is well formed but asks for a feature this port does not implement."""


def _short(value: Any, limit: int = 40) -> str:
    """A bounded description of ``value`` (never the repr of a container: it may be
    nested thousands deep)."""
    if isinstance(value, list | tuple | dict | set):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str | bytes):
        value = value[:limit]
    elif not isinstance(value, int | float | bool | None):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _field(path: str) -> str:
    return f"field '{path}'" if path else "the top-level value"


# --------------------------------------------------------------------------- msgpack


def _shape(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ReleaseFormatError(f"{_field(path)}: array shape must be a list, "
                                 f"got {type(value).__name__}")
    if len(value) > MAX_RANK:
        raise ReleaseFormatError(f"{_field(path)}: array rank {len(value)} exceeds {MAX_RANK}")
    for d in value:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_AXIS:
            raise ReleaseFormatError(f"{_field(path)}: array shape {_short(value)} must hold "
                                     f"integers in [0, {MAX_AXIS}]")
    return tuple(value)


def _decode_ndarray(payload: bytes, path: str) -> np.ndarray:
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as err:
        raise ReleaseFormatError(f"{_field(path)}: unreadable array payload "
                                 f"({type(err).__name__}: {err})") from None
    if not isinstance(fields, list | tuple) or len(fields) != 3:
        raise ReleaseFormatError(f"{_field(path)}: an array is (shape, dtype, bytes); "
                                 f"got {type(fields).__name__}")
    shape, dtype_name, buffer = fields
    shape = _shape(shape, path)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii", errors="replace")
    if not isinstance(dtype_name, str):
        raise ReleaseFormatError(f"{_field(path)}: array dtype must be a name, "
                                 f"got {type(dtype_name).__name__}")
    if dtype_name == "bfloat16":
        raise ReleaseFormatError(f"{_field(path)}: bfloat16 arrays are not supported (no "
                                 "ml_dtypes); convert the checkpoint to float32")
    if dtype_name not in _DTYPES:
        raise ReleaseFormatError(f"{_field(path)}: array dtype {_short(dtype_name)} is not "
                                 f"one this reader decodes ({', '.join(sorted(_DTYPES))})")
    if not isinstance(buffer, bytes):
        raise ReleaseFormatError(f"{_field(path)}: array data must be raw bytes, "
                                 f"got {type(buffer).__name__}")
    dtype = np.dtype(dtype_name)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(buffer) != expected:
        raise ReleaseFormatError(
            f"{_field(path)}: array of shape {shape} and dtype {dtype_name} needs {expected} "
            f"bytes, the file holds {len(buffer)} (truncated or corrupt)")
    # Copy: frombuffer views are read-only and keep the whole file alive.
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).reshape(shape).astype(
        dtype.newbyteorder("="), copy=True)


def _decode_ext(ext: msgpack.ExtType, path: str) -> Any:
    if ext.code == _EXT_NDARRAY:
        return _decode_ndarray(ext.data, path)
    if ext.code == _EXT_NPSCALAR:
        value = _decode_ndarray(ext.data, path)
        if value.shape != ():
            raise ReleaseFormatError(f"{_field(path)}: a numpy scalar must have shape (), "
                                     f"got {value.shape}")
        return value[()]
    if ext.code == _EXT_COMPLEX:
        try:
            parts = msgpack.unpackb(ext.data, raw=False)
        except (ValueError, msgpack.UnpackException) as err:
            raise ReleaseFormatError(f"{_field(path)}: unreadable complex number: "
                                     f"{err}") from None
        if (not isinstance(parts, list | tuple) or len(parts) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool)
                           for x in parts)):
            raise ReleaseFormatError(f"{_field(path)}: a complex number is two reals")
        return complex(parts[0], parts[1])
    raise ReleaseFormatError(f"{_field(path)}: unknown msgpack extension type {ext.code}")


def _indexed(node: Any, path: str, what: str) -> list[Any]:
    """A flax-encoded list: a map ``{"0": v0, "1": v1, ...}`` (a plain list also works)."""
    if isinstance(node, list | tuple):
        return list(node)
    if not isinstance(node, Mapping):
        raise ReleaseFormatError(f"{_field(path)}: {what} must be an indexed map, "
                                 f"got {type(node).__name__}")
    try:
        return [node[str(i)] for i in range(len(node))]
    except KeyError:
        raise ReleaseFormatError(f"{_field(path)}: {what} must have keys '0'..'{len(node) - 1}'"
                                 ) from None


def _restore_chunked(node: Mapping[str, Any], path: str, depth: int) -> np.ndarray:
    shape = _shape(_indexed(node.get("shape"), f"{path}/shape", "a chunked array's shape"),
                   f"{path}/shape")
    raw = _indexed(node.get("chunks"), f"{path}/chunks", "a chunked array's chunks")
    chunks = [_restore(c, f"{path}/chunks/{i}", depth + 1) for i, c in enumerate(raw)]
    if not chunks or not all(isinstance(c, np.ndarray) for c in chunks):
        raise ReleaseFormatError(f"{_field(path)}: a chunked array needs one or more array "
                                 "chunks")
    if len({c.dtype for c in chunks}) != 1:
        raise ReleaseFormatError(f"{_field(path)}: chunks of one array have different dtypes")
    total = sum(c.size for c in chunks)
    if total != math.prod(shape):
        raise ReleaseFormatError(f"{_field(path)}: chunks hold {total} numbers, shape "
                                 f"{shape} needs {math.prod(shape)}")
    return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)


def _restore(node: Any, path: str, depth: int) -> Any:
    """Decode extension leaves and undo flax's container encodings (chunked arrays,
    legacy named tuples), with the nesting depth and key types checked."""
    if isinstance(node, msgpack.ExtType):
        return _decode_ext(node, path)
    if not isinstance(node, dict):
        return node
    if depth >= MAX_DEPTH:
        raise ReleaseFormatError(f"{_field(path)}: maps nest deeper than {MAX_DEPTH} levels")
    for key in node:
        if not isinstance(key, str):
            raise ReleaseFormatError(f"{_field(path)}: map key {_short(key)} is not a string")
    if _CHUNKED in node:
        return _restore_chunked(node, path, depth)
    if set(node) == {"name", "fields", "values"} and isinstance(node["fields"], dict):
        names = _indexed(node["fields"], f"{path}/fields", "a named tuple's fields")
        values = _indexed(node["values"], f"{path}/values", "a named tuple's values")
        if len(names) != len(values) or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names):
            raise ReleaseFormatError(f"{_field(path)}: a named tuple needs distinct string "
                                     "field names, one per value")
        return {n: _restore(v, f"{path}/{n}" if path else n, depth + 1)
                for n, v in zip(names, values)}
    return {k: _restore(v, f"{path}/{k}" if path else k, depth + 1) for k, v in node.items()}


def read_flax_msgpack(source: str | os.PathLike | bytes) -> Any:
    """Decode a ``flax.serialization.to_bytes`` blob (or file) into dicts of ndarrays.

    Raises :class:`ReleaseFormatError` naming the file (``<bytes>`` for a blob) and the
    field for anything malformed: a non-regular or oversized file, truncated or trailing
    data, non-string keys, nesting deeper than :data:`MAX_DEPTH`, arrays whose bytes do
    not match their shape and dtype, non-numeric dtypes, unknown extension types.
    """
    name = "<bytes>"
    if not isinstance(source, bytes | bytearray):
        name = str(source)
        source = read_regular_file(source, max_bytes=MAX_PARAMS_BYTES,
                                   error=ReleaseFormatError, what="release params")
    try:
        tree = msgpack.unpackb(bytes(source), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as err:
        raise ReleaseFormatError(
            f"{name} ({len(source)} bytes) is not a complete flax msgpack checkpoint: "
            f"{type(err).__name__}: {err}") from None
    try:
        return _restore(tree, "", 0)
    except ReleaseFormatError as err:
        raise ReleaseFormatError(f"{name}: {err}") from None


def read_release_params(path: str | os.PathLike | bytes) -> dict[str, Any]:
    """The theta tree of a release ``params`` file (the container's ``params`` field)."""
    tree = read_flax_msgpack(path)
    where = "<bytes>" if isinstance(path, bytes | bytearray) else str(path)
    if not isinstance(tree, dict):
        raise ReleaseFormatError(f"{where}: expected a msgpack map, got {type(tree).__name__}")
    if "params" in tree and isinstance(tree["params"], dict):
        return tree["params"]
    return tree


# --------------------------------------------------------------------------- trees


def _check_key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise ReleaseFormatError(f"{_field(path)}: key {_short(key)} is not a string")
    return key


def flatten_tree(tree: Mapping[str, Any],
                 prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{path components: leaf}`` for a nested dict, keys in sorted (JAX) order."""
    if not isinstance(tree, Mapping):
        raise ReleaseFormatError(f"{_field('/'.join(prefix))}: expected a map of arrays, "
                                 f"got {type(tree).__name__}")
    if len(prefix) >= MAX_DEPTH:
        raise ReleaseFormatError(f"{_field('/'.join(prefix))}: maps nest deeper than "
                                 f"{MAX_DEPTH} levels")
    flat: dict[tuple[str, ...], Any] = {}
    for key in sorted(tree, key=str):
        value = tree[key]
        path = (*prefix, _check_key(key, "/".join(prefix)))
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def _legacy_fields(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"fields": [...], "values": [...] or {"0": ...}}`` (old flax named tuples)."""
    names = _indexed(node["fields"], f"{prefix}/fields", "a named tuple's fields")
    values = _indexed(node["values"], f"{prefix}/values", "a named tuple's values")
    if len(names) != len(values) or not all(isinstance(n, str) for n in names):
        raise ReleaseFormatError(f"{_field(prefix)}: a named tuple needs string field names, "
                                 "one per value")
    return dict(zip(names, values))


def flatten_release_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a decoded release pytree to ``"a/b/c"`` keys.

    Accepts the checkpoint container (``{"params": ..., "gen_id": ..., "step": ...}``),
    the ``params`` map itself, or an already flat dict. Haiku ``LSTMState`` leaves in
    the pre-2022 flax layout (``{"name", "fields", "values"}``) are turned into
    ``{"hidden", "cell"}``. Two paths that join to the same key are refused.
    """
    if not isinstance(tree, Mapping):
        raise ReleaseFormatError(f"release params must be a map, got {type(tree).__name__}")
    if "params" in tree and isinstance(tree["params"], Mapping) and "rnn_params" not in tree:
        tree = tree["params"]
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str, depth: int) -> None:
        if isinstance(node, Mapping):
            if depth >= MAX_DEPTH:
                raise ReleaseFormatError(f"{_field(prefix)}: maps nest deeper than "
                                         f"{MAX_DEPTH} levels")
            if {"fields", "values"} <= set(node.keys()):
                node = _legacy_fields(node, prefix)
            for k, v in node.items():
                key = _check_key(k, prefix)
                visit(v, f"{prefix}/{key}" if prefix else key, depth + 1)
        else:
            if prefix in flat:
                raise ReleaseFormatError(f"{_field(prefix)}: two leaves have this path")
            flat[prefix] = node

    visit(tree, "", 0)
    return flat


def _show(path: Hashable) -> str:
    return "/".join(path) if isinstance(path, tuple) else str(path)


def _listing(paths: list[Any]) -> str:
    shown = ", ".join(_show(p) for p in paths[:_LIST_LIMIT])
    more = len(paths) - _LIST_LIMIT
    return shown + (f" and {more} more" if more > 0 else "")


def check_leaves(flat: Mapping[Any, Any], expected: Mapping[Any, tuple[int, ...]],
                 *, what: str = "release params") -> dict[Any, np.ndarray]:
    """Check flat leaves (keyed by path tuples or ``/``-joined strings) against
    ``{path: shape}``; return them as float32 arrays in ``expected``'s order.

    Raises one :class:`ReleaseFormatError` naming every missing, unexpected, mis-shaped,
    non-array, non-floating (int, bool, complex, …) and non-finite leaf at once, so a
    wrong checkpoint is diagnosed in one go. Float64/float16 leaves are converted to
    float32; a value that overflows float32 counts as non-finite.
    """
    missing = [p for p in expected if p not in flat]
    unexpected = [p for p in flat if p not in expected]
    misshaped: list[str] = []
    bad: list[str] = []
    leaves: dict[Any, np.ndarray] = {}
    for p, want in expected.items():
        if p not in flat:
            continue
        value = flat[p]
        if not isinstance(value, np.ndarray | np.generic):
            bad.append(f"key {_show(p)} is a {type(value).__name__}, not an array")
            continue
        got = tuple(np.shape(value))
        if got != tuple(want):
            misshaped.append(f"mis-shaped key {_show(p)}: got {got}, expected {tuple(want)}")
            continue
        if not np.issubdtype(value.dtype, np.floating):
            bad.append(f"key {_show(p)} has dtype {value.dtype}; only floating-point "
                       "meta-parameters are accepted")
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.ascontiguousarray(value, dtype=np.float32)
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            bad.append(f"key {_show(p)} holds {n_bad} NaN or infinite value(s) "
                       "(after conversion to float32)")
            continue
        leaves[p] = arr.copy() if arr is value else arr
    if missing or unexpected or misshaped or bad:
        parts = [f"{what} do not match the architecture"]
        if missing:
            parts.append("missing keys: " + _listing(missing))
        if unexpected:
            parts.append("unexpected keys: " + _listing(unexpected))
        parts.extend(misshaped[:_LIST_LIMIT])
        if len(misshaped) > _LIST_LIMIT:
            parts.append(f"and {len(misshaped) - _LIST_LIMIT} more mis-shaped keys")
        parts.extend(bad[:_LIST_LIMIT])
        if len(bad) > _LIST_LIMIT:
            parts.append(f"and {len(bad) - _LIST_LIMIT} more bad keys")
        raise ReleaseFormatError("; ".join(parts))
    return leaves


def check_tree(tree: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]],
               *, what: str = "release params") -> dict[tuple[str, ...], np.ndarray]:
    """Check a nested theta tree against ``{path components: shape}`` (see
    :func:`check_leaves`); return its leaves as float32 arrays."""
    return check_leaves(flatten_tree(tree), expected, what=what)


# --------------------------------------------------------------------------- gin


@dataclass(frozen=True)
class GinReference:
    """``@scope/name`` or ``@scope/name()`` in a gin value."""

    name: str
    scope: str = ""
    evaluate: bool = False

    @property
    def class_name(self) -> str:
        """Last dotted component (``a.b.HyperV2`` → ``HyperV2``)."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class GinMacro:
    """``%NAME`` in a gin value (resolved by :meth:`GinConfig.bindings_for`)."""

    name: str


@dataclass(frozen=True)
class GinUnparsed:
    """A value this parser does not understand, kept verbatim (only fatal if used)."""

    text: str


@dataclass
class GinConfig:
    """Parsed gin bindings: ``{(scope, selector, argument): value}`` plus macros."""

    bindings: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    macros: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)

    def query(self, selector: str, argument: str, scope: str = "") -> Any:
        """Value of ``scope/selector.argument`` (``KeyError`` if unbound; macros
        resolved as in :meth:`resolve`)."""
        for (s, sel, arg), value in self.bindings.items():
            if s == scope and _short_selector(sel) == _short_selector(selector) and arg == argument:
                return self.resolve(value)
        raise KeyError(f"{scope + '/' if scope else ''}{selector}.{argument}")

    def bindings_for(self, class_name: str, scope: str = "") -> dict[str, Any]:
        """Constructor arguments bound for ``class_name`` (unscoped, then ``scope``)."""
        out: dict[str, Any] = {}
        for wanted in ("", scope) if scope else ("",):
            for (s, sel, arg), value in self.bindings.items():
                if s == wanted and _short_selector(sel) == class_name:
                    out[arg] = self.resolve(value)
        return out

    def resolve(self, value: Any) -> Any:
        """Replace ``%MACRO`` references (recursively, inside containers too).

        Raises :class:`ReleaseFormatError` for an undefined macro, a cycle or nesting
        deeper than 2 x :data:`MAX_GIN_DEPTH`, and for an expansion of more than
        :data:`MAX_GIN_NODES` values (macros that double at every level).
        """
        return self._resolve(value, 0, [MAX_GIN_NODES])

    def _resolve(self, value: Any, depth: int, budget: list[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ReleaseFormatError(f"gin value expands to more than {MAX_GIN_NODES} "
                                     "values through macros")
        if depth > 2 * MAX_GIN_DEPTH:
            raise ReleaseFormatError("gin macros nest too deeply (cycle?)")
        if isinstance(value, GinMacro):
            if value.name not in self.macros:
                raise ReleaseFormatError(f"gin macro %{value.name} is not defined")
            return self._resolve(self.macros[value.name], depth + 1, budget)
        if isinstance(value, list | tuple):
            return type(value)(self._resolve(v, depth + 1, budget) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v, depth + 1, budget) for k, v in value.items()}
        return value


def _short_selector(selector: str) -> str:
    return selector.rsplit(".", 1)[-1]


def _split_statements(text: str) -> list[str]:
    """Split gin text into statements: comments dropped, brackets/strings/\\ joined."""
    statements, buf = [], []
    depth, quote, i, n = 0, "", 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < n:
                buf.append(text[i + 1])
                i += 2
                continue
            if text.startswith(quote, i):
                buf.extend(quote[1:])
                i += len(quote)
                quote = ""
                continue
        elif ch in "'\"":
            quote = text[i:i + 3] if text[i:i + 3] in ("'''", '"""') else ch
            buf.append(quote)
            i += len(quote)
            continue
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif ch == "\\" and text[i + 1:i + 2] == "\n":
            buf.append(" ")
            i += 2
            continue
        elif ch in "([{":
            depth += 1
            buf.append(ch)
        elif ch in ")]}":
            depth -= 1
            buf.append(ch)
        elif ch == "\n" and depth <= 0:
            statements.append("".join(buf).strip())
            buf, depth = [], 0
        else:
            buf.append(ch)
        i += 1
    statements.append("".join(buf).strip())
    return [s for s in statements if s]


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>[rRbBuU]{0,2}(?:'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"))
    | (?P<ref>@[A-Za-z_][\w./]*)
    | (?P<macro>%[A-Za-z_][\w./]*)
    | (?P<num>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf|nan))
    | (?P<name>[A-Za-z_][\w.]*)
    | (?P<punct>[()\[\]{},:])
    )""", re.VERBOSE | re.DOTALL)


class _ValueParser:
    """Recursive-descent parser for gin values (Python literals + @refs + %macros)."""

    def __init__(self, text: str) -> None:
        self.depth = 0
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"cannot tokenize gin value at {text[pos:pos + 20]!r}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        value = self.value()
        if self.peek()[0] != "end":
            raise ValueError(f"trailing text after value: {self.peek()[1]!r}")
        return value

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "str":  # adjacent literals concatenate, as in Python
            value = ast.literal_eval(text)
            while self.peek()[0] == "str":
                value = value + ast.literal_eval(self.take()[1])
            return value
        if kind == "num":
            return ast.literal_eval(text) if text not in ("inf", "nan") else float(text)
        if kind == "name":
            consts = {"True": True, "False": False, "None": None}
            if text in consts:
                return consts[text]
            raise ValueError(f"bare name {text!r} is not a gin value")
        if kind == "ref":
            path = text[1:]
            scope, _, name = path.rpartition("/")
            evaluate = False
            if self.peek()[1] == "(":
                self.take("(")
                self.take(")")
                evaluate = True
            return GinReference(name=name, scope=scope, evaluate=evaluate)
        if kind == "macro":
            return GinMacro(text[1:])
        if text in ("[", "(", "{"):
            self.depth += 1
            if self.depth > MAX_GIN_DEPTH:
                raise ValueError(f"brackets nest deeper than {MAX_GIN_DEPTH} levels")
            if text == "[":
                value = self.sequence("]", list)
            elif text == "(":
                value = self.sequence(")", tuple)
            else:
                value = self.mapping()
            self.depth -= 1
            return value
        raise ValueError(f"unexpected token {text[:20]!r}")

    def sequence(self, close: str, kind: type) -> Any:
        items, trailing_comma = [], False
        while self.peek()[1] != close:
            items.append(self.value())
            trailing_comma = False
            if self.peek()[1] == ",":
                self.take(",")
                trailing_comma = True
            elif self.peek()[1] != close:
                raise ValueError(f"expected ',' or {close!r}, found {self.peek()[1]!r}")
        self.take(close)
        if kind is tuple and len(items) == 1 and not trailing_comma:
            return items[0]  # parenthesised expression, not a tuple
        return kind(items)

    def mapping(self) -> dict[Any, Any]:
        out = {}
        while self.peek()[1] != "}":
            key = self.value()
            if not isinstance(key, Hashable):
                raise ValueError(f"a {type(key).__name__} cannot be a dict key")
            self.take(":")
            out[key] = self.value()
            if self.peek()[1] == ",":
                self.take(",")
        self.take("}")
        return out


_BINDING = re.compile(r"^(?P<key>[A-Za-z_][\w./]*)\s*=\s*(?P<value>.*)$", re.DOTALL)


def parse_gin(text: str) -> GinConfig:
    """Parse the gin subset used by learned_optimization's ``config.gin`` files.

    Handles comments, ``import``/``from … import``/``include`` lines (recorded, not
    followed), bindings ``[scope/]selector.argument = value``, macros ``NAME = value``,
    multi-line values in brackets and ``\\`` continuations. Values are Python literals,
    ``@ref``/``@ref()``, ``%macro`` and containers of these. A value this parser cannot
    read becomes :class:`GinUnparsed` (training-only bindings need not be understood;
    an architecture argument that is unparsed is refused when it is used). A statement
    that is not a binding raises :class:`ReleaseFormatError`.
    """
    config = GinConfig()
    for statement in _split_statements(text):
        if statement.startswith(("import ", "from ")):
            config.imports.append(statement)
            continue
        if statement.startswith("include "):
            config.includes.append(statement[len("include "):].strip().strip("'\""))
            continue
        m = _BINDING.match(statement)
        if not m:
            raise ReleaseFormatError(f"cannot parse gin statement: {statement[:200]!r}")
        key, raw = m.group("key"), m.group("value").strip()
        try:
            value = _ValueParser(raw).parse()
        except (ValueError, SyntaxError, TypeError):
            value = GinUnparsed(raw)
        scope, _, selector_arg = key.rpartition("/")
        if "." not in selector_arg:
            config.macros[key] = value
            continue
        selector, _, argument = selector_arg.rpartition(".")
        config.bindings[(scope, selector, argument)] = value
    return config


# --------------------------------------------------------------------------- loading


def _known_release_names() -> dict[str, str]:
    from metaopt.lopt.base import ARCHITECTURES

    names = dict(RELEASE_CLASS_NAMES)
    for arch, cls in ARCHITECTURES.items():
        for name in getattr(cls, "release_names", ()):
            names[name] = arch
    return names


def _release_paths(path: str | os.PathLike, config_path: str | os.PathLike | None
                   ) -> tuple[Path, Path]:
    path = Path(path)
    params = path / PARAMS_FILE if path.is_dir() else path
    config = Path(config_path) if config_path is not None else params.parent / CONFIG_FILE
    if not params.is_file():
        raise ReleaseFormatError(f"release params file not found: {params}")
    if not config.is_file():
        raise ReleaseFormatError(
            f"release config not found: {config} (a release folder holds "
            f"'{PARAMS_FILE}' and '{CONFIG_FILE}')")
    return params, config


def is_release(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a release folder (``params`` + ``config.gin``) or its params file."""
    p = Path(path)
    params = p / PARAMS_FILE if p.is_dir() else p
    return params.is_file() and (params.parent / CONFIG_FILE).is_file()


def architecture_for_release(config: GinConfig) -> tuple[str, dict[str, Any]]:
    """``(architecture name, constructor bindings)`` named by a release's gin config."""
    names = _known_release_names()
    ref: Any = None
    for (scope, selector, argument), value in config.bindings.items():
        if scope == "" and _short_selector(selector) == "run_train" and argument == "lopt":
            ref = config.resolve(value)
    if ref is None:  # no run_train.lopt: accept a config binding exactly one known class
        bound = {_short_selector(sel) for (_, sel, _) in config.bindings} & set(names)
        if len(bound) != 1:
            raise ReleaseFormatError(
                "config.gin does not bind run_train.lopt and does not name exactly one "
                f"known learned optimizer (known gin classes: {', '.join(sorted(names))})")
        ref = GinReference(name=bound.pop(), evaluate=True)
    if not isinstance(ref, GinReference):
        raise ReleaseFormatError(f"run_train.lopt must be a @reference, got {_short(ref)}")
    if ref.class_name not in names:
        raise ReleaseFormatError(
            f"config.gin names learned optimizer {ref.class_name!r}, which metaopt cannot "
            f"import (known: {', '.join(sorted(names))})")
    return names[ref.class_name], config.bindings_for(ref.class_name, ref.scope)


def read_gin_file(path: str | os.PathLike) -> str:
    """The text of a ``config.gin`` (a regular UTF-8 file of at most
    :data:`MAX_CONFIG_BYTES`), or :class:`ReleaseFormatError` naming the file."""
    data = read_regular_file(path, max_bytes=MAX_CONFIG_BYTES, error=ReleaseFormatError,
                             what="release config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ReleaseFormatError(f"{path}: release config is not UTF-8 text (byte "
                                 f"{err.start}: {err.reason})") from None


def load_release(path: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
                 extra_bindings: Iterable[str] = ()):
    """Build a learned optimizer from a learned_optimization release.

    ``path`` is a release folder (holding ``params`` and ``config.gin``) or the params
    file itself (``config.gin`` is then looked up beside it, as the reference does).
    ``extra_bindings`` are gin lines applied after the file (e.g. to override an
    argument). Returns the architecture's ``from_release`` result. Malformed files raise
    :class:`ReleaseFormatError` (:class:`UnsupportedReleaseError` for features the port
    lacks) naming the file.
    """
    from metaopt.lopt.base import ARCHITECTURES

    params_path, config_file = _release_paths(path, config_path)
    text = read_gin_file(config_file)
    try:
        config = parse_gin(text + "\n" + "\n".join(extra_bindings))
        arch, bindings = architecture_for_release(config)
    except ReleaseFormatError as err:
        raise type(err)(f"{config_file}: {err}") from None
    if arch not in ARCHITECTURES:
        raise ReleaseFormatError(
            f"{config_file}: architecture {arch!r} is not available (registered: "
            f"{', '.join(sorted(ARCHITECTURES)) or 'none'})")
    tree = read_release_params(params_path)
    try:
        return ARCHITECTURES[arch].from_release(tree, bindings)
    except ReleaseFormatError as err:
        raise type(err)(f"{params_path} (with {config_file.name}): {err}") from None
