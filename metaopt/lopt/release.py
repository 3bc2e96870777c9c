"""Import learned_optimization release checkpoints without JAX.

A release is a folder holding ``params`` — flax's msgpack serialisation of a
``ParameterCheckpoint(params=theta, gen_id, step)`` — and ``config.gin``, the gin
bindings that name the architecture (``run_train.lopt = @HyperV2()``) and its
constructor arguments (``HyperV2.lstm_hidden_size = 512``). This module reads both with
plain ``msgpack`` and a small gin parser, then hands the meta-parameter tree to the
architecture:

    ARCHITECTURES[arch].from_release(params_tree, gin_bindings) -> LearnedOptimizer

Contract for ``from_release`` (every architecture implements it as a classmethod):

* ``params_tree`` — nested ``dict[str, ...]`` of ``numpy.ndarray`` leaves, exactly the
  pytree of theta (keys as JAX wrote them, e.g. ``tree["nn"]["~"]["w0"]``; haiku module
  names can contain ``/``, e.g. ``tree["rnn_params"]["rnn/linear"]["w"]``). Legacy
  named-tuple maps (``{"name", "fields", "values"}``) are already converted to
  ``{field: value}`` maps.
* ``gin_bindings`` — ``{argument: value}`` bound for the architecture's gin class
  (macros resolved; ``@ref`` values arrive as :class:`GinReference`).
* Check the tree with :func:`check_tree` (it raises :class:`ReleaseFormatError` listing
  missing / unexpected / mis-shaped keys) and raise ``NotImplementedError`` for gin
  arguments it cannot honour.

Gin class names map to architectures through :data:`RELEASE_CLASS_NAMES` and through an
optional ``release_names: tuple[str, ...]`` attribute on architecture classes.
Nothing here unpickles anything: msgpack maps, strings, numbers and raw bytes only.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from metaopt.errors import FormatError

__all__ = [
    "RELEASE_CLASS_NAMES",
    "GinConfig",
    "GinMacro",
    "GinReference",
    "GinUnparsed",
    "ReleaseFormatError",
    "architecture_for_release",
    "check_tree",
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

# flax.serialization's msgpack extension codes.
_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"


class ReleaseFormatError(FormatError):
    """A release file is unreadable, truncated, or does not match the architecture."""


# --------------------------------------------------------------------------- msgpack


def _decode_ndarray(payload: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=False)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode()
    if dtype_name == "bfloat16":
        raise ReleaseFormatError("bfloat16 arrays are not supported (no ml_dtypes); "
                                 "convert the checkpoint to float32")
    dtype = np.dtype(dtype_name)
    if dtype.hasobject:
        raise ReleaseFormatError(f"object arrays are not allowed (dtype {dtype_name})")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise ReleaseFormatError(
            f"array of shape {tuple(shape)} and dtype {dtype_name} needs {expected} bytes, "
            f"the file holds {len(buffer)} (truncated or corrupt)")
    # Copy: frombuffer views are read-only and keep the whole file alive.
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).reshape(shape).astype(
        dtype.newbyteorder("="), copy=True)


def _ext_hook(code: int, payload: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_ndarray(payload)
    if code == _EXT_NPSCALAR:
        return _decode_ndarray(payload)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload, raw=False)
        return complex(real, imag)
    raise ReleaseFormatError(f"unknown msgpack extension type {code}")


def _restore_containers(node: Any) -> Any:
    """Undo flax's container encodings: chunked arrays and legacy named tuples."""
    if not isinstance(node, dict):
        return node
    if _CHUNKED in node:
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
    if set(node) == {"name", "fields", "values"} and isinstance(node["fields"], dict):
        names = [node["fields"][str(i)] for i in range(len(node["fields"]))]
        return {name: _restore_containers(node["values"][str(i)])
                for i, name in enumerate(names)}
    return {k: _restore_containers(v) for k, v in node.items()}


def read_flax_msgpack(source: str | os.PathLike | bytes) -> Any:
    """Decode a ``flax.serialization.to_bytes`` blob (or file) into dicts of ndarrays."""
    name = "<bytes>"
    if not isinstance(source, bytes | bytearray):
        name = str(source)
        try:
            source = Path(source).read_bytes()
        except OSError as err:
            raise ReleaseFormatError(f"cannot read release params {name}: {err}") from err
    try:
        tree = msgpack.unpackb(source, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ReleaseFormatError as err:
        raise ReleaseFormatError(f"{name}: {err}") from None
    except (ValueError, msgpack.UnpackException, TypeError) as err:
        raise ReleaseFormatError(
            f"{name} ({len(source)} bytes) is not a complete flax msgpack checkpoint: "
            f"{type(err).__name__}: {err}") from None
    return _restore_containers(tree)


def read_release_params(path: str | os.PathLike | bytes) -> dict[str, Any]:
    """The theta tree of a release ``params`` file (the container's ``params`` field)."""
    tree = read_flax_msgpack(path)
    if not isinstance(tree, dict):
        raise ReleaseFormatError(f"{path}: expected a msgpack map, got {type(tree).__name__}")
    if "params" in tree and isinstance(tree["params"], dict):
        return tree["params"]
    return tree


# --------------------------------------------------------------------------- trees


def flatten_tree(tree: Mapping[str, Any],
                 prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{path components: leaf}`` for a nested dict, keys in sorted (JAX) order."""
    flat: dict[tuple[str, ...], Any] = {}
    for key in sorted(tree):
        value = tree[key]
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def _show(path: tuple[str, ...]) -> str:
    return "/".join(path)


def check_tree(tree: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]],
               *, what: str = "release params") -> dict[tuple[str, ...], np.ndarray]:
    """Check a theta tree against ``{path: shape}``; return its leaves as float arrays.

    Raises :class:`ReleaseFormatError` naming every missing, unexpected and mis-shaped
    key at once, so a wrong checkpoint is diagnosed in one go.
    """
    flat = flatten_tree(tree)
    missing = [p for p in expected if p not in flat]
    unexpected = [p for p in flat if p not in expected]
    misshaped = [(p, tuple(np.shape(flat[p])), tuple(expected[p]))
                 for p in expected if p in flat and tuple(np.shape(flat[p])) != tuple(expected[p])]
    bad_type = [p for p in expected
                if p in flat and not isinstance(flat[p], np.ndarray | np.generic)]
    if missing or unexpected or misshaped or bad_type:
        lines = [f"{what} do not match the architecture:"]
        if missing:
            lines.append("  missing keys: " + ", ".join(_show(p) for p in missing))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(_show(p) for p in unexpected))
        for p, got, want in misshaped:
            lines.append(f"  mis-shaped key {_show(p)}: got {got}, expected {want}")
        if bad_type:
            lines.append("  not arrays: " + ", ".join(_show(p) for p in bad_type))
        raise ReleaseFormatError("\n".join(lines))
    return {p: np.asarray(flat[p]) for p in expected}


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
        """Value of ``scope/selector.argument`` (``KeyError`` if unbound)."""
        for (s, sel, arg), value in self.bindings.items():
            if s == scope and _short(sel) == _short(selector) and arg == argument:
                return self.resolve(value)
        raise KeyError(f"{scope + '/' if scope else ''}{selector}.{argument}")

    def bindings_for(self, class_name: str, scope: str = "") -> dict[str, Any]:
        """Constructor arguments bound for ``class_name`` (unscoped, then ``scope``)."""
        out: dict[str, Any] = {}
        for wanted in ("", scope) if scope else ("",):
            for (s, sel, arg), value in self.bindings.items():
                if s == wanted and _short(sel) == class_name:
                    out[arg] = self.resolve(value)
        return out

    def resolve(self, value: Any, _depth: int = 0) -> Any:
        """Replace ``%MACRO`` references (recursively, inside containers too)."""
        if _depth > 50:
            raise ReleaseFormatError("gin macros nest too deeply (cycle?)")
        if isinstance(value, GinMacro):
            if value.name not in self.macros:
                raise ReleaseFormatError(f"gin macro %{value.name} is not defined")
            return self.resolve(self.macros[value.name], _depth + 1)
        if isinstance(value, list | tuple):
            return type(value)(self.resolve(v, _depth + 1) for v in value)
        if isinstance(value, dict):
            return {k: self.resolve(v, _depth + 1) for k, v in value.items()}
        return value


def _short(selector: str) -> str:
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
        if text == "[":
            return self.sequence("]", list)
        if text == "(":
            return self.sequence(")", tuple)
        if text == "{":
            return self.mapping()
        raise ValueError(f"unexpected token {text!r}")

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
    read becomes :class:`GinUnparsed` (training-only bindings need not be understood).
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
        except (ValueError, SyntaxError):
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
        if scope == "" and _short(selector) == "run_train" and argument == "lopt":
            ref = config.resolve(value)
    if ref is None:  # no run_train.lopt: accept a config binding exactly one known class
        bound = {_short(sel) for (_, sel, _) in config.bindings} & set(names)
        if len(bound) != 1:
            raise ReleaseFormatError(
                "config.gin does not bind run_train.lopt and does not name exactly one "
                f"known learned optimizer (known gin classes: {', '.join(sorted(names))})")
        ref = GinReference(name=bound.pop(), evaluate=True)
    if not isinstance(ref, GinReference):
        raise ReleaseFormatError(f"run_train.lopt must be a @reference, got {ref!r}")
    if ref.class_name not in names:
        raise ReleaseFormatError(
            f"config.gin names learned optimizer {ref.class_name!r}, which metaopt cannot "
            f"import (known: {', '.join(sorted(names))})")
    return names[ref.class_name], config.bindings_for(ref.class_name, ref.scope)


def load_release(path: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
                 extra_bindings: Iterable[str] = ()):
    """Build a learned optimizer from a learned_optimization release.

    ``path`` is a release folder (holding ``params`` and ``config.gin``) or the params
    file itself (``config.gin`` is then looked up beside it, as the reference does).
    ``extra_bindings`` are gin lines applied after the file (e.g. to override an
    argument). Returns the architecture's ``from_release`` result.
    """
    from metaopt.lopt.base import ARCHITECTURES

    params_path, config_file = _release_paths(path, config_path)
    text = config_file.read_text(encoding="utf-8")
    config = parse_gin(text + "\n" + "\n".join(extra_bindings))
    arch, bindings = architecture_for_release(config)
    if arch not in ARCHITECTURES:
        raise ReleaseFormatError(
            f"architecture {arch!r} is not available (registered: "
            f"{', '.join(sorted(ARCHITECTURES)) or 'none'})")
    tree = read_release_params(params_path)
    try:
        return ARCHITECTURES[arch].from_release(tree, bindings)
    except ReleaseFormatError as err:
        raise ReleaseFormatError(f"{params_path}: {err}") from None
