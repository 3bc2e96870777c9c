"""Ray Tune sweep checks run by tests/distributed/test_tune*.py in one subprocess.

Usage: ``python tune_checks.py TEMP_DIR WORK_DIR OUT_JSON PART [PART ...]`` with parts
``grid``, ``pbt``, ``resume``. Starts one loopback-only Ray session (files under
TEMP_DIR), writes the sweep files and sweep directories under WORK_DIR, runs each
part and writes what it measured to OUT_JSON; the test modules assert on it. Not
collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import torch
import yaml

from metaopt.cli import main as cli
from metaopt.distributed.loopback import init_loopback_ray
from metaopt.distributed.tune import load_sweep, run_sweep
from metaopt.runner.checkpoint import latest_checkpoint, read_checkpoint
from metaopt.runner.config import load_run_config, parse_run_config
from metaopt.runner.loop import build_experiment, load_into, train
from metaopt.runner.metrics import read_metrics
from metaopt.runner.rundir import create_run_dir, load_run_dir_config, read_status

#: A tiny MAML-on-sinusoids run: 12 outer steps, evaluation (= Tune report) every 4.
TINY = {
    "experiment": "sinusoid", "seed": 0, "steps": 12, "eval_every": 4,
    "log": {"tensorboard": False},
    "settings": {"algorithm": "maml", "hidden": [8], "meta_batch": 2, "k_shot": 5,
                 "q_query": 5, "inner_lr": 0.01, "outer_lr": 0.01, "eval_shots": [5],
                 "eval_steps": [1], "eval_tasks": 4, "eval_query": 10, "strategy": "loop"},
}
METRIC = "val_mse_k5_step1"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


def standalone(cfg, scratch: Path, resume: Path | None = None) -> list[dict]:
    """The plain runner on ``cfg`` in a fresh run directory (optionally from a checkpoint)."""
    cfg.run_dir = str(scratch)
    create_run_dir(scratch, cfg, ["tune_checks"])
    train(cfg, scratch, resume=resume, progress=False, out=io.StringIO())
    return records(scratch)


def grid_part(work: Path, out: dict) -> None:
    base = write_yaml(work / "tiny.yaml", TINY)
    sweep = write_yaml(work / "grid.yaml", {
        "base": str(base), "search": {"settings.inner_lr": {"grid": [0.01, 0.03]}},
        "metric": METRIC, "mode": "min", "resources": {"cpu": 1}})
    text = io.StringIO()
    t0 = time.monotonic()
    result = run_sweep(load_sweep(sweep), work / "grid", out=text)
    out["grid_s"] = time.monotonic() - t0
    out["grid_output"] = text.getvalue()
    out["grid_rows"] = result.rows
    out["grid_best"] = result.best
    out["grid_summary_file"] = (work / "grid" / "summary.json").exists()
    out["grid_trials"] = []
    for row in result.rows:
        run_dir = Path(row["run_dir"])
        cfg = load_run_dir_config(run_dir)
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        experiment = build_experiment(cfg)
        step = load_into(experiment, cfg, ckpt).step
        mine = records(run_dir)
        final_eval = next(r for r in mine if r["split"] == "val" and r["step"] == cfg.steps)
        reloaded = experiment.evaluate("val")
        alone = standalone(load_run_config(run_dir / "config.yaml"),
                           work / f"alone-{run_dir.name}")
        out["grid_trials"].append({
            "run_dir": str(run_dir),
            "files": sorted(p.name for p in run_dir.iterdir()),
            "status": read_status(run_dir),
            "inner_lr": cfg.settings.inner_lr,
            "row_inner_lr": row["params"]["settings.inner_lr"],
            "checkpoint_step": step,
            "reload_eval": reloaded["mse_k5_step1"], "final_eval": final_eval["mse_k5_step1"],
            "reported": row[METRIC],
            "equal_to_standalone": mine == alone, "n_records": len(mine),
        })
    first = Path(result.rows[0]["run_dir"])
    out["grid_cli_eval_rc"] = cli(["eval", str(first)])
    out["grid_cli_resume_rc"] = cli(["resume", str(first), "steps=16", "--no-progress"])
    out["grid_cli_resume_status"] = read_status(first)


def pbt_part(work: Path, out: dict) -> None:
    # 8 steps: one perturbation (at step 4; a trial at its last step is not perturbed)
    base = write_yaml(work / "tiny8.yaml", {**TINY, "steps": 8})
    sweep = write_yaml(work / "pbt.yaml", {
        "base": str(base),
        # two very different outer rates: one trial is clearly behind at every interval
        "search": {"settings.outer_lr": {"grid": [1.0e-4, 3.0e-2]}},
        "metric": METRIC, "mode": "min", "resources": {"cpu": 1},
        "pbt": {"perturbation_interval": 4, "quantile_fraction": 0.5, "synch": True,
                "resample_probability": 0.5,
                "hyperparam_mutations": {
                    "settings.outer_lr": {"loguniform": [1.0e-3, 3.0e-2]},
                    "settings.inner_lr": {"choice": [0.005, 0.02]}}}})
    text = io.StringIO()
    t0 = time.monotonic()
    result = run_sweep(load_sweep(sweep), work / "pbt", out=text)
    out["pbt_s"] = time.monotonic() - t0
    out["pbt_output"] = text.getvalue()
    out["pbt_rows"] = result.rows
    tune_dir = work / "pbt" / "tune"
    out["pbt_tune_logs"] = sorted(p.name for p in tune_dir.iterdir() if p.name.startswith("pbt"))
    exploits = []
    for row in result.rows:
        run_dir = Path(row["run_dir"])
        path = run_dir / "pbt.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        steps = [r["step"] for r in lines]
        for i, rec in enumerate(lines):
            s = rec["step"]
            mine = read_checkpoint(run_dir / "checkpoints" / f"step_{s:08d}")
            donor_path = Path(rec["donor_run_dir"]) / "checkpoints" / f"step_{s:08d}"
            same_state = None
            if donor_path.exists():
                donor = read_checkpoint(donor_path)
                a, b = mine.state["experiment"], donor.state["experiment"]
                same_state = all(torch.equal(x, y) for x, y in
                                 zip(_leaves(a), _leaves(b))) and len(_leaves(a)) > 0
            cfg = parse_run_config(mine.config, source="ckpt")
            applied = {k: getattr(cfg.settings, k.split(".", 1)[1]) == v["new"]
                       for k, v in rec["mutated"].items()}
            # The runner alone, from the adopted checkpoint with the mutated config,
            # up to the next exploit of this trial: the same records as the trial's.
            end = steps[i + 1] if i + 1 < len(steps) else cfg.steps
            cfg.steps = end
            alone = standalone(cfg, work / f"pbt-alone-{run_dir.name}-{s}",
                               resume=mine.path)
            theirs = [r for r in records(run_dir) if s < r["step"] <= end]
            exploits.append({"trial": run_dir.name, "donor": rec["donor"], "step": s,
                             "mutated": rec["mutated"], "applied": applied,
                             "same_state_as_donor": same_state,
                             "replay_equal": [r for r in alone if r["step"] > s] == theirs,
                             "replay_records": len(theirs),
                             "resumes_in_env": len(json.loads(
                                 (run_dir / "env.json").read_text()).get("resumes", []))})
    out["pbt_exploits"] = exploits


def _leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _leaves(v)]
    return []


def resume_part(work: Path, out: dict) -> None:
    """A sweep CLI (a second Ray driver) SIGKILLed mid-sweep, then rerun."""
    # 40 steps a trial (10 reports), so the kill lands while the second one runs.
    base = write_yaml(work / "tiny40.yaml", {**TINY, "steps": 40})
    sweep = write_yaml(work / "resume.yaml", {
        "base": str(base), "search": {"settings.inner_lr": {"grid": [0.01, 0.02, 0.03]}},
        "metric": METRIC, "mode": "min", "resources": {"cpu": 1}, "max_concurrent": 1})
    sweep_dir = work / "resume"
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "metaopt", "sweep", str(sweep), "--dir", str(sweep_dir),
            "--address", address]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    trials = sweep_dir / "trials"
    deadline = time.monotonic() + 150
    killed_when = None
    while time.monotonic() < deadline and first.poll() is None:
        dirs = sorted(trials.iterdir()) if trials.exists() else []  # run in id order
        states = [read_status(d) for d in dirs]
        if (len(dirs) >= 2 and states[0].get("state") == "finished"
                and states[1].get("state") == "running" and states[1].get("step", 0) >= 8):
            killed_when = {d.name: s for d, s in zip(dirs, states)}
            # The driver and the running trial's worker (the PID its run.lock names):
            # an orphaned worker could otherwise finish its trial on its own.
            worker = (dirs[1] / "run.lock").read_text().strip()
            os.killpg(first.pid, signal.SIGKILL)
            if worker:
                try:
                    os.kill(int(worker), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out["resume_killed_worker"] = worker
            break
        time.sleep(0.05)
    out["resume_first_output"] = first.communicate(timeout=60)[0][-3000:]
    out["resume_killed_when"] = killed_when
    before = {d.name: {"metrics": (d / "metrics.jsonl").read_text(),
                       "env": (d / "env.json").read_text()} for d in trials.iterdir()}
    t0 = time.monotonic()
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out["resume_s"] = time.monotonic() - t0
    out["resume_rc"] = second.returncode
    out["resume_output"] = second.stdout[-4000:]
    out["resume_stderr"] = second.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    out["resume_rows"] = summary["trials"]
    trials_out = {}
    for d in trials.iterdir():
        env = json.loads((d / "env.json").read_text())
        old = before.get(d.name)
        trials_out[d.name] = {
            "status": read_status(d),
            "metrics_unchanged": old is not None and old["metrics"] == (
                d / "metrics.jsonl").read_text(),
            "env_unchanged": old is not None and old["env"] == (d / "env.json").read_text(),
            "resumes": len(env.get("resumes", [])),
            "equal_to_standalone": records(d) == standalone(
                load_run_config(d / "config.yaml"), work / f"resume-alone-{d.name}"),
        }
    out["resume_trials"] = trials_out


def main() -> None:
    temp_dir, work, out_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    parts = sys.argv[4:]
    torch.set_num_threads(1)  # as in Ray's workers (OMP_NUM_THREADS=1): same arithmetic
    t0 = time.monotonic()
    out: dict = {"node_ips": init_loopback_ray(temp_dir, num_cpus=2)}
    out["driver_ip"] = ray.util.get_node_ip_address()
    out["init_s"] = time.monotonic() - t0
    for part in parts:
        {"grid": grid_part, "pbt": pbt_part, "resume": resume_part}[part](work, out)
    out["home_ray_results"] = os.path.exists(os.path.expanduser("~/ray_results"))
    out["total_s"] = time.monotonic() - t0
    with open(out_path, "w") as f:
        json.dump(out, f, default=str)
    ray.shutdown()


if __name__ == "__main__":
    main()
