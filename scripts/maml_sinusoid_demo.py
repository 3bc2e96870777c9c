"""Meta-train MAML on sinusoids in about two minutes, compare it with a pretrained baseline.

    python scripts/maml_sinusoid_demo.py [--steps 1500] [--out out/demo/maml_sinusoid.png]

``make demo`` runs it with the defaults; its outputs go under the git-ignored ``out/``.
The README figure is regenerated explicitly with
``python scripts/maml_sinusoid_demo.py --out results/maml/demo.png``.

Both models are the MAML paper's 1-40-40-1 ReLU MLP trained for the same number of
outer steps on meta-batches of 25 ten-shot sinusoid tasks (``configs/maml_sinusoid.yaml``
and ``configs/maml_sinusoid_pretrained.yaml``): MAML meta-learns an initialisation for
one SGD step (lr 0.01); the baseline does ordinary regression on all tasks' points.
At test time both are fine-tuned the same way on K support points of held-out tasks.

Prints a table of query MSE after 1 and 10 steps at K=5 and K=10, and writes a PNG:
(left) both models adapted to one held-out sinusoid from 5 points; (right) mean
query MSE against the number of adaptation steps. The PNG needs matplotlib (the
``plot`` extra); that is checked before training starts (``--no-plot`` skips it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metaopt.errors import MissingExtraError  # noqa: E402
from metaopt.runner.config import load_run_config  # noqa: E402
from metaopt.runner.experiments.sinusoid import SinusoidRegression  # noqa: E402
from metaopt.runner.extras import PLOT, require_extras  # noqa: E402
from metaopt.runner.loop import build_experiment  # noqa: E402

CONFIGS = {"MAML": ROOT / "configs" / "maml_sinusoid.yaml",
           "pretrained": ROOT / "configs" / "maml_sinusoid_pretrained.yaml"}
CURVE_STEPS = list(range(11))
#: Where ``make demo`` writes (git-ignored, so a demo run never dirties the checkout).
DEFAULT_OUT = ROOT / "out" / "demo" / "maml_sinusoid.png"


def train(label: str, steps: int, seed: int, bar: tqdm) -> SinusoidRegression:
    """Build the configured experiment and run ``steps`` outer steps, ticking ``bar``."""
    cfg = load_run_config(CONFIGS[label], [f"seed={seed}", f"steps={steps}"])
    experiment = build_experiment(cfg)
    assert isinstance(experiment, SinusoidRegression)
    for step in range(1, steps + 1):
        loss = experiment.meta_step(step)["loss"]
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(model=label, loss=f"{loss:.3f}", refresh=False)
    return experiment


def plot(models: dict[str, SinusoidRegression], curves: dict[str, dict[int, float]],
         path: Path) -> None:
    """Adapted fits on one held-out task (K=5) and MSE vs adaptation steps (K=5, 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.sinusoid import sinusoid

    fig, (ax_fit, ax_mse) = plt.subplots(1, 2, figsize=(12, 4.5))
    any_model = next(iter(models.values()))
    task_batch = any_model.held_out_tasks("test", 5)
    task = task_batch.task(0)
    grid = torch.linspace(-5, 5, 200).reshape(-1, 1)
    truth = sinusoid(grid, task_batch.info["amplitude"][0], task_batch.info["phase"][0])
    ax_fit.plot(grid, truth, color="black", lw=2, label="true function")
    ax_fit.scatter(task.support_x, task.support_y, color="black", marker="^", s=60, zorder=5,
                   label="5 support points")
    styles = {"MAML": "tab:red", "pretrained": "tab:blue"}
    for label, exp in models.items():
        for steps, ls in ((0, ":"), (1, "--"), (10, "-")):
            params = exp.trainer.adapt(task.support_x, task.support_y,
                                       torch.nn.functional.mse_loss, steps)
            pred = exp.trainer.predict(params, grid)
            ax_fit.plot(grid, pred, color=styles[label], ls=ls, lw=1.5,
                        label=f"{label}, {steps} step{'s' if steps != 1 else ''}")
    ax_fit.set(title="Adapting to a held-out sinusoid from K=5 points", xlabel="x",
               ylabel="y", xlim=(-5, 5))
    ax_fit.legend(fontsize=7, loc="upper center", ncol=3, framealpha=0.9)
    ax_fit.set_ylim(-6.5, 8)
    for key, curve in curves.items():
        label, k = key.rsplit(" K=", 1)
        ax_mse.plot(CURVE_STEPS, [curve[s] for s in CURVE_STEPS], marker="o",
                    color=styles[label], ls="-" if k == "10" else "--", label=key)
    ax_mse.set(title="Query MSE on 100 held-out tasks", xlabel="adaptation steps (SGD, lr 0.01)",
               ylabel="mean squared error", ylim=(0, None))
    ax_mse.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="outer steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="PNG path (default: out/demo/maml_sinusoid.png; the README "
                             "figure is results/maml/demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared, busy machine)")
    args = parser.parse_args(argv)
    if not args.no_plot:
        try:
            require_extras(PLOT, "the demo's plot")
        except MissingExtraError as e:
            print(f"maml_sinusoid_demo: error: {e} (or pass --no-plot)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models: dict[str, SinusoidRegression] = {}
    with tqdm(total=2 * args.steps, unit="step", desc="meta-training",
              dynamic_ncols=True) as bar:
        for label in CONFIGS:
            models[label] = train(label, args.steps, args.seed, bar)
    train_s = time.perf_counter() - start
    print("Evaluating on 100 held-out tasks per K …", flush=True)
    curves = {f"{label} K={k}": exp.mse_curve("test", k, CURVE_STEPS)
              for label, exp in models.items() for k in (5, 10)}
    print(f"\nSinusoid regression, query MSE after fine-tuning ({args.steps} outer steps "
          f"each, seed {args.seed}, {train_s:.0f}s of training):\n")
    print("| method | K=5, 1 step | K=5, 10 steps | K=10, 1 step | K=10, 10 steps |")
    print("|---|---|---|---|---|")
    for label in models:
        cells = [f"{curves[f'{label} K={k}'][s]:.3f}" for k in (5, 10) for s in (1, 10)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if not args.no_plot:
        plot(models, curves, args.out)
        print(f"\nplot: {args.out}")
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
