"""What a new user (and a second process) hits with the `metaopt` command.

* a hard kill (SIGKILL) before the first checkpoint, then `resume`: no duplicated
  metrics records, the file equals an uninterrupted run's;
* a run directory held by another process: `resume`/`train` refused, naming its PID;
* a wrong estimator name or option: one line, exit 2, no run directory left behind;
* a missing optional extra: one line naming the extra, before any work;
* `metaopt resume RUN_DIR steps=N` extends a finished run (recorded in env.json);
* with output piped, a progress line every N steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.runner.test_cli import REPO, TINY, metaopt, metrics_without_time

PY = [sys.executable, "-m", "metaopt"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*PY, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.communicate()[1]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"{path} never reached {n} lines")


# --------------------------------------------------------------------------- kill, resume


def test_sigkill_before_first_checkpoint_then_resume_has_no_duplicates(tmp_path):
    """Before: 372 records, 60 duplicates (checkpoint_every=0, killed after 60 steps)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    over = ["checkpoint_every=0", "steps=150"]
    metaopt("train", str(TINY), *over, "--run-dir", str(full), "--no-progress")
    proc = popen("train", str(TINY), *over, "--run-dir", str(cut), "--no-progress")
    wait_for_lines(cut / "metrics.jsonl", 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not list((cut / "checkpoints").glob("step_*"))  # nothing to resume from
    resumed = metaopt("resume", str(cut), "--no-progress")
    assert "no checkpoint yet; starting from step 0" in resumed.stdout
    a, b = metrics_without_time(full), metrics_without_time(cut)
    steps = [(r["step"], r["split"]) for r in b]
    assert len(steps) == len(set(steps)) == 150 + 6
    assert a == b


# --------------------------------------------------------------------------- the lock


def test_a_run_dir_in_use_by_another_process_is_refused(tmp_path):
    run = tmp_path / "run"
    metaopt("train", str(TINY), "steps=20", "--run-dir", str(run), "--no-progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metaopt.runner.rundir import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(run)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "metrics.jsonl").read_text()
        proc = metaopt("resume", str(run), "steps=40", "--no-progress", check=False)
        assert proc.returncode == 2
        assert f"in use by another metaopt process (PID {holder.pid})" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert (run / "metrics.jsonl").read_text() == before  # nothing written
        assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 20
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the process: the run continues
    assert "finished 40/40" in metaopt("resume", str(run), "steps=40", "--no-progress").stdout


@pytest.mark.slow
def test_two_resumes_race_one_refused(tmp_path):
    """Two real `metaopt resume` processes: one runs, the other is refused at once."""
    run = tmp_path / "run"
    metaopt("train", str(TINY), "steps=10", "--run-dir", str(run), "--no-progress")
    first = popen("resume", str(run), "steps=3000", "--no-progress")
    try:
        wait_for_lines(run / "metrics.jsonl", 10 + 1 + 20, first)
        second = popen("resume", str(run), "steps=3000", "--no-progress")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"PID {first.pid}" in err and "Traceback" not in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    records = metrics_without_time(run)
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys))


def test_train_in_library_refuses_a_locked_run_dir(tmp_path):
    from metaopt.runner.config import load_run_config
    from metaopt.runner.loop import train
    from metaopt.runner.rundir import RunDirError, RunLock, create_run_dir

    cfg = load_run_config(TINY, ["steps=2"])
    run = create_run_dir(tmp_path / "r", cfg, ["test"])
    with RunLock(run), pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
        train(cfg, run)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("override, message", [
    ("settings.estimator=ift", "unknown estimator 'ift'; known: bome, f2sa, first_order, "
                               "implicit, unrolled"),
    ("settings.estimator_options={foo: 1}", "estimator 'unrolled' does not accept option(s) "
                                            "foo; it accepts: truncate"),
    ("settings.estimator_options={truncate: -3}", "estimator 'unrolled' with options"),
])
def test_bad_estimator_is_one_line_and_leaves_no_run_dir(tmp_path, override, message):
    run = tmp_path / "x"
    proc = metaopt("train", str(TINY), override, "--run-dir", str(run), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaopt: error: "), proc.stderr
    assert message in lines[0] and "tiny_ridge.yaml" in lines[0]
    assert not run.exists()


def test_resume_may_not_change_the_runs_identity(tmp_path):
    run = tmp_path / "run"
    metaopt("train", str(TINY), "steps=5", "--run-dir", str(run), "--no-progress")
    proc = metaopt("resume", str(run), "settings.inner_steps=9", check=False)
    assert proc.returncode == 2
    assert "'settings.inner_steps' cannot change when resuming" in proc.stderr


def test_resume_of_a_missing_run_dir_creates_nothing(tmp_path):
    proc = metaopt("resume", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "is not a run directory" in proc.stderr
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- extras


def test_plot_names_the_missing_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    proc = metaopt("plot", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "pip install 'metaopt[plot]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_extra_refused_before_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    run = tmp_path / "hc"
    proc = metaopt("train", str(REPO / "configs" / "hypercleaning.yaml"), "--run-dir", str(run),
                   check=False)
    assert proc.returncode == 2
    assert "experiment 'hypercleaning' needs the optional package 'mlxtend'" in proc.stderr
    assert "pip install 'metaopt[data]'" in proc.stderr
    assert not run.exists()


def test_demo_checks_the_plot_extra_before_training(monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import maml_sinusoid_demo as demo
    finally:
        sys.path.remove(str(REPO / "scripts"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def no_training(*a, **k):
        raise AssertionError("the demo trained before checking its extras")

    monkeypatch.setattr(demo, "train", no_training)
    assert demo.main(["--steps", "1"]) == 2
    assert "pip install 'metaopt[plot]'" in capsys.readouterr().err
    assert demo.DEFAULT_OUT.is_relative_to(REPO / "out")  # git-ignored, not results/


def test_demo_output_is_git_ignored():
    out = subprocess.run(["git", "check-ignore", "-q", "out/demo/maml_sinusoid.png"],
                         cwd=REPO, check=False)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.returncode == 0
    makefile = (REPO / "Makefile").read_text()
    demo_recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "results/" not in demo_recipe


# --------------------------------------------------------------------------- extend, progress


def test_resume_extends_a_finished_run(tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    metaopt("train", str(TINY), "steps=100", "--run-dir", str(short), "--no-progress")
    metaopt("train", str(TINY), "steps=150", "--run-dir", str(long_), "--no-progress")
    proc = metaopt("resume", str(short), "steps=150", "--no-progress")
    assert "changed: steps 100 -> 150" in proc.stdout and "finished 150/150" in proc.stdout
    env = json.loads((short / "env.json").read_text())
    assert env["resumes"][-1]["config_changes"] == {"steps": {"old": 100, "new": 150}}
    assert yaml.safe_load((short / "config.yaml").read_text())["steps"] == 150
    train_a = [r for r in metrics_without_time(short) if r["split"] == "train"]
    train_b = [r for r in metrics_without_time(long_) if r["split"] == "train"]
    assert train_a == train_b  # extending = having asked for 150 steps from the start
    assert (short / "checkpoints" / "step_00000150" / "tensors.safetensors").read_bytes() == \
        (long_ / "checkpoints" / "step_00000150" / "tensors.safetensors").read_bytes()


def test_piped_output_prints_a_progress_line_every_n_steps(tmp_path):
    """stdout/stderr are StringIO here, i.e. not a terminal (as in a pipe)."""
    proc = metaopt("train", str(TINY), "steps=40", "eval_every=0", "log.progress=true",
                   "--run-dir", str(tmp_path / "p"))
    steps = [int(line.split()[1].split("/")[0]) for line in proc.stdout.splitlines()
             if line.startswith("step ")]
    assert steps == list(range(2, 41, 2))  # every steps // 20
    assert "\r" not in proc.stderr  # no progress bar drawn into a pipe
    proc = metaopt("train", str(TINY), "steps=40", "eval_every=0", "log.print_every=0",
                   "--run-dir", str(tmp_path / "q"))
    assert [line for line in proc.stdout.splitlines() if line.startswith("step ")] == \
        [proc.stdout.splitlines()[-2]]  # print_every=0: only the final evaluation
