#!/usr/bin/env python
"""Side-by-side second-order MAML: metaopt vs higher, TorchOpt and learn2learn (issue 6).

    python scripts/bench_maml_peers.py [--quick] [--json PATH] [--repeats N]

For every model × meta-batch × inner-steps configuration all contenders start from the
same initial weights and the same tasks (``scripts/peers/common.py``). Per contender:

* meta-gradient: from its first (warm-up) meta-step; ``max_rel_diff`` = max over parameters
  of ``max|g_metaopt − g_peer| / (max|g_peer| + tiny)``. A second figure,
  ``max_rel_diff_signal``, is the same maximum over the parameters whose peer gradient is
  *not* at float32 noise level — noise level meaning ``max|g_peer,param| < 1e-5 · max over
  all parameters`` (``common.NOISE_REL``). In the conv net these are the conv biases: each
  feeds a training-mode BatchNorm, so its meta-gradient is analytically zero and every
  implementation returns rounding residue, whose relative difference is O(1) between any
  two implementations that round differently. Those parameters are listed in
  ``noise_params_abs_diff`` with ``max|g_metaopt − g_peer|``, never silently dropped;
  ``max_rel_diff`` stays the headline figure;
* time per meta-step (zero grads + meta-loss + backward): median of ``--repeats`` runs,
  taken in interleaved rounds (every round runs each contender once, in rotated order) so
  that load changes on a shared machine hit all contenders alike;
* CPU time per meta-step (``time.process_time``, all threads of the process), median of the
  same runs, as ``cpu_time_ratio``: on an oversubscribed machine wall time mostly measures
  waiting for a core, CPU time much less so;
* peak memory of one steady-state meta-step. CPU: each contender runs in a fresh
  subprocess; after a warm-up step, for each of ``--memory-steps`` further steps it calls
  ``malloc_trim(0)``, resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) and
  records ``VmHWM − VmRSS`` across the step (Linux only; otherwise not measured); the
  median is reported. For the small MLP a step peaks at ~50–250 KiB, a few dozen pages, and
  one step's reading scatters by ±40% from allocator state alone (the same contender, same
  process: 36–72 KiB), so a single reading cannot resolve the 1.2x bound; the median of 7
  agrees to ~10% between runs. CUDA: ``max_memory_allocated`` minus the allocation before
  the step, in-process.

metaopt runs ``MAML(model, ...)`` with its defaults (``strategy="auto"`` within a memory
budget of one task: the per-task loop). ``--metaopt-chunk-size N`` gives it a budget of
``N`` tasks instead (``0``: the whole meta-batch), so ``auto`` may ``vmap`` over chunks of
``N`` tasks: the speed-for-memory trade the library offers; records say which
(``metaopt_chunk_size``). ``--metaopt-rewrites none`` passes ``rewrites="none"`` (the
plain trace, without the exact pool-before-ReLU rewrite). Every setting reaches metaopt
as an argument (no environment variable).

Parity (issue 11 §3), unless ``--no-parity``: per configuration, a float64 reference
meta-gradient (``peers/reference.py``, plain ``functional_call`` + ``autograd.grad`` on
the same weights and tasks cast to float64), then

* ``f64_rel_diff``: metaopt's float64 meta-gradient vs the peer's float64 one (the rule
  asks ≤ 1e-10 relative, ``parity_f64_ok``);
* ``metaopt_f32_err`` / ``peer_f32_err``: each float32 meta-gradient (the warm-up step
  above) against the float64 reference; ``worst_peer_f32_err`` is the largest over the
  peer libraries (not ``reference``), and ``parity_f32_ok`` says whether
  ``metaopt_f32_err ≤ 1.5 × worst_peer_f32_err``.

All three are ``max_rel_diff_signal``-style figures (parameters at noise level in the
reference are left out and listed with their absolute difference in
``*_noise_abs``); ``f64_rel_diff_all`` is the figure over every parameter.

Ratios are metaopt/peer, so < 1 means metaopt is faster / leaner. While
``metaopt.algorithms.MAML`` is not importable the plain reference implementation stands in
for metaopt and every record says so (``metaopt_impl``).

The learn2learn peer needs ``scripts/peers/install_learn2learn.sh`` on Python 3.11; a peer
that cannot be imported is skipped with its reason.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from peers import common, reference  # noqa: E402
from peers.metaopt_peer import configured as metaopt_configured  # noqa: E402
from peers.metaopt_peer import resolve as resolve_metaopt  # noqa: E402

PEERS: dict[str, tuple[str, str]] = {
    # name: (module, make_step attribute)
    "higher": ("peers.higher_peer", "make_step"),
    "torchopt": ("peers.torchopt_peer", "make_step"),
    "torchopt_func": ("peers.torchopt_peer", "make_step_functional"),
    "learn2learn": ("peers.l2l_peer", "make_step"),
    "reference": ("peers.reference", "make_step"),
}
DEFAULT_PEERS = ("higher", "torchopt", "learn2learn")
FULL_CONFIGS = [
    (model, batch, steps) for model in ("mlp", "conv") for batch in (8, 32) for steps in (1, 5)
]
QUICK_CONFIGS = [("mlp", 8, 5), ("conv", 8, 1)]
F64_TOL = 1e-10
"""Float64 parity: metaopt vs each peer, relative (issue 11 §3)."""
F32_FACTOR = 1.5
"""Float32 parity: metaopt's error vs the float64 reference ≤ this × the worst peer's."""


def load_make_step(name: str) -> common.MakeStep:
    """The ``make_step`` of contender ``name`` (``metaopt`` or a key of :data:`PEERS`)."""
    if name == "metaopt":
        return resolve_metaopt()[0]
    module, attr = PEERS[name]
    if name == "learn2learn":
        importlib.import_module("learn2learn")  # fail here, with the import error, if missing
    return getattr(importlib.import_module(module), attr)


def metaopt_chunk_for(meta_batch: int, args: argparse.Namespace) -> int | None:
    """The chunk size ``--metaopt-chunk-size`` asks for at this meta-batch (None: default)."""
    if args.metaopt_chunk_size is None:
        return None
    return meta_batch if args.metaopt_chunk_size == 0 else args.metaopt_chunk_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def measure_step_memory_mb(step: Callable[[], object], device: torch.device) -> float | None:
    """Peak extra memory (MiB) of one call of ``step`` (already warmed up)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not _reset_peak_rss():
        return None
    before = _proc_status_kib("VmRSS")
    step()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: one warm-up and one measured meta-step of one contender."""
    torch.set_num_threads(spec["threads"]) if spec["threads"] > 0 else None
    device = torch.device(spec["device"])
    problem = common.make_problem(
        spec["model"], spec["meta_batch"], spec["inner_steps"], seed=spec["seed"], device=device
    )
    if spec["contender"] == "metaopt" and spec.get("metaopt_impl_is_metaopt", True):
        make_step = metaopt_configured(spec.get("metaopt_chunk_size"),
                                       spec.get("metaopt_rewrites"))
    else:
        make_step = load_make_step(spec["contender"])
    model = common.instantiate(problem.model_factory_state)
    step = make_step(model, problem.inner_steps, problem.inner_lr, problem.loss_fn)
    step(problem.tasks)
    samples = [measure_step_memory_mb(lambda: step(problem.tasks), device)
               for _ in range(max(1, spec.get("memory_steps", 1)))]
    if any(s is None for s in samples):
        return {"mem_mb": None, "mem_samples_mb": []}
    return {"mem_mb": statistics.median(samples), "mem_samples_mb": samples}


def measure_memory(
    contender: str, model: str, meta_batch: int, inner_steps: int, args: argparse.Namespace
) -> float | None:
    spec = {
        "contender": contender,
        "model": model,
        "meta_batch": meta_batch,
        "inner_steps": inner_steps,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "metaopt_chunk_size": metaopt_chunk_for(meta_batch, args),
        "metaopt_rewrites": args.metaopt_rewrites,
        "metaopt_impl_is_metaopt": args.metaopt_is_metaopt,
        "memory_steps": args.memory_steps,
    }
    if torch.device(args.device).type == "cuda":  # in-process is exact on CUDA
        return memory_child(spec)["mem_mb"]
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(f"    memory child for {contender} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["mem_mb"]


# --------------------------------------------------------------------------- one config
def bench_config(
    model_name: str,
    meta_batch: int,
    inner_steps: int,
    contenders: dict[str, common.MakeStep],
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Gradients, losses, times and memory of every contender on one configuration."""
    device = torch.device(args.device)
    problem = common.make_problem(
        model_name, meta_batch, inner_steps, seed=args.seed, device=device
    )
    steps, results = {}, {}
    for name, make_step in contenders.items():
        model = common.instantiate(problem.model_factory_state)
        step = make_step(model, problem.inner_steps, problem.inner_lr, problem.loss_fn)
        loss = step(problem.tasks)  # warm-up; its gradient is the one compared
        synchronize(device)
        results[name] = {
            "meta_loss": float(loss), "grads": common.read_grads(model), "ms": [], "cpu_ms": []
        }
        steps[name] = step
    names = list(contenders)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name](problem.tasks)
            synchronize(device)
            results[name]["ms"].append(1e3 * (time.perf_counter() - start))
            results[name]["cpu_ms"].append(1e3 * (time.process_time() - cpu_start))
    del steps
    gc.collect()
    if not args.no_parity:
        parity(problem, contenders, results)
    for name in names:
        res = results[name]
        res["median_ms"] = statistics.median(res["ms"])
        res["median_cpu_ms"] = statistics.median(res["cpu_ms"])
        res["mem_mb"] = (
            None if args.no_memory
            else measure_memory(name, model_name, meta_batch, inner_steps, args)
        )
    return results


def parity(problem: common.Problem, contenders: dict[str, common.MakeStep],
           results: dict[str, dict]) -> None:
    """Add the float64/float32 parity figures (module docstring) to ``results``."""
    p64 = common.to_float64(problem)

    def grads64(make_step: common.MakeStep) -> dict[str, torch.Tensor]:
        return common.run_meta_gradient(make_step, p64.model_factory_state, p64.tasks,
                                        p64.inner_steps, p64.inner_lr, p64.loss_fn)[1]

    ref64 = grads64(reference.make_step)
    for name, make_step in contenders.items():
        res = results[name]
        res["f32_err"], res["f32_noise_abs"] = common.signal_rel_diff(res["grads"], ref64)
        res["grads64"] = ref64 if name == "reference" else grads64(make_step)
    ours = results["metaopt"]["grads64"]
    for res in results.values():
        res["f64_rel_diff"], res["f64_noise_abs"] = common.signal_rel_diff(ours, res["grads64"])
        res["f64_rel_diff_all"] = common.max_rel_diff(ours, res["grads64"])
    peers = [results[n]["f32_err"] for n in results if n not in ("metaopt", "reference")]
    worst = max(peers) if peers else None
    for res in results.values():
        res["worst_peer_f32_err"] = worst


def records_for(model: str, meta_batch: int, inner_steps: int, results: dict[str, dict],
                metaopt_impl: str) -> list[dict]:
    """One record per peer, ratios metaopt/peer."""
    ours = results["metaopt"]
    records = []
    for peer, res in results.items():
        if peer == "metaopt":
            continue
        signal, noise_abs = common.signal_rel_diff(ours["grads"], res["grads"])
        mem_ratio = None
        if ours["mem_mb"] is not None and res["mem_mb"]:
            mem_ratio = ours["mem_mb"] / res["mem_mb"]
        records.append({
            "model": model,
            "peer": peer,
            "inner_steps": inner_steps,
            "meta_batch": meta_batch,
            "max_rel_diff": common.max_rel_diff(ours["grads"], res["grads"]),
            "max_rel_diff_signal": signal,
            "noise_params_abs_diff": noise_abs,
            "noise_rel": common.NOISE_REL,
            "time_ratio": ours["median_ms"] / res["median_ms"],
            "cpu_time_ratio": ours["median_cpu_ms"] / res["median_cpu_ms"],
            "mem_ratio": mem_ratio,
            "metaopt_ms": ours["median_ms"],
            "peer_ms": res["median_ms"],
            "metaopt_cpu_ms": ours["median_cpu_ms"],
            "peer_cpu_ms": res["median_cpu_ms"],
            "metaopt_mem_mb": ours["mem_mb"],
            "peer_mem_mb": res["mem_mb"],
            "metaopt_meta_loss": ours["meta_loss"],
            "peer_meta_loss": res["meta_loss"],
            "metaopt_runs_ms": ours["ms"],
            "peer_runs_ms": res["ms"],
            "metaopt_impl": metaopt_impl,
            "metaopt_chunk_size": ours.get("chunk_size"),
            "metaopt_rewrites": ours.get("rewrites"),
            **parity_fields(ours, res),
        })
    return records


def parity_fields(ours: dict, res: dict) -> dict:
    """The parity figures of one metaopt/peer record (empty when not computed)."""
    if "f32_err" not in ours:
        return {}
    worst = ours["worst_peer_f32_err"]
    return {
        "f64_rel_diff": res["f64_rel_diff"],
        "f64_rel_diff_all": res["f64_rel_diff_all"],
        "f64_noise_abs": res["f64_noise_abs"],
        "parity_f64_ok": res["f64_rel_diff"] <= F64_TOL,
        "metaopt_f32_err": ours["f32_err"],
        "peer_f32_err": res["f32_err"],
        "metaopt_f32_noise_abs": ours["f32_noise_abs"],
        "peer_f32_noise_abs": res["f32_noise_abs"],
        "worst_peer_f32_err": worst,
        "parity_f32_ok": None if worst is None else ours["f32_err"] <= F32_FACTOR * worst,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(records: list[dict]) -> None:
    header = (f"{'model':5} {'B':>3} {'steps':>5} {'peer':13} {'max_rel_diff':>12} "
              f"{'signal_rel':>10} "
              f"{'metaopt ms':>10} {'peer ms':>9} {'time_ratio':>10} {'cpu_ratio':>9} "
              f"{'metaopt MiB':>11} {'peer MiB':>8} {'mem_ratio':>9} "
              f"{'f64_rel':>8} {'f32 ours':>8} {'f32 peer':>8}")
    print(header)
    print("-" * len(header))
    for r in records:
        print(f"{r['model']:5} {r['meta_batch']:>3} {r['inner_steps']:>5} {r['peer']:13} "
              f"{r['max_rel_diff']:>12.2e} {r['max_rel_diff_signal']:>10.2e} "
              f"{r['metaopt_ms']:>10.1f} {r['peer_ms']:>9.1f} "
              f"{r['time_ratio']:>10.2f} {r['cpu_time_ratio']:>9.2f} "
              f"{_fmt(r['metaopt_mem_mb'], '11.3f'):>11} "
              f"{_fmt(r['peer_mem_mb'], '8.3f'):>8} {_fmt(r['mem_ratio'], '9.2f'):>9} "
              f"{_fmt(r.get('f64_rel_diff'), '8.1e'):>8} "
              f"{_fmt(r.get('metaopt_f32_err'), '8.1e'):>8} "
              f"{_fmt(r.get('peer_f32_err'), '8.1e'):>8}")
    noisy = {(r["model"], r["meta_batch"], r["inner_steps"], r["peer"]): r["noise_params_abs_diff"]
             for r in records if r["noise_params_abs_diff"]}
    if noisy:
        print(f"\nsignal_rel: max_rel_diff without the parameters whose peer gradient is below "
              f"{common.NOISE_REL:g} x the largest (float noise); their max|g_metaopt - g_peer|:")
        for (model, batch, steps, peer), diffs in noisy.items():
            listed = ", ".join(f"{name} {diff:.1e}" for name, diff in diffs.items())
            print(f"  {model} B={batch} steps={steps} {peer}: {listed}")
    parity_rows = [r for r in records if "parity_f64_ok" in r]
    if parity_rows:
        print(f"\nparity: f64_rel = metaopt vs peer in float64 (<= {F64_TOL:g}); f32 = error vs "
              f"the float64 reference (metaopt <= {F32_FACTOR} x worst peer library):")
        seen = set()
        for r in parity_rows:
            key = (r["model"], r["meta_batch"], r["inner_steps"])
            f64_ok = all(q["parity_f64_ok"] for q in parity_rows
                         if (q["model"], q["meta_batch"], q["inner_steps"]) == key
                         and q["peer"] != "reference")
            if key not in seen:
                seen.add(key)
                print(f"  {key[0]} B={key[1]} steps={key[2]}: float64 "
                      f"{'ok' if f64_ok else 'FAIL'}; float32 metaopt "
                      f"{r['metaopt_f32_err']:.2e} vs worst peer "
                      f"{_fmt(r['worst_peer_f32_err'], '.2e')}: "
                      f"{ {True: 'ok', False: 'FAIL', None: '—'}[r['parity_f32_ok']] }")


def write_json(path: Path, records: list[dict], metaopt_impl: str, skipped: dict[str, str],
               args: argparse.Namespace) -> None:
    payload = {
        "metaopt_impl": metaopt_impl,
        "skipped_peers": skipped,
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "memory_steps": args.memory_steps,
        "metaopt_chunk_size_arg": args.metaopt_chunk_size,
        "metaopt_rewrites": args.metaopt_rewrites or "exact (library default)",
        "parity": not args.no_parity,
        "records": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small subset (mlp B=8 5 steps, conv B=8 1 step), 3 repeats, "
                        "3 memory steps")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed meta-steps per contender (default 5; 3 with --quick)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated subset of {sorted(PEERS)}")
    parser.add_argument("--models", default="mlp,conv", help="comma-separated: mlp, conv")
    parser.add_argument("--meta-batches", default="8,32", help="comma-separated subset of 8,32")
    parser.add_argument("--inner-steps", default="1,5", help="comma-separated subset of 1,5")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="measured meta-steps per memory child; the median is reported "
                        "(default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: leave torch's default); on a busy "
                        "shared machine use 1, several threads per process then mostly wait")
    parser.add_argument("--metaopt-chunk-size", type=int, default=None,
                        help="give metaopt's MAML chunk_size=N (a memory budget of N tasks; "
                        "0: the whole meta-batch) instead of its default of one task")
    parser.add_argument("--metaopt-rewrites", choices=("none", "exact"), default=None,
                        help="give metaopt's MAML rewrites=LEVEL (default: the library's, "
                        "'exact'; both are bit-identical to functional_call)")
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the float64 runs of the parity figures")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.memory_steps is None:
        args.memory_steps = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return []
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    metaopt_step, metaopt_impl = resolve_metaopt()
    args.metaopt_is_metaopt = metaopt_impl == "metaopt.algorithms.MAML"
    contenders: dict[str, common.MakeStep] = {"metaopt": metaopt_step}
    skipped: dict[str, str] = {}
    for name in filter(None, args.peers.split(",")):
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
        try:
            contenders[name] = load_make_step(name)
        except Exception as exc:  # a missing optional peer is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"
    models = [m for m in args.models.split(",") if m]
    batches = {int(b) for b in args.meta_batches.split(",") if b}
    inner = {int(k) for k in args.inner_steps.split(",") if k}
    configs = [
        (model, batch, steps)
        for model, batch, steps in (QUICK_CONFIGS if args.quick else FULL_CONFIGS)
        if model in models and batch in batches and steps in inner
    ]

    print(f"metaopt contender: {metaopt_impl}", flush=True)
    for name, why in skipped.items():
        print(f"skipping peer {name}: {why}")
    if args.no_memory:
        memory = "off"
    elif torch.device(args.device).type == "cuda":
        memory = "CUDA max_memory_allocated"
    else:
        memory = "peak RSS increase in a fresh subprocess"
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}, memory: {memory}", flush=True)
    records: list[dict] = []
    start = time.perf_counter()
    for model, batch, steps in configs:
        t0 = time.perf_counter()
        chunk = metaopt_chunk_for(batch, args)
        if args.metaopt_is_metaopt:
            contenders["metaopt"] = metaopt_configured(chunk, args.metaopt_rewrites)
        results = bench_config(model, batch, steps, contenders, args)
        results["metaopt"]["chunk_size"] = chunk
        results["metaopt"]["rewrites"] = args.metaopt_rewrites
        new = records_for(model, batch, steps, results, metaopt_impl)
        records += new
        times = ", ".join(
            f"{n} {r['median_ms']:.1f} ms (cpu {r['median_cpu_ms']:.1f})"
            for n, r in results.items()
        )
        print(f"[{model} B={batch} steps={steps}] {times}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if args.json:  # rewritten after every configuration, so a cut-off run leaves data
            write_json(args.json, records, metaopt_impl, skipped, args)
    print()
    print_table(records)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    main()
