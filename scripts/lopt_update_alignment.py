"""Where an optimizer's update points along a long run: towards −gradient, or along the
parameters (weight growth)?

    python scripts/lopt_update_alignment.py [--opt NAME_OR_PATH | --opt adamw:LR ...]
        [--suite mlp_mup_val] [--task 2] [--width 128] [--steps 5000] [--window 500]
        [--seed 0] [--json PATH]

Each optimizer trains task ``--task`` of ``--suite`` for ``--steps`` steps (initialisation
and batches from a generator seeded ``--seed * 1000 + task``, as in the benchmarks). Per
step, with Δ the whole update (all tensors flattened) and g the gradient,
``cos_neg_grad`` = cos(Δ, −g) — how much of the step is descent — and ``cos_params`` =
cos(Δ, θ) — how much of it scales the weights up. Printed and saved as means over
consecutive ``--window``-step windows, with the training loss and the parameter norm.
``adamw:LR`` is AdamW (decoupled weight decay 0.01, ``torch.optim.AdamW``'s default) at
that learning rate, for reference. A learned optimizer whose loss rises on long runs
while ``cos_neg_grad`` decays and ``cos_params`` stays is growing the weights rather than
descending.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from statistics import fmean

import torch

from metaopt.fileio import atomic_write_text
from metaopt.lopt import load_checkpoint
from metaopt.optim import adamw, apply_updates
from metaopt.params import Params
from metaopt.runner.experiments.lopt_metatrain import init_kwargs
from tasks.lopt_tasks import heldout_suite

Stepper = Callable[[Params, Params, torch.Tensor], Params]


def make_stepper(spec: str, task, theta: Params, steps: int) -> Stepper:
    """``(grads, params, loss) -> new params`` for a learned optimizer or ``adamw:LR``."""
    if spec.startswith("adamw:"):
        opt = adamw(float(spec.split(":", 1)[1]))
        state = opt.init(theta)

        def step(grads: Params, params: Params, loss: torch.Tensor) -> Params:
            nonlocal state
            updates, state = opt.update(grads, state, params)
            return apply_updates(params, updates)
        return step
    lopt = load_checkpoint(spec)
    lstate = lopt.init(theta, steps, **init_kwargs(lopt, task))

    def lstep(grads: Params, params: Params, loss: torch.Tensor) -> Params:
        nonlocal lstate
        new, lstate = lopt.update(grads, lstate, params, loss=loss)
        return new
    return lstep


def _flat(tree: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


def alignment(spec: str, task, steps: int, window: int, seed: int, index: int) -> list[dict]:
    """Window means of loss, cos(Δ, −g), cos(Δ, θ) and ‖θ‖ along one run."""
    gen = torch.Generator().manual_seed(seed * 1000 + index)
    theta = task.init_params(gen)
    step = make_stepper(spec, task, theta, steps)
    rows, acc = [], {"loss": [], "cos_neg_grad": [], "cos_params": [], "param_norm": []}
    for k in range(steps):
        with torch.enable_grad():
            th = {n: v.detach().requires_grad_() for n, v in theta.items()}
            loss = task.loss(th, task.sample_batch(gen, "train"))
            grads = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
        with torch.no_grad():
            new = step(grads, theta, loss.detach())
            delta, g, p = _flat(new) - _flat(theta), _flat(grads), _flat(theta)
            tiny = torch.finfo(delta.dtype).tiny
            acc["loss"].append(float(loss))
            acc["cos_neg_grad"].append(float(-(delta @ g) / (delta.norm() * g.norm() + tiny)))
            acc["cos_params"].append(float((delta @ p) / (delta.norm() * p.norm() + tiny)))
            acc["param_norm"].append(float(p.norm()))
        theta = {n: v.detach() for n, v in new.items()}
        if (k + 1) % window == 0 or k + 1 == steps:
            rows.append({"step": k + 1, **{key: fmean(v) for key, v in acc.items()}})
            acc = {key: [] for key in acc}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opt", action="append",
                    help="learned optimizer name/path or adamw:LR (repeatable; default: "
                         "mulo-small-fc-w128)")
    ap.add_argument("--suite", default="mlp_mup_val")
    ap.add_argument("--task", type=int, default=2, help="index into the suite")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    tasks = heldout_suite(args.suite, widths=[args.width])
    if not 0 <= args.task < len(tasks):
        ap.error(f"--task must index the {len(tasks)} tasks of {args.suite}, got {args.task}")
    task = tasks[args.task]
    out = {}
    for spec in args.opt or ["mulo-small-fc-w128"]:
        rows = alignment(spec, task, args.steps, args.window, args.seed, args.task)
        out[spec] = rows
        for r in rows:
            print(f"{spec:28s} step {r['step']:6d}  loss {r['loss']:.4g}  cos(Δ,−g) "
                  f"{r['cos_neg_grad']:+.3f}  cos(Δ,θ) {r['cos_params']:+.3f}  "
                  f"‖θ‖ {r['param_norm']:.4g}", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"suite": args.suite, "task": task.name, "steps": args.steps,
             "window": args.window, "seed": args.seed, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
