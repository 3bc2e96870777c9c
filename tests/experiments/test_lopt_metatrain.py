"""The learned-optimizer meta-training experiment: builds, steps, evaluates, resumes
bit-exactly through the runner's checkpoint files, and its configs parse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metaopt.runner.checkpoint import write_checkpoint
from metaopt.runner.config import load_run_config, parse_run_config, to_dict
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into
from tests.experiments.resume_check import assert_resumed_run_matches

ROOT = Path(__file__).resolve().parents[2]
TINY = {"task": {"kind": "mlp", "param": "mup", "width": 16, "depth": 1,
                 "dataset": "digits", "batch_size": 16},
        "num_tasks": 2, "truncation": 4, "horizon_low": 6, "horizon_high": 12,
        "warmup_steps": 2, "eval_steps": 5, "eval_tasks": 1, "eval_widths": [16]}


def cfg_for(settings: dict, seed: int = 1, steps: int = 3):
    return parse_run_config({"experiment": "lopt_metatrain", "seed": seed, "steps": steps,
                             "settings": settings})


@pytest.mark.parametrize("estimator", ["pes", "es", "tbptt"])
def test_steps_change_the_meta_parameters_and_evaluate(estimator):
    exp = build_experiment(cfg_for({**TINY, "estimator": estimator}))
    before = {k: v.clone() for k, v in exp.phi.items()}
    for s in (1, 2):
        m = exp.meta_step(s)
    assert m["grad_norm"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
    assert any(not torch.equal(before[k], exp.phi[k]) for k in before)
    ev = exp.evaluate("val")
    assert set(ev) == {"final_loss", "final_median_loss", "test_metric"}
    assert ev["final_loss"] > 0 and ev["final_median_loss"] > 0


def test_interrupt_and_resume_is_bit_identical(tmp_path):
    cfg = cfg_for({**TINY, "optimizer": "small_fc_lopt",
                   "task": {**TINY["task"], "param": "sp"}})
    straight = build_experiment(cfg)
    losses = [straight.meta_step(s)["loss"] for s in (1, 2, 3, 4)]
    first = build_experiment(cfg)
    for s in (1, 2):
        first.meta_step(s)
    path = write_checkpoint(tmp_path, step=2, experiment=cfg.experiment, config=to_dict(cfg),
                            state=checkpoint_state(first, 0.0))
    resumed = build_experiment(cfg)
    torch.manual_seed(12345)
    load_into(resumed, cfg, path)
    assert [resumed.meta_step(s)["loss"] for s in (3, 4)] == losses[2:]
    for k in straight.phi:
        assert torch.equal(straight.phi[k], resumed.phi[k]), k
    a = straight.est_state.unroll.inner["theta"]
    b = resumed.est_state.unroll.inner["theta"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["lopt_mulo.yaml", "lopt_sp.yaml", "lopt_mulo_logloss.yaml",
                                  "lopt_sp_logloss.yaml", "lopt_mulo_logmean.yaml",
                                  "lopt_mulo_glyphs.yaml", "lopt_mulo_glyphs_continued.yaml",
                                  "lopt_mulo_long_horizon.yaml", "lopt_mulo_from_sp.yaml",
                                  "lopt_mulo_from_sp_late.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_run_config(ROOT / "configs" / name)
    assert cfg.experiment == "lopt_metatrain"
    assert cfg.settings.estimator == "pes" and cfg.settings.truncation == 50


@pytest.mark.parametrize("name", ["lopt_mulo_logloss.yaml", "lopt_mulo_logmean.yaml",
                                  "lopt_mulo_glyphs.yaml", "lopt_mulo_glyphs_continued.yaml",
                                  "lopt_mulo_long_horizon.yaml", "lopt_mulo_from_sp.yaml",
                                  "lopt_mulo_from_sp_late.yaml"])
def test_fine_tune_configs_start_from_their_shipped_stage(name):
    from metaopt.lopt import load_checkpoint

    cfg = load_run_config(ROOT / "configs" / name)
    exp = build_experiment(cfg)  # refused if the release's architecture/config differ
    start = load_checkpoint(cfg.settings.init_from)
    for k, v in start.state_dict().items():
        assert torch.equal(exp.phi[k], v), k


def test_bad_settings_name_the_field():
    with pytest.raises(Exception, match="optimizer"):
        cfg_for({**TINY, "optimizer": "nope"})
    with pytest.raises(Exception, match="task.kind"):
        cfg_for({**TINY, "task": {"kind": "resnet"}})
    with pytest.raises(Exception, match="meta_loss"):
        cfg_for({**TINY, "meta_loss": "sqrt"})
    with pytest.raises(Exception, match="segment_objective"):
        cfg_for({**TINY, "segment_objective": "median"})
    with pytest.raises(Exception, match="segment_objective 'log_mean'.*meta_loss"):
        cfg_for({**TINY, "segment_objective": "log_mean", "meta_loss": "log"})


def test_segment_objective_reaches_every_estimator():
    settings = {**TINY, "task": [TINY["task"], TINY["task"]]}
    plain = build_experiment(cfg_for(settings)).meta_step(1)["loss"]
    exp = build_experiment(cfg_for({**settings, "segment_objective": "log_mean"}))
    assert [e.segment_objective for e in exp.estimators] == ["log_mean", "log_mean"]
    logged = exp.meta_step(1)["loss"]
    # the same particles' losses: the mean of segment log-means is below the log of the
    # mean loss (Jensen), and close to it
    assert math.log(plain) - 0.5 < logged < math.log(plain), (logged, plain)


MIXTURE = [TINY["task"], {**TINY["task"], "dataset": "mnist1d", "depth": 2,
                          "activation": "gelu"}]


def test_a_mixture_averages_the_entries_estimates():
    """The mixture's step is the mean of each entry's own estimate: entry 0 is the
    single-task run itself (same seed), entry 1 is a single task seeded apart."""
    mix = build_experiment(cfg_for({**TINY, "task": MIXTURE}))
    assert len(mix.systems) == 2 and mix.tasks[1].config["dataset"] == "mnist1d"
    single = build_experiment(cfg_for(TINY))
    est1, sys1 = mix.estimators[1], mix.systems[1]
    state1 = est1.start(sys1, mix.phi, None)
    g0 = single.estimator(single.system, single.phi, None, single.est_state)
    g1 = est1(sys1, mix.phi, None, state1)
    m = mix.meta_step(1)
    assert m["loss_0"] == float(g0.outer_loss) and m["loss_1"] == float(g1.outer_loss)
    assert m["loss"] == pytest.approx((m["loss_0"] + m["loss_1"]) / 2)
    norm = torch.sqrt(sum(((g0.grad[k] + g1.grad[k]) / 2).double().pow(2).sum()
                          for k in g0.grad))
    assert m["grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    assert m["inner_steps"] == 2 * 2 * 2 * TINY["truncation"]
    # the entries' streams differ: their particles are perturbed by different seeds
    assert est1.seed != mix.estimators[0].seed


def test_a_mixture_resumes_bit_identically(tmp_path):
    """Through the runner: killed after step 1 and resumed, the mixture ends with the same
    φ and evaluations as a straight run (every entry's unroll state is checkpointed)."""
    cfg = parse_run_config({"experiment": "lopt_metatrain", "seed": 1, "steps": 3,
                            "checkpoint_every": 1, "eval_every": 3,
                            "settings": {**TINY, "task": MIXTURE}})
    assert_resumed_run_matches(cfg, tmp_path)


def test_a_mixture_refuses_what_it_cannot_do():
    with pytest.raises(Exception, match=r"task\[1\].kind"):
        cfg_for({**TINY, "task": [TINY["task"], {"kind": "resnet"}]})
    with pytest.raises(Exception, match="empty"):
        cfg_for({**TINY, "task": []})
    with pytest.raises(Exception, match="single task"):
        cfg_for({**TINY, "task": MIXTURE, "max_staleness": 1})


def _saved_perturbed(architecture: str, seed: int, path):
    """A learned optimizer of ``architecture`` with seeded noise on its φ, saved at ``path``."""
    from metaopt.lopt import ARCHITECTURES, save_checkpoint

    torch.manual_seed(seed)
    lopt = ARCHITECTURES[architecture]()
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(lopt, path)
    return lopt


def test_init_from_starts_at_a_trained_optimizers_meta_parameters(tmp_path):
    """settings.init_from: φ starts at the saved optimizer's meta-parameters (not the
    seeded initialisation) and meta-training moves on from there; a different
    architecture or constructor config is refused, naming the field."""
    trained = _saved_perturbed("mulo_small_fc", 77, tmp_path / "start")
    exp = build_experiment(cfg_for({**TINY, "init_from": str(tmp_path / "start")}))
    fresh = build_experiment(cfg_for(TINY))
    saved = dict(trained.named_parameters())
    assert all(torch.equal(exp.phi[k], saved[k].detach()) for k in exp.phi)
    assert any(not torch.equal(exp.phi[k], fresh.phi[k]) for k in exp.phi)
    exp.meta_step(1)
    assert any(not torch.equal(exp.phi[k], saved[k].detach()) for k in exp.phi)
    with pytest.raises(Exception, match="init_from"):
        build_experiment(cfg_for({**TINY, "init_from": str(tmp_path / "start"),
                                  "optimizer_options": {"step_mult": 0.002}}))
    with pytest.raises(Exception, match="init_from"):
        build_experiment(cfg_for({**TINY, "init_from": str(tmp_path / "start"),
                                  "optimizer": "small_fc_lopt"}))


def test_init_from_takes_a_small_fc_release_as_a_mulo_start(tmp_path):
    """μLO's small_fc has small_fc_lopt's meta-parameters (only the per-tensor μP step
    scale differs): a small_fc_lopt checkpoint (the SP twin's kind) starts a mulo_small_fc
    run at the same φ; the other way round stays refused (test above)."""
    sp = _saved_perturbed("small_fc_lopt", 5, tmp_path / "sp")
    exp = build_experiment(cfg_for({**TINY, "init_from": str(tmp_path / "sp")}))
    assert exp.config.optimizer == "mulo_small_fc"
    saved = dict(sp.named_parameters())
    assert exp.phi.keys() == saved.keys()
    assert all(torch.equal(exp.phi[k], saved[k].detach()) for k in exp.phi)
