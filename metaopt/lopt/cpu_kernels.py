"""Fused CPU kernels for the per-element part of learned optimizers.

small_fc_lopt and VeLO run a tiny MLP for every element of every task tensor. In eager
PyTorch each of their ~20 input channels is a separate pass over memory, which puts a
1M-parameter step at 10–20× the cost of AdamW; torch.compile's CPU backend did not
fuse the MLP across hidden units (it either stores the hidden activations or recomputes
them per consumer). The C source beside this module (``kernels/lopt_cpu.c``) does the
same math in three passes over memory with explicit SIMD (see its header).

The library is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into ``$METAOPT_CACHE/kernels`` (else ``~/.cache/metaopt/kernels``), keyed by a hash of
the source, the compiler, the flags and the CPU (``-march=native``), and loaded with
:mod:`ctypes` — no Python extension build, no pickle. Without a working compiler, with
``METAOPT_CPU_KERNELS=0`` or inside ``use_cpu_kernels(False)``, :func:`kernels` returns
``None`` and the optimizers use their PyTorch path (same math, tested equal). The
wrappers check dtype, device, shape and contiguity of every tensor before a pointer
crosses into C.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LoptCpuKernels", "kernels", "kernels_available", "use_cpu_kernels"]

_ABI_VERSION = 7
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11")
_MODES = {"small_fc": 0, "velo": 1, "small_fc_diag": 2, "velo_diag": 3}

_lock = threading.Lock()
_loaded: LoptCpuKernels | None = None
_tried = False
_disabled = threading.local()  # set by use_cpu_kernels(False)


def _cache_dir() -> Path:
    env = os.environ.get("METAOPT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "metaopt"
    return root / "kernels"


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


def _compile(cc: str, src: bytes, out: Path, openmp: bool) -> None:
    """Compile ``src`` into the shared library ``out`` atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c_file = Path(tmp) / "lopt_cpu.c"
        c_file.write_bytes(src)
        so_tmp = Path(tmp) / out.name
        cmd = [cc, *_FLAGS, *(("-fopenmp",) if openmp else ()), str(c_file), "-o", str(so_tmp),
               "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(so_tmp, out)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler '{cc}' on PATH")
    src = _source()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    last_error: Exception | None = None
    for openmp in (True, False):  # OpenMP threads when the compiler has them
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(_FLAGS).encode(),
                                         str(openmp).encode(), _cpu_signature()])
                             ).hexdigest()[:16]
        path = _cache_dir() / f"lopt_cpu_{key}.so"
        try:
            if not path.exists():
                _compile(cc, src, path, openmp)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            last_error = err
            continue
        if lib.lopt_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.lopt_abi_version()}, need {_ABI_VERSION}")
        return lib
    raise RuntimeError(f"could not build the learned-optimizer CPU kernels: {last_error}")


def kernels() -> LoptCpuKernels | None:
    """The fused kernels, built on first call; ``None`` when unavailable (warns once)."""
    global _loaded, _tried
    if os.environ.get("METAOPT_CPU_KERNELS", "1") == "0" or getattr(_disabled, "on", False):
        return None
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            try:
                _loaded = LoptCpuKernels(_build())
            except Exception as err:  # any failure means "use the PyTorch path"
                warnings.warn(f"learned-optimizer CPU kernels unavailable, using the PyTorch "
                              f"path (slower): {err}", RuntimeWarning, stacklevel=2)
                _loaded = None
            _tried = True
    return _loaded


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool) -> Iterator[None]:
    """Within the block (this thread), run learned optimizers with (default) or without the
    fused kernels — e.g. to compare against the PyTorch path."""
    before = getattr(_disabled, "on", False)
    _disabled.on = not enabled
    try:
        yield
    finally:
        _disabled.on = before


def kernels_available() -> bool:
    """Whether :func:`kernels` can run (builds them if needed)."""
    return kernels() is not None


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
