"""Fused CPU kernels for the per-element part of learned optimizers.

small_fc_lopt and VeLO run a tiny MLP for every element of every task tensor. In eager
PyTorch each of their ~20 input channels is a separate pass over memory, which puts a
1M-parameter step at 10–20× the cost of AdamW; torch.compile's CPU backend did not
fuse the MLP across hidden units (it either stores the hidden activations or recomputes
them per consumer). The C source beside this module (``kernels/lopt_cpu.c``) does the
same math in three passes over memory with explicit SIMD (see its header).

This module is the learned optimizers' one fast backend. It is chosen once per
optimizer instance (:func:`select_backend`: ``"reference"``, ``"cpu_kernels"`` or
``"auto"``), never by an environment variable or by timing.

The library is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into a private cache directory — ``cache_dir`` if given, else ``$METAOPT_CACHE/kernels``,
else ``~/.cache/metaopt/kernels`` (only the *location* comes from the environment) —
keyed by a hash of the source, the compiler, the flags and the CPU (``-march=native``),
and loaded with :mod:`ctypes` (no Python extension build, no pickle). The cache is
trusted only as far as it is private: the directory is created ``0700`` and refused
when another user owns it or it is group/world-writable; every build records the
library's sha256 beside it (both written atomically) and the loader verifies the digest
before ``CDLL`` runs any code of it; a missing, foreign or garbage file is rebuilt.
The wrappers check dtype, device, shape and contiguity of every tensor before a pointer
crosses into C.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.errors import MetaoptError
from metaopt.fileio import atomic_write_bytes, atomic_write_text, sha256_hex

__all__ = ["BACKENDS", "GATE_PANEL", "KernelBuildError", "KernelCacheError", "LoptCpuKernels",
           "MLPSlots", "SmallFCPlan", "SmallFCRows", "VeLOPlanBatch", "VeLOTensorPlan",
           "gate_panels", "kernels", "kernels_available", "load_kernels", "select_backend"]

_ABI_VERSION = 11
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11")
_MODES = {"small_fc": 0, "velo": 1, "small_fc_diag": 2, "velo_diag": 3}
#: Names accepted by :func:`select_backend`.
BACKENDS = ("reference", "cpu_kernels", "auto")

_lock = threading.Lock()
_loaded: dict[Path, LoptCpuKernels] = {}
_failed: dict[Path, str] = {}


class KernelBuildError(MetaoptError, RuntimeError):
    """The CPU kernels could not be compiled or loaded (the message says why)."""


class KernelCacheError(KernelBuildError):
    """The kernel cache directory is not private to this user; nothing is loaded from it."""



def compiler() -> str:
    """The C compiler to build the kernels with: ``$CC`` as make and setuptools read it,
    else ``cc`` (a build-tool convention, like the cache location; it never switches
    which code path runs — a missing compiler is reported by ``select_backend``)."""
    return os.environ.get("CC") or "cc"

def default_cache_dir() -> Path:
    """``$METAOPT_CACHE/kernels``, else ``~/.cache/metaopt/kernels``."""
    env = os.environ.get("METAOPT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "metaopt"
    return root / "kernels"


def private_dir(path: Path) -> Path:
    """Create ``path`` as a ``0700`` directory (parents as usual) and check it is ours.

    Raises :class:`KernelCacheError` when it is not a directory, is owned by another
    user, or is writable by group or others: a library planted there would run its
    constructor in this process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"kernel cache {path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelCacheError(f"kernel cache {path} is owned by uid {st.st_uid}, not by "
                               f"this user (uid {os.getuid()}); refusing to load from it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"kernel cache {path} is group/world-writable "
                               f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it or remove it")
    return path


def _cpu_signature() -> bytes:
    """What ``-march=native`` depends on: the architecture and (Linux) the CPU's feature
    flags, so a cache shared between different machines never loads a foreign build."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features", "model name"):
                    sig += line
    except OSError:
        sig += platform.processor()
    return sig.encode()


def _source() -> bytes:
    return resources.files("metaopt.lopt").joinpath("kernels/lopt_cpu.c").read_bytes()


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _compile(cc: str, src: bytes, out: Path, openmp: bool) -> None:
    """Compile ``src`` into ``out``, then record its sha256 beside it (both atomic)."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c_file = Path(tmp) / "lopt_cpu.c"
        c_file.write_bytes(src)
        so_tmp = Path(tmp) / out.name
        cmd = [cc, *_FLAGS, *(("-fopenmp",) if openmp else ()), str(c_file), "-o", str(so_tmp),
               "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise KernelBuildError(f"{' '.join(cmd)} could not run: {err}") from err
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        data = so_tmp.read_bytes()
    atomic_write_bytes(out, data)
    atomic_write_text(_digest_path(out), sha256_hex(data) + "\n")


def _verified(lib: Path) -> bool:
    """Whether ``lib`` exists and matches the sha256 recorded beside it at build time."""
    digest = _digest_path(lib)
    if not (lib.is_file() and digest.is_file()):
        return False
    recorded = digest.read_text(encoding="ascii", errors="replace").strip()
    return recorded == sha256_hex(lib.read_bytes())


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    version = lib.lopt_abi_version()
    if version != _ABI_VERSION:
        raise KernelBuildError(f"{path} has ABI {version}, need {_ABI_VERSION}")
    return lib


def _build(cache: Path) -> ctypes.CDLL:
    cc = compiler()
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler '{cc}' on PATH")
    src = _source()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"C compiler '{cc}' does not run: {err}") from err
    errors = []
    for openmp in (True, False):  # OpenMP threads when the compiler has them
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(_FLAGS).encode(),
                                         str(openmp).encode(), _cpu_signature()])
                             ).hexdigest()[:16]
        path = cache / f"lopt_cpu_{key}.so"
        try:
            if not _verified(path):  # missing, unrecorded, foreign or garbage: rebuild
                _compile(cc, src, path, openmp)
            try:
                return _open(path)
            except OSError:  # recorded but unloadable (e.g. truncated by a full disk)
                _compile(cc, src, path, openmp)
                return _open(path)
        except (OSError, KernelBuildError) as err:
            errors.append(f"{'with' if openmp else 'without'} OpenMP: {err}")
    raise KernelBuildError("could not build the learned-optimizer CPU kernels: "
                           + "; ".join(errors))


def load_kernels(cache_dir: str | os.PathLike | None = None) -> LoptCpuKernels:
    """The fused kernels, compiled into (and verified from) the private ``cache_dir``.

    Loaded once per cache directory and process. Raises :class:`KernelCacheError` for a
    cache directory that is not private and :class:`KernelBuildError` when the library
    cannot be built or loaded.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache.expanduser().absolute()
    with _lock:
        if cache in _loaded:
            return _loaded[cache]
        if cache in _failed:
            raise KernelBuildError(_failed[cache])
        private_dir(cache)
        try:
            kern = _loaded[cache] = LoptCpuKernels(_build(cache))
        except KernelBuildError as err:
            _failed[cache] = str(err)
            raise
        return kern


def kernels(cache_dir: str | os.PathLike | None = None) -> LoptCpuKernels | None:
    """:func:`load_kernels`, or ``None`` with a warning (once per cache) when they cannot
    be built — what ``backend="auto"`` uses."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    known_failure = cache.expanduser().absolute() in _failed
    try:
        return load_kernels(cache_dir)
    except KernelBuildError as err:
        if not known_failure:
            warnings.warn(f"learned-optimizer CPU kernels unavailable, using the PyTorch "
                          f"reference path (slower): {err}", RuntimeWarning, stacklevel=2)
        return None


def kernels_available(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the kernels can be built and loaded here (builds them if needed)."""
    try:
        load_kernels(cache_dir)
    except KernelBuildError:
        return False
    return True


def select_backend(backend: str | LoptCpuKernels | None, *,
                   cache_dir: str | os.PathLike | None = None) -> LoptCpuKernels | None:
    """Resolve a backend choice once: the kernels, or ``None`` for the reference path.

    * ``"reference"`` (or ``None``): the pure PyTorch step, everywhere.
    * ``"cpu_kernels"``: the fused kernels, built now; :class:`KernelBuildError` if they
      cannot be.
    * ``"auto"``: the fused kernels when a C compiler is on ``PATH`` and the build works
      (a failed build warns once and gives the reference path).

    Either way the kernels only step tensors they are built for (float32 CPU vectors and
    matrices, no autograd graph); every other tensor takes the reference step.
    """
    if backend is None or isinstance(backend, LoptCpuKernels):
        return backend
    if backend == "reference":
        return None
    if backend == "cpu_kernels":
        return load_kernels(cache_dir)
    if backend == "auto":
        if shutil.which(compiler()) is None:
            return None
        return kernels(cache_dir)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


#: Columns per panel of the LSTM weights of ``lopt_velo_gates`` (``GATE_PANEL`` in C).
GATE_PANEL = 32


def gate_panels(w: Tensor) -> Tensor:
    """A (depth, cols) weight matrix (``x @ w`` layout) as the contiguous float32
    (cols / GATE_PANEL, depth, GATE_PANEL) panels :meth:`LoptCpuKernels.velo_gates` streams
    (panel ``q`` holds columns ``q·GATE_PANEL …``, row by row)."""
    depth, cols = w.shape
    if cols % GATE_PANEL:
        raise ValueError(f"gate panels need a multiple of {GATE_PANEL} columns, got {cols}")
    return (w.detach().to(torch.float32).reshape(depth, cols // GATE_PANEL, GATE_PANEL)
            .permute(1, 0, 2).contiguous())


def _f32(name: str, t: Tensor, numel: int | None = None) -> int:
    """The address of a contiguous float32 CPU tensor (of ``numel`` elements), or an error
    naming the argument."""
    if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"kernel argument '{name}' must be a contiguous float32 CPU tensor, "
                         f"got {t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"kernel argument '{name}' has {t.numel()} elements, expected {numel}")
    return t.data_ptr()


def _f64(name: str, t: Tensor, numel: int) -> int:
    if t.dtype is not torch.float64 or not t.is_cpu or not t.is_contiguous() \
            or t.numel() != numel:
        raise ValueError(f"kernel output '{name}' must be a contiguous float64 CPU tensor "
                         f"of {numel} elements")
    return t.data_ptr()


def _row_stack(name: str, t: Tensor, rows: int, inner: tuple[int, ...]) -> tuple[int, int]:
    """(address of row 0, row stride in floats) of a float32 CPU ``(rows, *inner)`` array
    whose every row is contiguous and whose rows do not overlap, or a one-line error
    naming the argument."""
    if t.dtype is not torch.float32 or not t.is_cpu:
        raise ValueError(f"kernel argument '{name}' must be a float32 CPU tensor, got "
                         f"{t.dtype} on {t.device}")
    shape = t.shape
    if len(shape) != 1 + len(inner) or shape[0] != rows or shape[1:] != inner:
        raise ValueError(f"kernel argument '{name}' has shape {tuple(shape)}, expected "
                         f"{(rows, *inner)}")
    strides = t.stride()
    size = 1
    for axis in range(len(inner), 0, -1):
        extent = shape[axis]
        if extent != 1 and strides[axis] != size:
            raise ValueError(f"kernel argument '{name}': each row must be contiguous, got "
                             f"strides {strides} for shape {tuple(shape)}")
        size *= extent
    row_stride = strides[0] if rows > 1 else size
    if row_stride < size:
        raise ValueError(f"kernel argument '{name}' has row stride {row_stride} < row size "
                         f"{size}: its rows overlap")
    return t.data_ptr(), row_stride


class SmallFCRows(NamedTuple):
    """One tensor's arrays for :meth:`LoptCpuKernels.small_fc_rows` (each ``(R, ...)``)."""

    g: Tensor
    p: Tensor
    m: Tensor
    rms: Tensor
    v_row: Tensor
    v_col: Tensor
    v_diag: Tensor
    d0: int | None


class SmallFCPlan:
    """small_fc_lopt's in-place shell step of a fixed list of tensors (``R = 1``), checked
    once: the ``lopt_small_fc_rows`` table of :meth:`LoptCpuKernels.small_fc_rows`
    (``inplace=True``), kept with **strong** references to the tensors it addresses.

    The torch.optim shell steps the same parameters with the same state tensors every
    step; a plan per step only checks the gradients (float32, CPU, contiguous, the
    parameter's shape), sets their addresses and the step coefficients, and makes the
    one C call. :meth:`matches` tells whether the tensors handed in are still those
    planned for (state by identity, the parameters — fresh ``detach()`` views each
    step — by address, shape and strides). Kept in the shell's workspace (dropped on
    ``load_state_dict``).
    """

    def __init__(self, kern: LoptCpuKernels, tensors: Sequence[SmallFCRows]) -> None:
        self.kern, self.count = kern, len(tensors)
        self.table = (ctypes.c_int64 * max(1, self.count * _SR_SLOTS))()
        self.coef = (ctypes.c_float * max(1, self.count))()
        self.p_decay = (ctypes.c_float * max(1, self.count))()
        self.refs = [tuple(item[1:7]) for item in tensors]  # not the gradients
        self.keys = [(item.p.data_ptr(), tuple(item.p.shape), item.p.stride()) for item in tensors]
        for j, item in enumerate(tensors):
            one_row = SmallFCRows(*(t.unsqueeze(0) for t in item[:7]), item.d0)
            entry, _ = kern._small_fc_entry(j, one_row, 1, True)
            self.table[j * _SR_SLOTS:(j + 1) * _SR_SLOTS] = entry
        self.shapes = [tuple(item.g.shape) for item in tensors]

    def matches(self, tensors: Sequence[SmallFCRows]) -> bool:
        """Whether ``tensors`` (no row axis) are the planned ones, in order (gradients
        not compared)."""
        if len(tensors) != self.count:
            return False
        for item, refs, key in zip(tensors, self.refs, self.keys):
            p = item.p
            if not (all(a is b for a, b in zip(item[2:7], refs[1:]))
                    and p.data_ptr() == key[0] and tuple(p.shape) == key[1]
                    and p.stride() == key[2] and p.dtype is torch.float32):
                return False
        return True

    def step(self, grads: Sequence[Tensor], const: Mapping[str, Any], exp_mult: float,
             coef: Sequence[float], p_decay: Sequence[float]) -> None:
        """One in-place step: tensor ``j`` with gradient ``grads[j]`` (shaped as its
        planned ``g``), ``p·p_decay[j] − step·coef[j]``; ``const`` as for
        :meth:`LoptCpuKernels.small_fc_rows` with one row."""
        if len(grads) != self.count or len(coef) != self.count or len(p_decay) != self.count:
            raise ValueError(f"a small_fc plan of {self.count} tensors got {len(grads)} "
                             f"gradients, {len(coef)} coefficients, {len(p_decay)} decays")
        for j, (g, shape) in enumerate(zip(grads, self.shapes)):
            if not (g.dtype is torch.float32 and g.is_cpu and g.is_contiguous()
                    and tuple(g.shape) == shape):
                raise ValueError(f"kernel argument 'g[{j}]' must be a contiguous float32 CPU "
                                 f"tensor of shape {shape}, got {g.dtype} {tuple(g.shape)} on "
                                 f"{g.device} (contiguous={g.is_contiguous()})")
            self.table[j * _SR_SLOTS + _SR_G] = g.data_ptr()
            self.coef[j], self.p_decay[j] = coef[j], p_decay[j]
        self.kern._small_fc_call(self.count, self.table, 1, const,
                                 ctypes.addressof(self.coef), ctypes.addressof(self.p_decay),
                                 exp_mult)


#: Columns of a ``lopt_small_fc_rows`` table row (``SR_*`` in the C file): mode, sizes,
#: d0, then the row-0 addresses and the row strides of the 11 arrays, in this order.
_SR_ARRAYS = ("g", "p", "m_old", "rms_old", "p_new", "m_new", "rms_new", "v_row", "v_col",
              "v_old", "v_new")
_SR_SLOTS = 4 + 2 * len(_SR_ARRAYS)
_SR_G = 4  # the gradient's address


def _mode(mode: str) -> int:
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {sorted(_MODES)}")
    return _MODES[mode]


class LoptCpuKernels:
    """Typed, checked entry points of the compiled library (see ``kernels/lopt_cpu.c``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._n_channels: dict[str, int] = {}
        i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.lopt_n_channels.argtypes = [i32]
        lib.lopt_n_channels.restype = i32
        #: decay count and hidden width the library is specialised for
        self.decays, self.hidden = int(lib.lopt_decays()), int(lib.lopt_hidden())
        lib.lopt_sq_rowcol.argtypes = [i64, i64, vp, f32, vp, vp, i32]
        lib.lopt_sq_rowcol.restype = i32
        lib.lopt_factored_prepare.argtypes = [i64, i64, i32, i32, vp, f32, vp, i64, i64, vp,
                                              i64, i64, vp, vp, vp, vp, vp, vp, vp, i32]
        lib.lopt_factored_prepare.restype = i32
        lib.lopt_pass1.argtypes = [i32, i64, i64, vp, vp, vp, vp, vp, vp, vp, f32, vp, vp, vp, vp,
                                   vp, vp, vp, i32]
        lib.lopt_pass1.restype = None
        lib.lopt_pass2.argtypes = [i32, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                   vp, vp, vp, f32, f32, f32, vp, i32]
        lib.lopt_pass2.restype = None
        lib.lopt_velo_scalars.argtypes = [i64, i32, i32, i32, f32, vp, vp, vp, vp, vp, vp, vp, vp,
                                          vp, vp, vp]
        lib.lopt_velo_scalars.restype = None
        lib.lopt_plan_slots.restype = i32
        lib.lopt_velo_pass1_plans.argtypes = [i64, vp, vp, f32, vp, i32]
        lib.lopt_velo_pass1_plans.restype = i32
        lib.lopt_velo_pass2_plans.argtypes = [i64, vp, vp, i64, vp, vp, f32, i32]
        lib.lopt_velo_pass2_plans.restype = None
        lib.lopt_small_fc_slots.restype = i32
        lib.lopt_small_fc_rows.argtypes = [i64, vp, i64, *([vp] * 13), f32, i32]
        lib.lopt_small_fc_rows.restype = i32
        lib.lopt_first_nonfinite.argtypes = [i64, vp, vp]
        lib.lopt_first_nonfinite.restype = i64
        lib.lopt_gate_panel.restype = i32
        lib.lopt_velo_gates.argtypes = [i64, i64, i64, i64, *([vp] * 10), i32]
        lib.lopt_velo_gates.restype = None
        if int(lib.lopt_gate_panel()) != GATE_PANEL:
            raise KernelBuildError("kernel library's LSTM weight panels are "
                                   f"{int(lib.lopt_gate_panel())} columns wide, not {GATE_PANEL}")
        if int(lib.lopt_small_fc_slots()) != _SR_SLOTS:
            raise KernelBuildError("kernel library's small_fc table layout differs from "
                                   f"{_SR_SLOTS} columns")

    def n_channels(self, mode: str) -> int:
        """Per-element input channels of ``mode`` (with :attr:`decays` decays)."""
        n = self._n_channels.get(mode)
        if n is None:
            n = self._n_channels[mode] = int(self._lib.lopt_n_channels(_mode(mode)))
        return n

    def supports(self, n_decays: int, hidden: int) -> bool:
        """Whether the library's specialisation matches an architecture's shape."""
        return n_decays == self.decays and hidden == self.hidden

    @staticmethod
    def _threads() -> int:
        return max(1, torch.get_num_threads())

    def sq_rowcol(self, g: Tensor, clip: float = 0.0) -> tuple[Tensor, Tensor]:
        """Row and column sums of ``g² + 1e-30`` of an (a, b) matrix, in float64 (``g``
        clipped to ``[-clip, clip]`` first when ``clip > 0``)."""
        a, b = g.shape
        row = torch.empty(a, dtype=torch.float64)
        col = torch.empty(b, dtype=torch.float64)
        status = self._lib.lopt_sq_rowcol(a, b, _f32("g", g, a * b), float(clip),
                                          _f64("row_sum", row, a),
                                          _f64("col_sum", col, b), self._threads())
        if status != 0:
            raise MemoryError(f"lopt_sq_rowcol could not allocate {b} column accumulators")
        return row, col

    def factored_prepare(self, g: Tensor, d0: int, v_row: Tensor, v_col: Tensor,
                         fac_decay: Tensor, w_stat: Tensor, bias: Tensor, *,
                         channel_last: bool, update_v: bool = True, clip: float = 0.0
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Update ``v_row``/``v_col`` **in place** from the (a, b) gradient ``g`` (unless
        ``update_v`` is false) and return the factors ``fac_a`` (k, a), ``fac_b`` (k, b) and
        hidden biases ``u_a`` (H, a), ``u_b`` (H, b) of the row/column channels (see the C
        file). ``v_row``/``v_col`` are (k, len) decay-first or, with ``channel_last``,
        (len, k); ``d0`` is the axis ``v_row`` averages over; ``clip > 0`` clips ``g``."""
        a, b = g.shape
        k, hidden = self.decays, self.hidden
        len_r, len_c = (b, a) if d0 == 0 else (a, b)
        strides = []
        for name, v, length in (("v_row", v_row, len_r), ("v_col", v_col, len_c)):
            expected = (length, k) if channel_last else (k, length)
            if tuple(v.shape) != expected:
                raise ValueError(f"kernel argument '{name}' has shape {tuple(v.shape)}, "
                                 f"expected {expected}")
            strides.append((1, k) if channel_last else (length, 1))
        fac_a = torch.empty(k, a, dtype=torch.float32)
        fac_b = torch.empty(k, b, dtype=torch.float32)
        u_a = torch.empty(hidden, a, dtype=torch.float32)
        u_b = torch.empty(hidden, b, dtype=torch.float32)
        status = self._lib.lopt_factored_prepare(
            a, b, int(d0), int(update_v), _f32("g", g, a * b), float(clip), _f32("v_row", v_row),
            *strides[0],
            _f32("v_col", v_col), *strides[1], _f32("fac_decay", fac_decay, k),
            _f32("w_stat", w_stat, 4 * k * hidden), _f32("bias", bias, hidden),
            _f32("fac_a", fac_a), _f32("fac_b", fac_b), _f32("u_a", u_a), _f32("u_b", u_b),
            self._threads())
        if status != 0:
            raise MemoryError("lopt_factored_prepare could not allocate its row/column sums")
        return fac_a, fac_b, u_a, u_b

    @staticmethod
    def _matrix(mode: str, g: Tensor) -> tuple[int, int]:
        """The (a, b) the kernel walks: the matrix itself, or (1, n) in diagonal modes."""
        if mode.endswith("_diag"):
            return 1, g.numel()
        if g.dim() != 2:
            raise ValueError(f"mode {mode!r} steps matrices, got a tensor of shape "
                             f"{tuple(g.shape)}")
        return g.shape[0], g.shape[1]

    def pass1(self, mode: str, g: Tensor, p: Tensor, m_old: Tensor, rms_old: Tensor,
              mom_decay: Tensor, rms_decay: float, fac_a: Tensor | None = None,
              fac_b: Tensor | None = None, v_old: Tensor | None = None,
              fac_decay: Tensor | None = None, with_stats: bool = False, inplace: bool = False
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
        """New ``m`` (k, n), ``rms`` (1, n) and (diagonal modes) ``v`` (k, n), per-channel
        sums of squares and (VeLO) the old state's sums ``[Σm_q, Σm_q²]_q, Σrms, Σrms², Σp²``
        (float64). Factored modes take the row/column factors ``fac_a`` (k, a), ``fac_b``
        (k, b); diagonal modes ``v_old`` and ``fac_decay``. ``inplace`` writes the new
        accumulators into the old ones."""
        a, b = self._matrix(mode, g)
        n, k = a * b, self.decays
        diag = mode.endswith("_diag")
        if diag and (v_old is None or fac_decay is None):
            raise ValueError(f"mode {mode!r} needs v_old and fac_decay")
        if not diag and (fac_a is None or fac_b is None):
            raise ValueError(f"mode {mode!r} needs fac_a and fac_b")
        n_ch = self.n_channels(mode)
        m_new = m_old if inplace else torch.empty(k, n, dtype=torch.float32)
        rms_new = rms_old if inplace else torch.empty(1, n, dtype=torch.float32)
        v_new = None
        if diag:
            v_new = v_old if inplace else torch.empty(k, n, dtype=torch.float32)
        sumsq = torch.empty(n_ch, dtype=torch.float64)
        stats = torch.empty(2 * k + 3, dtype=torch.float64) if with_stats else None
        self._lib.lopt_pass1(
            _mode(mode), a, b, _f32("g", g, n), _f32("p", p, n), _f32("m_old", m_old, k * n),
            _f32("rms_old", rms_old, n), _f32("m_new", m_new), _f32("rms_new", rms_new),
            _f32("mom_decay", mom_decay, k), float(rms_decay),
            None if diag else _f32("fac_a", fac_a, k * a),
            None if diag else _f32("fac_b", fac_b, k * b),
            _f32("v_old", v_old, k * n) if diag else None,
            _f32("v_new", v_new, k * n) if diag else None,
            _f32("fac_decay", fac_decay, k) if diag else None, _f64("sumsq", sumsq, n_ch),
            _f64("stats", stats, 2 * k + 3) if stats is not None else None, self._threads())
        return m_new, rms_new, v_new, sumsq, stats

    def pass2(self, mode: str, g: Tensor, p: Tensor, m: Tensor, rms: Tensor,
              fac_a: Tensor | None, fac_b: Tensor | None, v: Tensor | None, w_in: Tensor,
              sumsq: Tensor, u_a: Tensor, u_b: Tensor | None, w1: Tensor, b1: Tensor,
              w2: Tensor, b2: Tensor, exp_mult: float, coef: float, p_decay: float = 1.0,
              out: Tensor | None = None) -> Tensor:
        """``p · p_decay - dir · exp(exp_mult · mag) · coef`` for the per-element MLP (see the
        C file), into ``out`` (may be ``p``) or a new tensor of ``p``'s shape. ``w_in``
        holds the first-layer weights of the per-element channels, normalised inside by
        ``rsqrt(1e-5 + sumsq / n)`` (``sumsq`` from :meth:`pass1`). Diagonal modes take
        ``v`` and a (H, 1) ``u_a`` (the first-layer bias), no factors."""
        a, b = self._matrix(mode, g)
        n, k, hidden = a * b, self.decays, self.hidden
        diag = mode.endswith("_diag")
        n_ch = self.n_channels(mode)
        if w_in.shape != (n_ch, hidden) or w1.shape != (hidden, hidden) or w2.shape != (hidden, 2):
            raise ValueError(f"kernel MLP must be {n_ch}→{hidden}→{hidden}→2; got w_in "
                             f"{tuple(w_in.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
        p_new = torch.empty_like(p) if out is None else out
        self._lib.lopt_pass2(
            _mode(mode), a, b, _f32("g", g, n), _f32("p", p, n), _f32("m", m, k * n),
            _f32("rms", rms, n), None if diag else _f32("fac_a", fac_a, k * a),
            None if diag else _f32("fac_b", fac_b, k * b),
            _f32("v", v, k * n) if diag else None, _f32("w_in", w_in, n_ch * hidden),
            _f64("sumsq", sumsq, n_ch), _f32("u_a", u_a, hidden * a),
            None if diag else _f32("u_b", u_b, hidden * b),
            _f32("w1", w1), _f32("b1", b1, hidden), _f32("w2", w2), _f32("b2", b2, 2),
            float(exp_mult), float(coef), float(p_decay), _f32("p_new", p_new, n),
            self._threads())
        return p_new

    def small_fc_rows(self, tensors: Sequence[SmallFCRows], const: Mapping[str, Any],
                      exp_mult: float, coef: Tensor | Sequence[Sequence[float]],
                      p_decay: Tensor | Sequence[Sequence[float]], *, inplace: bool = False
                      ) -> list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """small_fc_lopt's whole step for ``R`` rows of several tensors in **one** C call
        (``lopt_small_fc_rows``; row ``r`` of a tensor: one task's tensor, stepped with
        row ``r`` of the meta-parameters) — the fused path of both the torch.optim shell's
        step of a whole model (``R = 1``) and the batched rows of meta-training.

        Every :class:`SmallFCRows` holds float32 CPU ``(R, ...)`` arrays, each row
        contiguous (rows may be apart: a row stride at least a row's size): ``g``, ``p``
        ``(R, *shape)`` with ``shape`` a vector ``(n,)`` (diagonal second moments) or a
        matrix ``(a, b)`` (factored); the decay-first accumulators ``m`` ``(R, k, *shape)``,
        ``rms`` ``(R, 1, *shape)``, for matrices ``v_row``, ``v_col`` ``(R, k, len)`` and
        ``d0`` the axis ``v_row`` averages over (``features.factored_dims``), for vectors
        ``v_diag`` ``(R, k, n)``. ``const`` holds the per-row constants
        (``small_fc.SmallFCLOpt._kernel_constants`` with a leading row axis, contiguous).
        Tensor ``j``'s row ``r`` becomes ``p·p_decay[j, r] − step·coef[j, r]``
        (``coef``/``p_decay``: ``(len(tensors), R)``). Returns per tensor the new ``(p, m,
        rms, v_row, v_col, v_diag)`` (the unused factored slots as given); with
        ``inplace`` they are the given tensors, overwritten."""
        count = len(tensors)
        if count == 0:
            return []
        rows = tensors[0].p.shape[0] if tensors[0].p.dim() else 0
        scalars = []  # (kept referenced until the call returns)
        for name, values in (("coef", coef), ("p_decay", p_decay)):
            t = values if isinstance(values, Tensor) else torch.tensor(values,
                                                                       dtype=torch.float32)
            if tuple(t.shape) != (count, rows):
                raise ValueError(f"kernel argument '{name}' has shape {tuple(t.shape)}, "
                                 f"expected ({count}, {rows}) (tensors, rows)")
            _f32(name, t)
            scalars.append(t)
        table = (ctypes.c_int64 * (count * _SR_SLOTS))()
        outs = []
        for j, item in enumerate(tensors):
            entry, out = self._small_fc_entry(j, item, rows, inplace)
            table[j * _SR_SLOTS:(j + 1) * _SR_SLOTS] = entry
            outs.append(out)
        self._small_fc_call(count, table, rows, const, scalars[0].data_ptr(),
                            scalars[1].data_ptr(), exp_mult)
        return outs

    def small_fc_plan(self, tensors: Sequence[SmallFCRows]) -> SmallFCPlan:
        """:meth:`small_fc_rows`' in-place step of these tensors — each one task's, **no**
        row axis (``R = 1``) — checked once (see :class:`SmallFCPlan`; each ``g`` only
        gives its gradient's shape)."""
        return SmallFCPlan(self, tensors)

    def _small_fc_call(self, count: int, table: ctypes.Array, rows: int,
                       const: Mapping[str, Any], coef: int, p_decay: int,
                       exp_mult: float) -> None:
        """Check the per-row constants and run ``lopt_small_fc_rows`` on a filled table
        (``coef``/``p_decay``: addresses of ``count × rows`` floats)."""
        k, hidden = self.decays, self.hidden
        consts = [_f32(name, t, rows * size) for name, t, size in (
            ("mom_d", const["mom_d"], k), ("fac_d", const["fac_d"], k),
            ("rms_d", const["rms_d"], 1),
            ("w_factored", const["w_factored"], self.n_channels("small_fc") * hidden),
            ("w_diag", const["w_diag"], self.n_channels("small_fc_diag") * hidden),
            ("w_stat", const["w_stat"], 4 * k * hidden), ("bias0", const["bias0"], hidden),
            ("w1", const["mlp"][0], hidden * hidden), ("b1", const["mlp"][1], hidden),
            ("w2", const["mlp"][2], hidden * 2), ("b2", const["mlp"][3], 2))]
        status = self._lib.lopt_small_fc_rows(count, table, rows, *consts, coef, p_decay,
                                              float(exp_mult), self._threads())
        if status < 0:  # the wrapper's own checks should have caught it
            raise ValueError(f"lopt_small_fc_rows refused table row {-status - 1} "
                             f"(tensor {-status - 1}: mode, sizes, d0, addresses or strides)")
        if status > 0:
            raise MemoryError(f"lopt_small_fc_rows could not allocate the scratch of tensor "
                              f"{status - 1}")

    def _small_fc_entry(self, j: int, item: SmallFCRows, rows: int, inplace: bool
                        ) -> tuple[list[int], tuple[Tensor, ...]]:
        """Table row (``_SR_COLUMNS``) and outputs of tensor ``j`` of :meth:`small_fc_rows`."""
        g, p, m, rms, v_row, v_col, v_diag, d0 = item
        shape = tuple(p.shape[1:])
        if len(shape) not in (1, 2) or p.shape[0] != rows or shape[-1] < 1 or shape[0] < 1:
            raise ValueError(f"small_fc_rows tensor {j}: p must be ({rows}, n) or ({rows}, a, "
                             f"b) with n, a, b >= 1, got {tuple(p.shape)}")
        k = self.decays
        diag = len(shape) == 1
        a, b = (1, shape[0]) if diag else shape
        f32 = torch.float32
        if inplace:
            p_new, m_new, rms_new = p, m, rms
        else:
            p_new = torch.empty((rows, *shape), dtype=f32)
            m_new = torch.empty((rows, k, *shape), dtype=f32)
            rms_new = torch.empty((rows, 1, *shape), dtype=f32)
        arrays = [("g", g, shape), ("p", p, shape), ("m", m, (k, *shape)),
                  ("rms", rms, (1, *shape)), ("p_new", p_new, shape),
                  ("m_new", m_new, (k, *shape)), ("rms_new", rms_new, (1, *shape))]
        if diag:
            d0 = 0
            v_new = v_diag if inplace else torch.empty((rows, k, *shape), dtype=f32)
            out = (p_new, m_new, rms_new, v_row, v_col, v_new)
            arrays += [("v_row", None, None), ("v_col", None, None),
                       ("v_diag", v_diag, (k, *shape)), ("v_diag_new", v_new, (k, *shape))]
        else:
            if d0 not in (0, 1):
                raise ValueError(f"small_fc_rows tensor {j}: 'd0' must be 0 or 1 for a matrix, "
                                 f"got {d0!r}")
            len_r, len_c = (b, a) if d0 == 0 else (a, b)
            if not inplace:
                v_row = v_row.clone(memory_format=torch.contiguous_format)
                v_col = v_col.clone(memory_format=torch.contiguous_format)
            out = (p_new, m_new, rms_new, v_row, v_col, v_diag)
            arrays += [("v_row", v_row, (k, len_r)), ("v_col", v_col, (k, len_c)),
                       ("v_diag", None, None), ("v_diag_new", None, None)]
        addrs, strides = [], []
        for name, t, inner in arrays:
            addr, stride = (0, 0) if t is None else _row_stack(f"{name}[{j}]", t, rows, inner)
            addrs.append(addr)
            strides.append(stride)
        return [_MODES["small_fc_diag" if diag else "small_fc"], a, b, int(d0), *addrs,
                *strides], out

    def velo_scalars(self, iteration: int, num_steps: int, buffer_iteration: int, loss: float,
                     buffer: Mapping[str, Tensor], timescales: Tensor, stats: Tensor,
                     counts: Tensor, rank: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """VeLO's per-step scalars in one call (see ``lopt_velo_scalars`` in the C file):
        the loss buffer's new ``means`` and ``running_min`` (10,), the LSTM input (n, 30)
        and each tensor's ``mean(p²)`` (n,), from the old buffer (``means``,
        ``running_min``, ``decays``) and its old ``buffer_iteration``, the step's old
        ``iteration`` of ``num_steps``, the kernel's pass-1 sums
        ``stats`` (n, 2k + 3, float64) over ``counts`` (n,, float64) elements and the rank
        one-hots ``rank`` (n, 5)."""
        n, n_stats = stats.shape[0], 2 * self.decays + 3
        n_loss, n_in = 10, 30
        if self.decays != 3:
            raise ValueError(f"VeLO's LSTM input needs 3 decays, the library has {self.decays}")
        new_means = torch.empty(n_loss, dtype=torch.float32)
        new_min = torch.empty(n_loss, dtype=torch.float32)
        rnn_in = torch.empty(n, n_in, dtype=torch.float32)
        msq = torch.empty(n, dtype=torch.float32)
        self._lib.lopt_velo_scalars(
            n, int(iteration), int(num_steps), int(buffer_iteration), float(loss),
            _f32("decays", buffer["decays"], n_loss), _f32("means", buffer["means"], n_loss),
            _f32("running_min", buffer["running_min"], n_loss), _f32("new_means", new_means),
            _f32("new_min", new_min), _f32("timescales", timescales, 9),
            _f64("stats", stats, n * n_stats), _f64("counts", counts, n),
            _f32("rank", rank, n * 5), _f32("rnn_in", rnn_in), _f32("msq", msq))
        return new_means, new_min, rnn_in, msq

    def first_nonfinite(self, tensors: Sequence[Tensor]) -> int:
        """The index of the first of ``tensors`` (contiguous float32 CPU) holding a NaN or
        an infinity, or -1 when all are finite — one pass over memory, one C call
        (``lopt_first_nonfinite``); the same answer as ``torch.isfinite(t).all()`` per
        tensor."""
        n = len(tensors)
        ptrs = (ctypes.c_int64 * max(n, 1))(*(_f32(f"tensors[{j}]", t)
                                              for j, t in enumerate(tensors)))
        counts = (ctypes.c_int64 * max(n, 1))(*(t.numel() for t in tensors))
        return int(self._lib.lopt_first_nonfinite(n, ptrs, counts))

    def velo_gates(self, x: Tensor, hidden: Tensor, pool_w: Tensor, pool_b: Tensor,
                   fold: Tensor, bias: Tensor, w_hidden: Tensor, w_pooled: Tensor) -> Tensor:
        """The gate pre-activations (rows, 4 hid) of VeLO's per-tensor LSTM on the shell's
        weight snapshot (``lopt_velo_gates``): ``bias + x @ fold + pooled @ W_p + hidden @
        W_h`` with ``pooled = max_rows relu(pool_b + x @ pool_w)``, from ``x`` (rows,
        n_in), ``hidden`` (rows, hid), ``pool_w`` (n_in, n_pool), ``pool_b`` (n_pool,),
        ``fold`` (n_in, 4 hid), ``bias`` (4 hid,) and ``W_h``, ``W_p`` as
        :func:`gate_panels` of their (hid, 4 hid) and (n_pool, 4 hid) matrices. Each
        weight matrix is read once. Equal to :meth:`VeLO.rnn`'s torch products on the same
        snapshot up to float32 rounding (another summation order); the same for every
        thread count."""
        if x.dim() != 2 or hidden.dim() != 2 or x.shape[0] != hidden.shape[0]:
            raise ValueError(f"kernel arguments 'x' (rows, n_in) and 'hidden' (rows, hid) do "
                             f"not fit: {tuple(x.shape)} and {tuple(hidden.shape)}")
        (rows, n_in), hid = x.shape, hidden.shape[1]
        n_pool, cols = pool_b.shape[0], 4 * hid
        if cols % GATE_PANEL or n_pool > cols:
            raise ValueError(f"kernel argument 'hidden': 4 x {hid} gate columns must be a "
                             f"multiple of {GATE_PANEL} and at least the {n_pool} pooled units")
        given = {"pool_w": pool_w, "pool_b": pool_b, "fold": fold, "bias": bias,
                 "w_hidden": w_hidden, "w_pooled": w_pooled}
        expected = {"pool_w": (n_in, n_pool), "pool_b": (n_pool,), "fold": (n_in, cols),
                    "bias": (cols,), "w_hidden": (cols // GATE_PANEL, hid, GATE_PANEL),
                    "w_pooled": (cols // GATE_PANEL, n_pool, GATE_PANEL)}
        for name, t in given.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"kernel argument '{name}' must have shape {expected[name]}, "
                                 f"got {tuple(t.shape)}")
        pooled = torch.empty(n_pool, dtype=torch.float32)
        gates = torch.empty(rows, cols, dtype=torch.float32)
        self._lib.lopt_velo_gates(
            rows, n_in, n_pool, hid, _f32("x", x), _f32("hidden", hidden),
            *(_f32(name, t) for name, t in given.items()), _f32("pooled", pooled),
            _f32("gates", gates), self._threads())
        return gates

    def __reduce__(self) -> tuple:
        """Pickled (e.g. with a deep-copied optimizer) as "load the kernels again"."""
        return (load_kernels, ())

    def velo_plan(self, p: Tensor, mom: Tensor, rms: Tensor, v_row: Tensor, v_col: Tensor,
                  v_diag: Tensor, d0: int | None) -> VeLOTensorPlan | None:
        """Prepared in-place VeLO calls for one float32 CPU vector or matrix and its state
        (see :class:`VeLOTensorPlan`), or ``None`` when the state is not laid out for
        them (not stored channel-first, not contiguous)."""
        return VeLOTensorPlan.build(self, p, mom, rms, v_row, v_col, v_diag, d0)




class MLPSlots(NamedTuple):
    """Where one kernel call's MLP arguments start in a packed row (in floats): first-layer
    weights ``w_x`` (``n_x`` channels × H), for matrices the row/column-statistic weights
    ``w_stat`` (4k × H), the first-layer bias ``b0``, ``w1`` (H × H), ``b1``, ``w2``
    (H × 2) and ``b2`` (2)."""

    n_x: int
    w_x: int
    w_stat: int | None
    b0: int
    w1: int
    b1: int
    w2: int
    b2: int
    end: int

    @staticmethod
    def after(start: int, n_x: int, n_stat: int, hidden: int) -> MLPSlots:
        """The slots of a segment at ``start`` with ``n_stat`` statistic channels (0: none)."""
        w_stat = start + n_x * hidden
        b0 = w_stat + n_stat * hidden
        w1 = b0 + hidden
        b1 = w1 + hidden * hidden
        w2 = b1 + hidden
        b2 = w2 + 2 * hidden
        return MLPSlots(n_x, start, w_stat if n_stat else None, b0, w1, b1, w2, b2, b2 + 2)


def _owned_channel_first(t: Tensor, rows: int, n: int) -> Tensor | None:
    """``t`` (``shape + (rows,)``) as a contiguous (rows, n) view of its own storage, or
    None when it is not stored channel-first."""
    if t.dtype is not torch.float32 or not t.is_cpu:
        return None
    view = t.movedim(-1, 0).reshape(rows, n)
    if view.is_contiguous() and view.data_ptr() == t.data_ptr():
        return view
    return None


class VeLOTensorPlan:
    """VeLO's fused-kernel calls for one tensor stepped in place, checked once.

    The torch.optim shell steps the same parameters with the same state tensors every
    step. Checking every argument, finding the accumulators' channel-first views and
    allocating the kernel's scratch is then the same work each step; a plan does it at
    construction (through the same checks as the other wrappers) and keeps **strong**
    references to the tensors it writes, so their addresses stay valid. The calls run
    through a :class:`VeLOPlanBatch` of the step's planned tensors, which per step checks
    only the gradients, the decays and the packed MLP rows.

    A plan belongs to the optimizer state it was built for (the shell keeps it in its
    workspace, dropped on ``load_state_dict``); :meth:`matches` tells whether the
    tensors handed in are still those (state by identity, the parameter — a fresh
    ``detach()`` view each step — by storage, shape and strides).
    """

    def __init__(self, kern: LoptCpuKernels, p: Tensor, state: tuple[Tensor, ...],
                 m_cf: Tensor, r_cf: Tensor, v_cf: Tensor | None, d0: int | None) -> None:
        self.kern = kern
        k, hidden = kern.decays, kern.hidden
        self.p, self.state = p, state
        self.shape, self.stride = tuple(p.shape), p.stride()
        self.n = n = p.numel()
        self.diag = p.dim() == 1
        self.mode = "velo_diag" if self.diag else "velo"
        self.n_ch = kern.n_channels(self.mode)
        self.m_cf, self.r_cf, self.v_cf = m_cf, r_cf, v_cf
        self.sumsq = torch.empty(self.n_ch, dtype=torch.float64)
        self.stats = torch.empty(2 * k + 3, dtype=torch.float64)
        self.zeros = torch.zeros(4 * k * hidden + hidden + k, dtype=torch.float32)
        self.ptr = {"p": _f32("p", p, n), "m": _f32("mom", m_cf, k * n),
                    "rms": _f32("rms", r_cf, n), "sumsq": _f64("sumsq", self.sumsq, self.n_ch),
                    "stats": _f64("stats", self.stats, 2 * k + 3),
                    "zeros": _f32("zeros", self.zeros)}
        if self.diag:
            self.a, self.b = 1, n
            self.ptr["v"] = _f32("v_diag", v_cf, k * n)
        else:
            self.a, self.b = self.shape
            self.d0 = int(d0)
            self.fac_a = torch.empty(k, self.a, dtype=torch.float32)
            self.fac_b = torch.empty(k, self.b, dtype=torch.float32)
            self.u_a = torch.empty(hidden, self.a, dtype=torch.float32)
            self.u_b = torch.empty(hidden, self.b, dtype=torch.float32)
            self.ptr.update(v_row=_f32("v_row", state[2]), v_col=_f32("v_col", state[3]),
                            fac_a=_f32("fac_a", self.fac_a), fac_b=_f32("fac_b", self.fac_b),
                            u_a=_f32("u_a", self.u_a), u_b=_f32("u_b", self.u_b))

    @classmethod
    def build(cls, kern: LoptCpuKernels, p: Tensor, mom: Tensor, rms: Tensor, v_row: Tensor,
              v_col: Tensor, v_diag: Tensor, d0: int | None) -> VeLOTensorPlan | None:
        k, n = kern.decays, p.numel()
        if not (p.dtype is torch.float32 and p.is_cpu and p.is_contiguous() and n > 0
                and p.dim() in (1, 2)):
            return None
        m_cf = _owned_channel_first(mom, k, n)
        r_cf = _owned_channel_first(rms, 1, n)
        if m_cf is None or r_cf is None:
            return None
        v_cf = None
        if p.dim() == 1:
            v_cf = _owned_channel_first(v_diag, k, n)
            if v_cf is None:
                return None
        else:
            a, b = p.shape
            len_r, len_c = (b, a) if d0 == 0 else (a, b)
            for v, length in ((v_row, len_r), (v_col, len_c)):
                if not (v.dtype is torch.float32 and v.is_cpu and v.is_contiguous()
                        and tuple(v.shape) == (length, k)):
                    return None
        return cls(kern, p, (mom, rms, v_row, v_col, v_diag), m_cf, r_cf, v_cf, d0)

    def matches(self, p: Tensor, state: tuple[Tensor, ...]) -> bool:
        """Whether ``p`` and its state tensors are still the ones planned for."""
        return (all(a is b for a, b in zip(self.state, state))
                and p.data_ptr() == self.ptr["p"] and tuple(p.shape) == self.shape
                and p.stride() == self.stride and p.dtype is torch.float32)


#: Columns of a :class:`VeLOPlanBatch` table row (``PL_*`` in the C file, same order).
_PLAN_COLUMNS = ("mode", "a", "b", "d0", "g", "p", "m", "rms", "v", "v_row", "v_col", "fac_a",
                 "fac_b", "u_a", "u_b", "zeros", "sumsq", "stats", "row", "w_x", "w_stat", "b0",
                 "w1", "b1", "w2", "b2")


class VeLOPlanBatch:
    """The in-place kernel calls of several :class:`VeLOTensorPlan` in one C call per pass.

    A step of the torch.optim shell calls the kernels two or three times per tensor; with
    ~20 arguments each, ctypes' argument conversion costs more than the kernels' own work
    on small tensors. A batch writes every planned address once into a table (one row per
    tensor, ``_PLAN_COLUMNS``) and per step only checks the gradients and the packed MLP
    rows and sets the gradients' addresses, the step coefficients and the decays. The
    C side runs exactly the per-tensor calls in order. The batch keeps the plans (and so
    every tensor it addresses) alive; ``rows[j]`` is plan ``j``'s row in the packed MLP
    arguments, ``slots`` the (matrix, vector) layout of such a row
    (:func:`~metaopt.lopt.velo_kernels.kernel_mlp_gather`).
    """

    def __init__(self, kern: LoptCpuKernels, plans: tuple[VeLOTensorPlan, ...],
                 rows: tuple[int, ...], slots: tuple[MLPSlots, MLPSlots]) -> None:
        if int(kern._lib.lopt_plan_slots()) != len(_PLAN_COLUMNS):
            raise KernelBuildError("kernel library's plan table layout differs from "
                                   f"{len(_PLAN_COLUMNS)} columns")
        if len(rows) != len(plans) or any(plan.kern is not kern for plan in plans):
            raise ValueError("a VeLO plan batch needs one packed row per plan, all plans "
                             "of these kernels")
        self.kern, self.plans, self.rows = kern, plans, rows
        self.count, width = len(plans), len(_PLAN_COLUMNS)
        self.row_end = max((slots[plan.diag].end for plan in plans), default=0)
        self.n_rows = max(rows, default=-1) + 1
        self.table = (ctypes.c_int64 * (self.count * width))()
        self.coef = (ctypes.c_float * max(self.count, 1))()
        self.p_decay = (ctypes.c_float * max(self.count, 1))()
        self._grads: list[Tensor] = []
        col = {name: i for i, name in enumerate(_PLAN_COLUMNS)}
        for j, (plan, row) in enumerate(zip(plans, rows)):
            sl = slots[plan.diag]
            if sl.n_x != plan.n_ch or (sl.w_stat is None) != plan.diag:
                raise ValueError(f"MLP slots for {sl.n_x} channels do not fit mode {plan.mode}")
            entry = {"mode": _MODES[plan.mode], "a": plan.a, "b": plan.b,
                     "d0": 0 if plan.diag else plan.d0, "row": row, "w_x": sl.w_x,
                     "w_stat": sl.w_stat or 0, "b0": sl.b0, "w1": sl.w1, "b1": sl.b1,
                     "w2": sl.w2, "b2": sl.b2,
                     **{name: plan.ptr.get(name, 0) or 0 for name in
                        ("p", "m", "rms", "v", "v_row", "v_col", "fac_a", "fac_b", "u_a",
                         "u_b", "zeros", "sumsq", "stats")}}
            for name, value in entry.items():
                self.table[j * width + col[name]] = int(value)
        self._g_col = col["g"]

    def matches(self, plans: tuple[VeLOTensorPlan, ...], rows: tuple[int, ...]) -> bool:
        """Whether this batch runs exactly ``plans`` (the same objects) at ``rows``."""
        return (len(plans) == self.count and rows == self.rows
                and all(a is b for a, b in zip(plans, self.plans)))

    def pass1(self, grads: list[Tensor], mom_decay: Tensor, rms_decay: float,
              fac_decay: Tensor) -> None:
        """Every plan's :meth:`VeLOTensorPlan.pass1` (gradient ``grads[j]``, checked here)
        in one call; the gradients are kept for :meth:`pass2`."""
        if len(grads) != self.count:
            raise ValueError(f"a plan batch of {self.count} tensors got {len(grads)} gradients")
        k, width = self.kern.decays, len(_PLAN_COLUMNS)
        for j, (plan, g) in enumerate(zip(self.plans, grads)):
            self.table[j * width + self._g_col] = _f32(f"g[{j}]", g, plan.n)
        self._grads = grads
        failed = self.kern._lib.lopt_velo_pass1_plans(
            self.count, self.table, _f32("mom_decay", mom_decay, k), float(rms_decay),
            _f32("fac_decay", fac_decay, k), self.kern._threads())
        if failed:
            self._grads = []
            raise MemoryError(f"lopt_factored_prepare could not allocate the row/column sums "
                              f"of planned tensor {failed - 1}")

    def pass2(self, packed: Tensor, coefs: list[float], p_decays: list[float],
              exp_mult: float) -> None:
        """Every plan's :meth:`VeLOTensorPlan.pass2` in one call, writing the parameters in
        place: plan ``j`` reads row ``rows[j]`` of ``packed`` (float32, contiguous rows
        laid out as ``slots``), ``coefs[j]`` and ``p_decays[j]``; after :meth:`pass1` of
        the same step (its gradients)."""
        if len(self._grads) != self.count:
            raise ValueError("VeLOPlanBatch.pass2 needs this step's pass1 first")
        if len(coefs) != self.count or len(p_decays) != self.count:
            raise ValueError(f"a plan batch of {self.count} tensors needs {self.count} "
                             "coefficients and decays")
        if not (packed.dim() == 2 and packed.shape[0] >= self.n_rows
                and packed.shape[1] >= self.row_end):
            raise ValueError(f"kernel argument 'packed' must be at least ({self.n_rows}, "
                             f"{self.row_end}), got {tuple(packed.shape)}")
        ptr = _f32("packed", packed)
        for j in range(self.count):
            self.coef[j], self.p_decay[j] = coefs[j], p_decays[j]
        self.kern._lib.lopt_velo_pass2_plans(
            self.count, self.table, ptr, packed.shape[1], self.coef, self.p_decay,
            float(exp_mult), self.kern._threads())
        self._grads = []
