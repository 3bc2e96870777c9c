"""Fused CPU kernels for the per-element part of learned optimizers.

small_fc_lopt and VeLO run a tiny MLP for every element of every task tensor. In eager
PyTorch each of their ~20 input channels is a separate pass over memory, which puts a
1M-parameter step at 10–20× the cost of AdamW; torch.compile's CPU backend did not
fuse the MLP across hidden units (it either stores the hidden activations or recomputes
them per consumer). The C source beside this module (``kernels/lopt_cpu.c``) does the
same math in three passes over memory, in cache-sized tiles (see its header).

The library is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into ``$METAOPT_CACHE/kernels`` (else ``~/.cache/metaopt/kernels``), keyed by a hash of
the source, the compiler and the flags, and loaded with :mod:`ctypes` — no Python
extension build, no pickle. Without a working compiler, or with ``METAOPT_CPU_KERNELS=0``,
:func:`kernels` returns ``None`` and the optimizers use their PyTorch path (same math,
tested equal). The wrappers check dtype, device, shape and contiguity of every tensor
before a pointer crosses into C.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LoptCpuKernels", "kernels", "kernels_available"]

_ABI_VERSION = 3
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11")
_MODES = {"small_fc": 0, "velo": 1}

_lock = threading.Lock()
_loaded: LoptCpuKernels | None = None
_tried = False


def _cache_dir() -> Path:
    env = os.environ.get("METAOPT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "metaopt"
    return root / "kernels"


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
                                         str(openmp).encode()])).hexdigest()[:16]
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
    if os.environ.get("METAOPT_CPU_KERNELS", "1") == "0":
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


def kernels_available() -> bool:
    """Whether :func:`kernels` can run (builds them if needed)."""
    return kernels() is not None


def _f32(name: str, t: Tensor, numel: int | None = None) -> ctypes.c_void_p:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"kernel argument '{name}' must be a contiguous float32 CPU tensor, "
                         f"got {t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"kernel argument '{name}' has {t.numel()} elements, expected {numel}")
    return ctypes.c_void_p(t.data_ptr())


def _f64(name: str, t: Tensor, numel: int) -> ctypes.c_void_p:
    if t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous() \
            or t.numel() != numel:
        raise ValueError(f"kernel output '{name}' must be a contiguous float64 CPU tensor "
                         f"of {numel} elements")
    return ctypes.c_void_p(t.data_ptr())


def _mode(mode: str) -> int:
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {sorted(_MODES)}")
    return _MODES[mode]


class LoptCpuKernels:
    """Typed, checked entry points of the compiled library (see ``kernels/lopt_cpu.c``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.lopt_n_channels.argtypes = [i32]
        lib.lopt_n_channels.restype = i32
        #: decay count and hidden width the library is specialised for
        self.decays, self.hidden = int(lib.lopt_decays()), int(lib.lopt_hidden())
        lib.lopt_sq_rowcol.argtypes = [i64, i64, vp, vp, vp, i32]
        lib.lopt_sq_rowcol.restype = i32
        lib.lopt_rank2_pass1.argtypes = [i32, i64, i64, vp, vp, vp, vp, vp, vp, vp, f32,
                                         vp, vp, vp, vp, i32]
        lib.lopt_rank2_pass1.restype = None
        lib.lopt_rank2_pass2.argtypes = [i32, i64, i64, vp, vp, vp, vp, vp, vp, vp,
                                         vp, vp, vp, vp, vp, vp, f32, f32, f32, vp, i32]
        lib.lopt_rank2_pass2.restype = None

    def n_channels(self, mode: str) -> int:
        """Per-element input channels of ``mode`` (with :attr:`decays` decays)."""
        return int(self._lib.lopt_n_channels(_mode(mode)))

    def supports(self, n_decays: int, hidden: int) -> bool:
        """Whether the library's specialisation matches an architecture's shape."""
        return n_decays == self.decays and hidden == self.hidden

    @staticmethod
    def _threads() -> int:
        return max(1, torch.get_num_threads())

    def sq_rowcol(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column sums of ``g² + 1e-30`` of an (a, b) matrix, in float64."""
        a, b = g.shape
        row = torch.empty(a, dtype=torch.float64)
        col = torch.empty(b, dtype=torch.float64)
        status = self._lib.lopt_sq_rowcol(a, b, _f32("g", g, a * b), _f64("row_sum", row, a),
                                          _f64("col_sum", col, b), self._threads())
        if status != 0:
            raise MemoryError(f"lopt_sq_rowcol could not allocate {b} column accumulators")
        return row, col

    def pass1(self, mode: str, g: Tensor, p: Tensor, m_old: Tensor, rms_old: Tensor,
              mom_decay: Tensor, rms_decay: float, fac_a: Tensor, fac_b: Tensor,
              with_stats: bool = False, inplace: bool = False
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """New ``m`` (k, a·b) and ``rms`` (1, a·b), per-channel sums of squares and (VeLO)
        the old state's sums ``[Σm_q, Σm_q²]_q, Σrms, Σrms², Σp²`` (float64).
        ``inplace`` writes the new accumulators into ``m_old`` / ``rms_old``."""
        a, b = g.shape
        n, k = a * b, self.decays
        n_ch = self.n_channels(mode)
        m_new = m_old if inplace else torch.empty(k, n, dtype=torch.float32)
        rms_new = rms_old if inplace else torch.empty(1, n, dtype=torch.float32)
        sumsq = torch.empty(n_ch, dtype=torch.float64)
        stats = torch.empty(2 * k + 3, dtype=torch.float64) if with_stats else None
        self._lib.lopt_rank2_pass1(
            _mode(mode), a, b, _f32("g", g, n), _f32("p", p, n), _f32("m_old", m_old, k * n),
            _f32("rms_old", rms_old, n), _f32("m_new", m_new), _f32("rms_new", rms_new),
            _f32("mom_decay", mom_decay, k), float(rms_decay), _f32("fac_a", fac_a, k * a),
            _f32("fac_b", fac_b, k * b), _f64("sumsq", sumsq, n_ch),
            _f64("stats", stats, 2 * k + 3) if stats is not None else None, self._threads())
        return m_new, rms_new, sumsq, stats

    def pass2(self, mode: str, g: Tensor, p: Tensor, m: Tensor, rms: Tensor, fac_a: Tensor,
              fac_b: Tensor, w_in: Tensor, u_a: Tensor, u_b: Tensor, w1: Tensor, b1: Tensor,
              w2: Tensor, b2: Tensor, exp_mult: float, coef: float, p_decay: float = 1.0,
              out: Tensor | None = None) -> Tensor:
        """``p · p_decay - dir · exp(exp_mult · mag) · coef`` for the per-element MLP (see the
        C file), into ``out`` (may be ``p``) or a new tensor."""
        a, b = g.shape
        n, k, hidden = a * b, self.decays, self.hidden
        n_ch = self.n_channels(mode)
        if w_in.shape != (n_ch, hidden) or w1.shape != (hidden, hidden) or w2.shape != (hidden, 2):
            raise ValueError(f"kernel MLP must be {n_ch}→{hidden}→{hidden}→2; got w_in "
                             f"{tuple(w_in.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
        p_new = torch.empty(a, b, dtype=torch.float32) if out is None else out
        self._lib.lopt_rank2_pass2(
            _mode(mode), a, b, _f32("g", g, n), _f32("p", p, n), _f32("m", m, k * n),
            _f32("rms", rms, n), _f32("fac_a", fac_a, k * a), _f32("fac_b", fac_b, k * b),
            _f32("w_in", w_in, n_ch * hidden), _f32("u_a", u_a, hidden * a),
            _f32("u_b", u_b, hidden * b), _f32("w1", w1), _f32("b1", b1, hidden),
            _f32("w2", w2), _f32("b2", b2, 2), float(exp_mult), float(coef), float(p_decay),
            _f32("p_new", p_new, n), self._threads())
        return p_new
