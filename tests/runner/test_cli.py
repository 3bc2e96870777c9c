"""The `metaopt` command end to end, with a real SIGTERM to a training subprocess.

One uninterrupted run and one run that gets SIGTERM mid-training and is resumed with
`metaopt resume`; the final checkpoint tensors and metrics must agree bit for bit.
Only the interrupted training runs in a subprocess (importing torch takes seconds on
a loaded machine); the other commands call ``metaopt.cli.main`` in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metaopt.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = Path(__file__).parent / "configs" / "tiny_ridge.yaml"
FINAL = Path("checkpoints") / "step_00000300"


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def metaopt(*args: str, check: bool = True) -> Result:
    """Run ``metaopt ARGS`` in this process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(cwd)
    if check and rc != 0:
        raise AssertionError(f"metaopt {args} failed ({rc}):\n{err.getvalue()}")
    return Result(rc, out.getvalue(), err.getvalue())


def metrics_without_time(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    full, cut = root / "full", root / "cut"
    metaopt("train", str(TINY), "--run-dir", str(full), "--no-progress")

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "metaopt", "train", str(TINY),
                             "--run-dir", str(cut), "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it is mid-training
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 30:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    found = re.search(r"interrupted at step (\d+)/300", out)
    step = int(found.group(1)) if found else None
    saved = sorted(p.name for p in (cut / "checkpoints").iterdir())
    resume = metaopt("resume", str(cut), "--no-progress")
    return {"full": full, "cut": cut, "rc": proc.returncode, "out": out, "err": err,
            "step": step, "saved": saved, "resume": resume}


def test_sigterm_checkpoints_and_exits(runs):
    assert runs["rc"] == 128 + signal.SIGTERM, runs["err"]
    assert "received SIGTERM" in runs["err"] and "metaopt resume" in runs["out"]
    cut = runs["cut"]
    status = json.loads((cut / "status.json").read_text())
    assert status["state"] == "finished"  # after the resume
    env = json.loads((cut / "env.json").read_text())
    assert env["command"][1] == "train" and env["resumes"][0]["command"][1] == "resume"
    assert runs["step"] is not None and 10 <= runs["step"] < 300, runs["out"]
    assert runs["saved"][-1] == f"step_{runs['step']:08d}"


def test_resumed_run_is_bit_identical_to_uninterrupted(runs):
    full, cut = runs["full"], runs["cut"]
    assert (full / FINAL / "tensors.safetensors").read_bytes() == \
        (cut / FINAL / "tensors.safetensors").read_bytes()
    a, b = metrics_without_time(full), metrics_without_time(cut)
    assert len(a) == 300 + 12 and a == b


def test_eval_and_plot_on_the_resumed_run(runs, tmp_path):
    cut, full = runs["cut"], runs["full"]
    proc = metaopt("eval", str(cut), "--split", "test")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["step"] == 300 and record["split"] == "test" and record["mse"] > 0
    assert (cut / "eval.jsonl").exists()
    metaopt("plot", str(cut))
    png = cut / "plots" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cmp.png"
    metaopt("plot", str(full), str(cut), "--out", str(out), "--names", "full", "resumed")
    assert out.stat().st_size > 10_000


def test_resume_of_finished_run_is_a_no_op(runs):
    before = (runs["full"] / "metrics.jsonl").read_text()
    proc = metaopt("resume", str(runs["full"]), "--no-progress")
    assert "finished 300/300" in proc.stdout
    assert (runs["full"] / "metrics.jsonl").read_text() == before


def test_corrupt_checkpoint_gives_a_clear_error(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["full"], run)
    tensors = run / FINAL / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    proc = metaopt("eval", str(run), check=False)
    assert proc.returncode == 2
    assert "metaopt: error:" in proc.stderr and "truncated" in proc.stderr


def test_config_errors_exit_2_naming_key_and_file(tmp_path):
    proc = metaopt("train", str(TINY), "settings.inner_steps=many", "--run-dir",
                   str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    assert "settings.inner_steps" in proc.stderr and "expected int" in proc.stderr
    assert "tiny_ridge.yaml" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_train_refuses_an_existing_run_dir(runs):
    proc = metaopt("train", str(TINY), "--run-dir", str(runs["full"]), check=False)
    assert proc.returncode == 2 and "metaopt resume" in proc.stderr


def test_list_shows_registries():
    out = metaopt("list").stdout
    assert "experiments:" in out and "ridge_hyper" in out
    assert "estimators:" in out and "unrolled" in out
    assert "pretrained learned optimizers:" in out
