"""Bounded fuzz of the learned-optimizer file formats: releases (msgpack + gin) and
native checkpoints.

A few hundred cases are generated with a fixed seed from the golden release files and
from a small native checkpoint: byte flips, truncations, huge lengths, deep nesting,
wrong dtypes, malformed containers, NaN/inf weights, gin edits, crafted (re-sealed)
checkpoint metadata, FIFOs, symlinks and sparse huge files. Every case is loaded with
``load_checkpoint`` in a child process that runs under a memory limit
(``RLIMIT_AS``) with a per-case watchdog (an interval timer in the child, and a deadline
in the parent that kills a child stuck in C code and restarts the rest of the batch).
Every case must either load or be refused with metaopt's own
:class:`~metaopt.errors.FormatError`: no hang, no memory blow-up, no other exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from metaopt.lopt import SmallFCLOpt, save_checkpoint

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
REPO = Path(__file__).resolve().parents[2]
SEED = 20240611
MEMORY_LIMIT = 3 << 30  # RLIMIT_AS of the child, bytes
CASE_TIMEOUT = 15.0  # the child's own watchdog per case, seconds
PARENT_TIMEOUT = 45.0  # the parent kills a child silent for this long
STARTUP_TIMEOUT = 180.0  # importing torch on a loaded machine

LOADED, REFUSED, EITHER = "loaded", "refused", "either"


@dataclass
class Case:
    """One fuzz input: the files of a release folder or checkpoint directory."""

    name: str
    expect: str
    files: dict[str, Any] = field(default_factory=dict)  # bytes | ("symlink"|"fifo"|"sparse", x)


# ----------------------------------------------------------------- child process

_CHILD = r"""
import json, resource, signal, sys
limit, per_case = int(sys.argv[1]), float(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
torch.set_num_threads(1)
from metaopt.errors import FormatError
from metaopt.lopt import load_checkpoint

class Watchdog(BaseException):
    pass

def _alarm(signum, frame):
    raise Watchdog()

signal.signal(signal.SIGALRM, _alarm)
cases = json.loads(sys.stdin.readline())
for index, folder in cases:
    sys.stdout.write(f"START {index}\n")
    sys.stdout.flush()
    try:
        signal.setitimer(signal.ITIMER_REAL, per_case)
        try:
            load_checkpoint(folder)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        outcome, detail = "loaded", ""
    except FormatError as err:
        outcome, detail = "refused", f"{type(err).__name__}: {str(err)[:300]}"
    except Watchdog:
        outcome, detail = "timeout", f"over {per_case} s"
    except BaseException as err:  # the harness reports every other exception type
        outcome, detail = "other", f"{type(err).__name__}: {str(err)[:300]}"
    sys.stdout.write(json.dumps([index, outcome, detail]) + "\n")
    sys.stdout.flush()
"""


def _run_batch(cases: list[tuple[int, str]], log: Path) -> dict[int, tuple[str, str]]:
    """Run ``cases`` in child processes; a hung or crashed child is killed and the
    cases after the culprit run in a fresh one."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    results: dict[int, tuple[str, str]] = {}
    pending = list(cases)
    while pending:
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(MEMORY_LIMIT), str(CASE_TIMEOUT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(pending) + "\n").encode())
        proc.stdin.close()
        fd, buf, current, started = proc.stdout.fileno(), b"", None, False
        try:
            while True:
                timeout = PARENT_TIMEOUT if started else STARTUP_TIMEOUT
                ready, _, _ = select.select([fd], [], [], timeout)
                if not ready:
                    if current is None:
                        pytest.fail(f"fuzz child gave no output for {timeout} s; see {log}")
                    results[current] = ("hang", f"no answer within {timeout} s")
                    break
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    rc = proc.wait()
                    if current is None:
                        pytest.fail(f"fuzz child exited (rc {rc}) outside a case; see "
                                    f"{log}: {log.read_text()[-2000:]}")
                    results[current] = ("crash", f"child exited with rc {rc}")
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    started = True
                    if line.startswith(b"START "):
                        current = int(line.split()[1])
                    else:
                        index, outcome, detail = json.loads(line)
                        results[index] = (outcome, detail)
                        current = None
                if len(results) >= len(cases):
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        pending = [c for c in pending if c[0] not in results]
    return results


# ----------------------------------------------------------------- encoding helpers


_KEEP = object()


def ext_array(a: np.ndarray, dtype_name: Any = _KEEP, buffer: Any = _KEEP,
              shape: Any = _KEEP, code: int = 1) -> msgpack.ExtType:
    """flax's ndarray encoding, with any field overridable."""
    a = np.asarray(a, order="C")
    payload = (list(a.shape) if shape is _KEEP else shape,
               a.dtype.name if dtype_name is _KEEP else dtype_name,
               a.tobytes() if buffer is _KEEP else buffer)
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def decode_golden(name: str) -> dict:
    """Golden container with array leaves as numpy (via the raw msgpack)."""
    def conv(node):
        if isinstance(node, msgpack.ExtType) and node.code == 1:
            shape, dtype, buf = msgpack.unpackb(node.data, raw=False)
            return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()
        if isinstance(node, dict):
            return {k: conv(v) for k, v in node.items()}
        return node
    return conv(msgpack.unpackb((GOLDEN / name).read_bytes(), raw=False))


def encode(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: encode(v) for k, v in node.items()}
    if isinstance(node, np.ndarray):
        return ext_array(node)
    return node


def pack(node: Any) -> bytes:
    return msgpack.packb(encode(node), use_bin_type=True, strict_types=False)


def with_leaf(container: dict, path: tuple[str, ...], value: Any) -> dict:
    """A deep copy of ``container`` with ``params/<path>`` replaced by ``value``."""
    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, dict) else node
    out = copy(container)
    node = out["params"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def flip(data: bytes, pos: int, mask: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


SMALL_GIN = (GOLDEN / "small_fc_lopt_config.gin").read_bytes()
VELO_GIN = (GOLDEN / "velo_config.gin").read_bytes()


def small_release(name: str, expect: str, params: bytes | None = None,
                  gin: bytes | None = None) -> Case:
    return Case(f"small_fc/{name}", expect, {
        "params": (GOLDEN / "small_fc_lopt_theta.msgpack").read_bytes()
        if params is None else params,
        "config.gin": SMALL_GIN if gin is None else gin})


# ----------------------------------------------------------------- release cases


def release_cases(rng: np.random.Generator) -> list[Case]:
    raw = (GOLDEN / "small_fc_lopt_theta.msgpack").read_bytes()
    tree = decode_golden("small_fc_lopt_theta.msgpack")
    w0 = tree["params"]["nn"]["~"]["w0"]
    w0_path = ("nn", "~", "w0")
    cases = [small_release("pristine", LOADED)]

    # Byte flips and truncations anywhere in the file.
    for pos in rng.choice(len(raw), 60, replace=False):
        cases.append(small_release(f"flip@{pos}", EITHER,
                                   flip(raw, int(pos), int(rng.integers(1, 256)))))
    for cut in sorted(rng.choice(len(raw), 30, replace=False)):
        cases.append(small_release(f"truncate@{cut}", REFUSED, raw[:int(cut)]))
    cases.append(small_release("empty", REFUSED, b""))
    cases.append(small_release("trailing-data", REFUSED, raw + b"\xc0"))

    # Huge lengths: length fields of msgpack headers patched to the maximum, and arrays
    # that claim enormous shapes.
    headers = [i for i, b in enumerate(raw) if b in (0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9,
                                                     0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf)]
    for pos in rng.choice(headers, min(14, len(headers)), replace=False):
        width = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xc7: 1, 0xc8: 2, 0xc9: 4, 0xd9: 1, 0xda: 2,
                 0xdb: 4, 0xdc: 2, 0xdd: 4, 0xde: 2, 0xdf: 4}[raw[pos]]
        data = bytearray(raw)
        data[pos + 1:pos + 1 + width] = b"\xff" * width
        # (the byte may be float data that only looks like a header: either outcome)
        cases.append(small_release(f"huge-length@{pos}", EITHER, bytes(data)))
    for prefix in (b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9"):
        cases.append(small_release(f"huge-header-{prefix.hex()}", REFUSED,
                                   b"\x81\xa6params\x81\xa1w" + prefix + b"\xff\xff\xff\xf0"
                                   + b"\x01" * 16))
    for shape in ([2**40, 2**40], [2**62], [10**12], [-1, 4], [39, 4.0], [True, 4],
                  [1] * 40, "39x4", None):
        cases.append(small_release(f"shape={shape!r}"[:60], REFUSED,
                                   pack(with_leaf(tree, w0_path, ext_array(w0, shape=shape)))))
    cases.append(small_release("chunked-huge-shape", REFUSED, pack(with_leaf(
        tree, w0_path, {"__msgpack_chunked_array__": True, "shape": {"0": 10**9},
                        "chunks": {"0": w0}}))))

    # Deep nesting: maps and lists under params, lists inside an array payload.
    for depth in (60, 100, 499, 500, 1000, 5000, 200_000):
        leaf = ext_array(w0)
        cases.append(small_release(
            f"deep-map-{depth}", REFUSED,
            b"\x81\xa6params" + b"\x81\xa1a" * depth + msgpack.packb(leaf)))
        cases.append(small_release(f"deep-list-{depth}", REFUSED,
                                   b"\x81\xa6params\x81\xa1a" + b"\x91" * depth + b"\xc0"))
    for depth in (100, 1000, 5000):
        payload = b"\x93" + b"\x91" * depth + b"\xc0" + b"\xa7float32\xc4\x00"
        cases.append(small_release(f"deep-ext-payload-{depth}", REFUSED, pack(with_leaf(
            tree, w0_path, msgpack.ExtType(1, payload)))))

    # Wrong dtypes: integers, booleans, complex, strings, datetimes, objects, junk names.
    for dtype in ("int32", "int64", "uint8", "bool", "complex64", "complex128"):
        value = w0.astype(dtype) if dtype != "bool" else w0 > 0
        cases.append(small_release(f"dtype={dtype}", REFUSED,
                                   pack(with_leaf(tree, w0_path, value))))
    for dtype in ("float16", "float64"):
        cases.append(small_release(f"dtype={dtype}", LOADED,
                                   pack(with_leaf(tree, w0_path, w0.astype(dtype)))))
    for dtype in ("<U1", "U1", "S4", "V4", "M8[s]", "datetime64[ns]", "m8", "object", "O",
                  "float128", "bfloat16", "", "float32\x00", "f4", "<f4", "i4", 7, None,
                  b"\xff\xfe", ["float32"]):
        cases.append(small_release(f"dtype={dtype!r}"[:60], REFUSED, pack(with_leaf(
            tree, w0_path, ext_array(w0, dtype_name=dtype)))))

    # Malformed containers.
    bad_trees: list[tuple[str, Any]] = [
        ("top-list", [1, 2]), ("top-int", 3), ("top-str", "params"), ("top-none", None),
        ("params-list", {**tree, "params": [1, 2]}),
        ("params-str", {**tree, "params": "x"}),
        ("no-params", {"gen_id": "x", "step": 0}),
        ("leaf-str", with_leaf(tree, w0_path, "w0")),
        ("leaf-int", with_leaf(tree, w0_path, 3)),
        ("leaf-none", with_leaf(tree, w0_path, None)),
        ("leaf-list", with_leaf(tree, w0_path, [[1.0] * 4] * 39)),
        ("leaf-dict", with_leaf(tree, w0_path, {"x": w0})),
        ("chunked-no-shape", with_leaf(tree, w0_path, {"__msgpack_chunked_array__": True,
                                                       "chunks": {"0": w0}})),
        ("chunked-no-chunks", with_leaf(tree, w0_path, {"__msgpack_chunked_array__": True,
                                                        "shape": {"0": 39, "1": 4}})),
        ("chunked-bad-index", with_leaf(tree, w0_path, {
            "__msgpack_chunked_array__": True, "shape": {"0": 39, "1": 4},
            "chunks": {"1": w0}})),
        ("chunked-str-chunk", with_leaf(tree, w0_path, {
            "__msgpack_chunked_array__": True, "shape": {"0": 39, "1": 4},
            "chunks": {"0": "w0"}})),
        ("chunked-mixed-dtype", with_leaf(tree, w0_path, {
            "__msgpack_chunked_array__": True, "shape": {"0": 39, "1": 4},
            "chunks": {"0": w0[:10].ravel(), "1": w0[10:].ravel().astype("float64")}})),
        ("chunked-ok", with_leaf(tree, w0_path, {
            "__msgpack_chunked_array__": True, "shape": {"0": 39, "1": 4},
            "chunks": {"0": w0[:10].ravel(), "1": w0[10:].ravel()}})),
        ("namedtuple-bad-fields", with_leaf(tree, ("nn", "~"), {
            "name": "T", "fields": {"0": 1}, "values": {"0": w0}})),
        ("namedtuple-count", with_leaf(tree, ("nn", "~"), {
            "name": "T", "fields": {"0": "w0", "1": "b0"}, "values": {"0": w0}})),
        ("namedtuple-no-index", with_leaf(tree, ("nn", "~"), {
            "name": "T", "fields": {"x": "w0"}, "values": {"0": w0}})),
        ("namedtuple-values-str", with_leaf(tree, ("nn", "~"), {
            "name": "T", "fields": {"0": "w0"}, "values": "w0"})),
        ("ext-complex-junk", with_leaf(tree, w0_path, msgpack.ExtType(2, b"\x93\x01"))),
        ("ext-complex", with_leaf(tree, w0_path, msgpack.ExtType(2, msgpack.packb([1.0, 2.0])))),
        ("ext-scalar-array", with_leaf(tree, w0_path, ext_array(w0, code=3))),
        ("ext-unknown-code", with_leaf(tree, w0_path, msgpack.ExtType(99, b"abc"))),
        ("ext-empty", with_leaf(tree, w0_path, msgpack.ExtType(1, b""))),
        ("ext-two-fields", with_leaf(tree, w0_path, msgpack.ExtType(1, msgpack.packb(
            [[39, 4], "float32"])))),
        ("ext-map-payload", with_leaf(tree, w0_path, msgpack.ExtType(1, msgpack.packb(
            {"shape": [39, 4]})))),
        ("ext-str-buffer", with_leaf(tree, w0_path, ext_array(w0, buffer="abc"))),
        ("ext-short-buffer", with_leaf(tree, w0_path, ext_array(w0, buffer=w0.tobytes()[:-1]))),
        ("ext-trailing", with_leaf(tree, w0_path, msgpack.ExtType(
            1, ext_array(w0).data + b"\xc0"))),
    ]
    for name, value in bad_trees:
        expect = LOADED if name == "chunked-ok" else REFUSED
        cases.append(small_release(name, expect, pack(value)))
    cases.append(small_release("int-key", REFUSED, msgpack.packb({1: 2, "params": 3})))
    cases.append(small_release("bytes-key", REFUSED, b"\x81\xc4\x06params\x80"))
    cases.append(small_release("bad-utf8-key", REFUSED, b"\x81\xa6par\xffms\x80"))

    # NaN / inf weights (and a float64 value that overflows float32).
    for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        bad = w0.copy()
        bad[3, 1] = value
        cases.append(small_release(f"weight={label}", REFUSED,
                                   pack(with_leaf(tree, w0_path, bad))))
    cases.append(small_release("weight=1e300-float64", REFUSED, pack(with_leaf(
        tree, w0_path, np.full(w0.shape, 1e300)))))

    # Gin edits.
    head = b"run_train.lopt = @AdafacMLPLOpt()\n"
    gin_cases = [
        ("non-utf8", REFUSED, head + b"AdafacMLPLOpt.exp_mult = 0.001 # \xff\xfe\n"),
        ("latin1", REFUSED, "# caf\xe9\n".encode("latin-1") + head),
        ("empty", REFUSED, b""),
        ("hidden_layers=10**6", REFUSED, head + b"AdafacMLPLOpt.hidden_layers = 1000000\n"),
        ("hidden_size=10**5", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 100000\n"),
        ("hidden_size=0", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 0\n"),
        ("hidden_size=-4", REFUSED, head + b"AdafacMLPLOpt.hidden_size = -4\n"),
        ("hidden_size=4.5", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 4.5\n"),
        ("hidden_size=4.0", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 4.0\n"),
        ("hidden_size='4'", REFUSED, head + b"AdafacMLPLOpt.hidden_size = '4'\n"),
        ("hidden_size=True", REFUSED, head + b"AdafacMLPLOpt.hidden_size = True\n"),
        ("hidden_size=@ref", REFUSED, head + b"AdafacMLPLOpt.hidden_size = @foo()\n"),
        ("hidden_size=lambda", REFUSED, head + b"AdafacMLPLOpt.hidden_size = lambda: 4\n"),
        ("hidden_size=4", LOADED, head + b"AdafacMLPLOpt.hidden_size = 4\n"),
        ("exp_mult='yes'", REFUSED, head + b"AdafacMLPLOpt.exp_mult = 'yes'\n"),
        ("exp_mult=nan", REFUSED, head + b"AdafacMLPLOpt.exp_mult = nan\n"),
        ("exp_mult=inf", REFUSED, head + b"AdafacMLPLOpt.exp_mult = inf\n"),
        ("exp_mult=1", LOADED, head + b"AdafacMLPLOpt.exp_mult = 1\n"),
        ("decays=str", REFUSED, head + b"AdafacMLPLOpt.initial_rms_decays = 'abc'\n"),
        ("decays=nested", REFUSED, head + b"AdafacMLPLOpt.initial_rms_decays = [[0.9]]\n"),
        ("decays=2.0", REFUSED, head + b"AdafacMLPLOpt.initial_rms_decays = [2.0]\n"),
        ("decays=long", REFUSED, head + b"AdafacMLPLOpt.initial_rms_decays = ["
         + b"0.9, " * 100000 + b"]\n"),
        ("decays=broadcast", REFUSED, head + b"AdafacMLPLOpt.initial_momentum_decays = "
         b"[0.9, 0.99]\n"),
        ("concat_weights='yes'", REFUSED, head + b"AdafacMLPLOpt.concat_weights = 'yes'\n"),
        ("make_separate_weights", REFUSED,
         head + b"AdafacMLPLOpt.make_separate_weights = True\n"),
        ("unknown-arg", REFUSED, head + b"AdafacMLPLOpt.frobnicate = 3\n"),
        ("lopt=3", REFUSED, b"run_train.lopt = 3\n"),
        ("lopt=unknown", REFUSED, b"run_train.lopt = @LOLv2()\n"),
        ("lopt=macro-cycle", REFUSED, b"run_train.lopt = %A\nA = %B\nB = %A\n"),
        ("lopt=undefined-macro", REFUSED, b"run_train.lopt = %A\n"),
        ("macro-bomb", REFUSED, head + b"AdafacMLPLOpt.hidden_size = %M0\n" + b"".join(
            f"M{i} = [%M{i + 1}, %M{i + 1}]\n".encode() for i in range(40)) + b"M40 = 1\n"),
        ("deep-brackets-1000", REFUSED, head + b"AdafacMLPLOpt.hidden_size = "
         + b"[" * 1000 + b"]" * 1000 + b"\n"),
        ("deep-brackets-100000", REFUSED, head + b"AdafacMLPLOpt.hidden_size = "
         + b"(" * 100000 + b")" * 100000 + b"\n"),
        ("deep-brackets-unused", LOADED, head + b"other.value = "
         + b"[" * 5000 + b"]" * 5000 + b"\n"),
        ("unbalanced", REFUSED, head + b"AdafacMLPLOpt.hidden_size = ((((\n"),
        ("unterminated-string", REFUSED, head + b"AdafacMLPLOpt.hidden_size = '4\n"),
        ("huge-int", REFUSED, head + b"AdafacMLPLOpt.hidden_size = " + b"9" * 5000 + b"\n"),
        ("unhashable-key", REFUSED, head + b"AdafacMLPLOpt.hidden_size = {[1]: 2}\n"),
        ("str-plus-bytes", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 'a' b'b'\n"),
        ("bad-statement", REFUSED, head + b"this is not gin\n"),
        ("nul-bytes", REFUSED, head + b"AdafacMLPLOpt.hidden_size = 4\x00\n"),
        ("no-lopt", LOADED, b"AdafacMLPLOpt.hidden_size = 4\n"),
        ("two-known", REFUSED, b"AdafacMLPLOpt.hidden_size = 4\nHyperV2.param_inits = 4\n"),
        ("velo-gin-on-small-params", REFUSED, VELO_GIN),
    ]
    for name, expect, gin in gin_cases:
        cases.append(small_release(f"gin/{name}", expect, gin=gin))
    for pos in rng.choice(len(SMALL_GIN), 20, replace=False):
        cases.append(small_release(f"gin/flip@{pos}", EITHER,
                                   gin=flip(SMALL_GIN, int(pos), int(rng.integers(1, 256)))))
    for cut in rng.choice(len(SMALL_GIN), 6, replace=False):
        cases.append(small_release(f"gin/truncate@{cut}", EITHER, gin=SMALL_GIN[:int(cut)]))
    cases.append(small_release("gin/too-big", REFUSED, gin=head + b"#" * (1 << 20)))
    return cases


def velo_cases(rng: np.random.Generator) -> list[Case]:
    """A few cases on the 9 MB VeLO release (each one is a full decode)."""
    raw = (GOLDEN / "velo_theta.msgpack").read_bytes()
    params = ("symlink", str(GOLDEN / "velo_theta.msgpack"))
    head = VELO_GIN
    cases = [Case("velo/pristine", LOADED, {"params": params, "config.gin": head})]
    for pos in rng.choice(len(raw), 4, replace=False):
        cases.append(Case(f"velo/flip@{pos}", EITHER, {
            "params": flip(raw, int(pos), int(rng.integers(1, 256))), "config.gin": head}))
    cases.append(Case("velo/truncate", REFUSED, {"params": raw[:len(raw) // 2],
                                                 "config.gin": head}))
    for name, line in (("lstm_hidden_size=10**5", b"HyperV2.lstm_hidden_size = 100000\n"),
                       ("param_inits=0", b"HyperV2.param_inits = 0\n"),
                       ("ff_hidden_layers=10**6", b"HyperV2.ff_hidden_layers = 1000000\n"),
                       ("bugged='yes'", b"HyperV2.use_bugged_loss_features = 'yes'\n"),
                       ("lstm_hidden_size=128", b"HyperV2.lstm_hidden_size = 128\n"),
                       ("decays=2", b"HyperV2.initial_rms_decays = (0.9, 0.99)\n"),
                       ("unsupported", b"HyperV2.precondition_output = True\n"),
                       ("unsupported-str", b"HyperV2.interp_mult = '100'\n")):
        cases.append(Case(f"velo/gin/{name}", REFUSED, {"params": params,
                                                        "config.gin": head + line}))
    cases.append(Case("velo/gin/default-int-for-float", LOADED, {
        "params": params, "config.gin": head + b"HyperV2.interp_mult = 100\n"}))
    tree = decode_golden("velo_theta.msgpack")
    w = tree["params"]["rnn_params"]["step_size"]["w"]
    cases.append(Case("velo/dtype=complex64", REFUSED, {"params": pack(with_leaf(
        tree, ("rnn_params", "step_size", "w"), w.astype(np.complex64) + 1j)),
        "config.gin": head}))
    return cases


# ----------------------------------------------------------------- native cases


def _seal(meta_bytes: bytes) -> bytes:
    return f"{hashlib.sha256(meta_bytes).hexdigest()}  lopt.json\n".encode()


def native_cases(rng: np.random.Generator, tmp: Path) -> list[Case]:
    torch.manual_seed(0)
    lopt = SmallFCLOpt()
    path = save_checkpoint(lopt, tmp / "native-source")
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    meta = json.loads(files["lopt.json"])
    good_tensors = {k: v.clone() for k, v in lopt.state_dict().items()}
    cases = [Case("native/pristine", LOADED, dict(files))]

    for name, data in files.items():
        for pos in rng.choice(len(data), 16, replace=False):
            cases.append(Case(f"native/flip/{name}@{pos}", REFUSED, {
                **files, name: flip(data, int(pos), int(rng.integers(1, 256)))}))
        for cut in rng.choice(len(data), 5, replace=False):
            cases.append(Case(f"native/truncate/{name}@{cut}", REFUSED,
                              {**files, name: data[:int(cut)]}))
        without = {k: v for k, v in files.items() if k != name}
        cases.append(Case(f"native/missing/{name}", REFUSED, without))

    def crafted(label: str, new_meta: Any = None, tensors: dict | None = None,
                raw_meta: bytes | None = None, expect: str = REFUSED) -> Case:
        out = dict(files)
        m = json.loads(json.dumps(meta))
        if tensors is not None:
            weights = safetensors_save(tensors)
            out["meta_params.safetensors"] = weights
            m["files"]["meta_params.safetensors"] = {
                "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
        if new_meta is not None:
            m = new_meta(m)
        data = raw_meta if raw_meta is not None else (json.dumps(m) + "\n").encode()
        out["lopt.json"], out["lopt.json.sha256"] = data, _seal(data)
        return Case(f"native/crafted/{label}", expect, out)

    def set_config(key, value):
        def edit(m):
            m["config"][key] = value
            return m
        return edit

    for key, value in (("hidden_size", 10**5), ("hidden_layers", 10**6), ("hidden_size", 0),
                       ("hidden_size", 4.5), ("hidden_size", "4"), ("hidden_size", True),
                       ("exp_mult", "yes"), ("exp_mult", None), ("exp_mult", [1]),
                       ("initial_rms_decays", "abc"), ("initial_rms_decays", [7]),
                       ("initial_rms_decays", [0.5] * 1000), ("frobnicate", 1)):
        cases.append(crafted(f"config-{key}={value!r}"[:60], set_config(key, value)))
    cases.append(crafted("resealed-ok", lambda m: m, expect=LOADED))
    for label, edit in (
        ("config-list", lambda m: {**m, "config": [1, 2]}),
        ("config-missing", lambda m: {k: v for k, v in m.items() if k != "config"}),
        ("architecture-int", lambda m: {**m, "architecture": 5}),
        ("architecture-unknown", lambda m: {**m, "architecture": "nope"}),
        ("format-wrong", lambda m: {**m, "format": "other"}),
        ("version-str", lambda m: {**m, "format_version": "2"}),
        ("version-true", lambda m: {**m, "format_version": True}),
        ("version-1", lambda m: {**m, "format_version": 1}),
        ("version-99", lambda m: {**m, "format_version": 99}),
        ("files-missing", lambda m: {k: v for k, v in m.items() if k != "files"}),
        ("files-list", lambda m: {**m, "files": ["meta_params.safetensors"]}),
        ("files-extra", lambda m: {**m, "files": {**m["files"], "x": {}}}),
        ("bytes-negative", lambda m: {**m, "files": {"meta_params.safetensors": {
            **m["files"]["meta_params.safetensors"], "bytes": -1}}}),
        ("bytes-huge", lambda m: {**m, "files": {"meta_params.safetensors": {
            **m["files"]["meta_params.safetensors"], "bytes": 2**70}}}),
        ("sha-not-hex", lambda m: {**m, "files": {"meta_params.safetensors": {
            **m["files"]["meta_params.safetensors"], "sha256": "z" * 64}}}),
        ("top-list", lambda m: [m]),
    ):
        cases.append(crafted(label, edit))
    cases.append(crafted("json-deep", raw_meta=b"[" * 200_000 + b"]" * 200_000))
    cases.append(crafted("json-nan", raw_meta=json.dumps(
        {**meta, "config": {**meta["config"], "exp_mult": float("nan")}}).encode()))
    cases.append(crafted("json-huge-int", raw_meta=json.dumps(meta).encode().replace(
        b'"hidden_size": 4', b'"hidden_size": ' + b"9" * 6000)))
    cases.append(crafted("json-not-utf8", raw_meta=b'{"format": "\xff"}'))
    for label, change in (
        ("int32", {"w0": good_tensors["w0"].to(torch.int32)}),
        ("bool", {"b0": good_tensors["b0"] > 0}),
        ("float64", {"w1": good_tensors["w1"].double()}),
        ("float16", {"w1": good_tensors["w1"].half()}),
        ("complex64", {"w1": good_tensors["w1"].to(torch.complex64)}),
        ("nan", {"w2": torch.full_like(good_tensors["w2"], float("nan"))}),
        ("inf", {"b2": torch.full_like(good_tensors["b2"], float("inf"))}),
        ("misshaped", {"w1": torch.zeros(5, 4)}),
        ("extra", {"extra": torch.zeros(1)}),
    ):
        cases.append(crafted(f"tensor-{label}", tensors={**good_tensors, **change}))
    cases.append(crafted("tensor-missing", tensors={
        k: v for k, v in good_tensors.items() if k != "b1"}))
    cases.append(crafted("tensor-ok", tensors=good_tensors, expect=LOADED))

    outside = tmp / "outside.safetensors"
    outside.write_bytes(files["meta_params.safetensors"])
    for name in files:
        cases.append(Case(f"native/fifo/{name}", REFUSED, {**files, name: ("fifo", None)}))
        target = tmp / f"outside-{name}"
        target.write_bytes(files[name])
        cases.append(Case(f"native/symlink/{name}", REFUSED,
                          {**files, name: ("symlink", str(target))}))
    cases.append(Case("native/symlink-dev-zero", REFUSED,
                      {**files, "meta_params.safetensors": ("symlink", "/dev/zero")}))
    cases.append(Case("native/sparse-huge-weights", REFUSED,
                      {**files, "meta_params.safetensors": ("sparse", 1 << 36)}))
    cases.append(Case("native/sparse-huge-json", REFUSED, {**files, "lopt.json": ("sparse",
                                                                                  1 << 36)}))
    cases.append(Case("native/extra-file", REFUSED, {**files, "README": b"hello"}))
    cases.append(Case("native/extra-dir", REFUSED, {**files, "sub/x": b"hello"}))
    return cases


def _materialise(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif content[0] == "symlink":
            target.symlink_to(content[1])
        elif content[0] == "fifo":
            os.mkfifo(target)
        elif content[0] == "sparse":
            with open(target, "wb") as f:
                f.truncate(content[1])
        else:  # pragma: no cover
            raise ValueError(content)


def test_format_fuzz(tmp_path):
    """Every fuzz case loads or is refused with metaopt's FormatError, in bounded time
    and memory; cases whose outcome is certain (pristine files, NaN weights, int dtypes,
    oversized architectures, ...) have exactly that outcome."""
    rng = np.random.default_rng(SEED)
    cases = release_cases(rng) + velo_cases(rng) + native_cases(rng, tmp_path)
    assert len(cases) >= 300
    jobs = []
    for i, case in enumerate(cases):
        folder = tmp_path / "cases" / f"{i:04d}"
        _materialise(case, folder)
        jobs.append((i, str(folder)))
    start = time.monotonic()
    results = _run_batch(jobs, tmp_path / "child-stderr.log")
    elapsed = time.monotonic() - start
    failures = []
    for i, case in enumerate(cases):
        outcome, detail = results[i]
        if outcome not in (LOADED, REFUSED):
            failures.append(f"{case.name}: {outcome} {detail}")
        elif case.expect != EITHER and outcome != case.expect:
            failures.append(f"{case.name}: expected {case.expect}, got {outcome} {detail}")
    counts = Counter(results[i][0] for i in range(len(cases)))
    print(f"\nformat fuzz: {len(cases)} cases in {elapsed:.1f} s: {dict(counts)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(
        failures[:50])
