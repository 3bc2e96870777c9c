"""Per-step wall time of learned optimizers versus AdamW, through the torch.optim shell.

    python scripts/bench_lopt_step.py [--json PATH] [--quick] [--device cpu|cuda|all]

For MLPs of ~100k, ~1M and ~10M parameters, one backward pass makes the gradients; then only
``opt.step`` is timed (warm-up steps first, then the optimizers interleaved, one step
each per round, median over rounds; CUDA is synchronised around each step; wall and
thread-CPU time). Every row records ``optimizer, n_params, device, ms_per_step,
ratio_vs_adamw`` (AdamW(foreach=True) measured in the same run on the same model) and
``state_bytes_per_param`` (optimizer state tensors, per-tensor and global, divided by
the number of parameters). Meta-parameters are random: speed does not depend on them.
Every learned optimizer is built with an explicit backend: ``backend="cpu_kernels"``
(the fused C kernels, ``metaopt.lopt.cpu_kernels``) on CPU, ``"reference"`` elsewhere;
rows named ``…[pytorch]`` run the same optimizer with ``backend="reference"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from metaopt.lopt.mulo import MuSmallFC, MuVeLO
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO

#: name → (hidden width, number of hidden layers); input 256, output 10.
SIZES = {"100k": (160, 3), "1M": (640, 3), "10M": (2176, 3)}


def make_mlp(width: int, depth: int, d_in: int = 256, d_out: int = 10) -> nn.Module:
    """ReLU MLP ``d_in → width (×depth) → d_out``."""
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (per-parameter and global state)."""
    total = sum(_tensor_bytes(dict(s)) for s in opt.state.values())
    return total + _tensor_bytes(getattr(opt, "_global", None))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
               repeats: int) -> dict[str, tuple[float, float]]:
    """Per name, median (wall ms, thread-CPU ms) of ``step()`` after ``warmup`` untimed
    calls. The optimizers are timed interleaved (one step of each per round), so load
    from other processes hits all of them alike; CPU time is robust to being descheduled.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            _sync(device)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.thread_time() - c0) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}


def optimizers(device: str = "cpu"
               ) -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    """Name → factory; learned optimizers go through ``lopt.optimizer(...)`` with an
    explicit backend. Names ending in ``[pytorch]`` use ``backend="reference"``."""
    velo, mulo_velo = VeLO(), MuVeLO()
    small_fc, mulo_small_fc = SmallFCLOpt(), MuSmallFC()
    fast = "cpu_kernels" if device == "cpu" else "reference"

    def shell(lopt, backend):
        return lambda ps: lopt.to(ps[0].device).optimizer(ps, num_steps=10_000,
                                                          backend=backend)

    return {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "small_fc_lopt": shell(small_fc, fast),
        "velo": shell(velo, fast),
        "mulo_small_fc": shell(mulo_small_fc, fast),
        "mulo_velo": shell(mulo_velo, fast),
        "small_fc_lopt[pytorch]": shell(small_fc, "reference"),
        "velo[pytorch]": shell(velo, "reference"),
    }


def _step_fn(name: str, opt: torch.optim.Optimizer, loss: torch.Tensor) -> Callable[[], None]:
    if name == "adamw":
        return opt.step
    return lambda: opt.step(loss=loss)


def bench(sizes: list[str], devices: list[str], warmup: int, repeats: int,
          names: list[str] | None = None) -> list[dict]:
    rows = []
    for dev_name in devices:
        factories = optimizers(dev_name)
        names = names or list(factories)
        if "adamw" not in names:
            names = ["adamw", *names]
        device = torch.device(dev_name)
        for size in sizes:
            width, depth = SIZES[size]
            torch.manual_seed(0)
            model = make_mlp(width, depth).to(device)
            params = list(model.parameters())
            n_params = sum(p.numel() for p in params)
            x = torch.randn(64, 256, device=device)
            y = torch.randint(0, 10, (64,), device=device)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads = [p.grad.detach().clone() for p in params]
            loss = loss.detach()
            init_state = [p.detach().clone() for p in params]
            opts, steps = {}, {}
            for name in names:  # every optimizer steps the same parameters in turn
                with torch.no_grad():
                    for p, p0, g in zip(params, init_state, grads):
                        p.copy_(p0)
                        p.grad = g.clone()
                opt = opts[name] = factories[name](params)
                steps[name] = _step_fn(name, opt, loss)
            times = time_steps(steps, device, warmup, repeats)
            base_ms, base_cpu = times["adamw"]
            for name in names:
                ms, cpu_ms = times[name]
                rows.append({
                    "optimizer": name, "n_params": n_params, "device": dev_name,
                    "ms_per_step": round(ms, 3),
                    "ratio_vs_adamw": round(ms / base_ms, 2),
                    "cpu_ms_per_step": round(cpu_ms, 3),
                    "cpu_ratio_vs_adamw": round(cpu_ms / base_cpu, 2),
                    "state_bytes_per_param": round(state_bytes(opts[name]) / n_params, 2),
                    "threads": torch.get_num_threads(),
                })
                print(f"  {dev_name:5s} {n_params:>10,d} {name:14s} {ms:9.2f} ms "
                      f"({ms / base_ms:5.2f}x AdamW; CPU {cpu_ms:8.2f} ms, "
                      f"{cpu_ms / base_cpu:5.2f}x)", flush=True)
            del opts, steps
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| optimizer | n_params | device | ms/step | × AdamW | CPU ms/step | CPU × AdamW "
          "| state bytes/param |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['n_params']:,} | {r['device']} | {r['ms_per_step']:.2f} "
              f"| {r['ratio_vs_adamw']:.2f} | {r['cpu_ms_per_step']:.2f} "
              f"| {r['cpu_ratio_vs_adamw']:.2f} | {r['state_bytes_per_param']:.1f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true",
                    help="~100k and ~1M parameters only, few repeats")
    ap.add_argument("--sizes", nargs="*", default=None, choices=sorted(SIZES),
                    help="model sizes (default: all; --quick: 100k 1M)")
    ap.add_argument("--device", default="all", help="cpu, cuda or all (cuda if available)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--optimizers", nargs="*", default=None, help="subset of optimizers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    sizes = args.sizes or (["100k", "1M"] if args.quick else ["100k", "1M", "10M"])
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = args.warmup or (2 if args.quick else 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"warmup {warmup}, median of {repeats}")
    rows = bench(sizes, devices, warmup, repeats, args.optimizers)
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
