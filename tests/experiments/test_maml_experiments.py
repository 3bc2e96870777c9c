"""The MAML-family experiments: they build, step, evaluate, resume exactly, and MAML
beats the pretrained baseline on sinusoids (the MAML paper's qualitative result)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metaopt.algorithms
from metaopt.runner.checkpoint import write_checkpoint
from metaopt.runner.config import load_run_config, parse_run_config, to_dict
from metaopt.runner.experiments.few_shot import ALGORITHMS, FewShotClassification
from metaopt.runner.experiments.sinusoid import SinusoidRegression
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into

ROOT = Path(__file__).resolve().parents[2]

#: Class each algorithm needs from metaopt.algorithms (ANIL is MAML with inner_params).
NEEDS = {"maml": "MAML", "fomaml": "FOMAML", "anil": "MAML", "metasgd": "MetaSGD",
         "reptile": "Reptile", "imaml": "iMAML", "pretrained": "MAML"}

TINY_SINUSOID = {"hidden": [8, 8], "k_shot": 3, "q_query": 4, "meta_batch": 2,
                 "eval_tasks": 2, "eval_query": 5, "eval_shots": [2], "eval_steps": [0, 2]}
TINY_FEW_SHOT = {"dataset": "glyphs", "transfer": "digits", "glyph_classes": 3, "n_way": 3,
                 "k_shot": 1, "q_query": 2, "channels": 4, "blocks": 2, "meta_batch": 2,
                 "eval_tasks": 2, "eval_steps": [1, 2]}


def need(algorithm: str) -> None:
    """Skip when engineer M's package does not (yet) provide the algorithm."""
    if not hasattr(metaopt.algorithms, NEEDS[algorithm]):
        pytest.skip(f"metaopt.algorithms has no {NEEDS[algorithm]} yet")


def run_config(experiment: str, settings: dict, seed: int = 0, steps: int = 2):
    return parse_run_config({"experiment": experiment, "seed": seed, "steps": steps,
                             "settings": settings})


def all_params(experiment) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in experiment.trainer.meta_parameters.items()}


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "pretrained"])
def test_sinusoid_builds_steps_and_evaluates(algorithm):
    need(algorithm)
    cfg = run_config("sinusoid", {**TINY_SINUSOID, "algorithm": algorithm})
    exp = build_experiment(cfg)
    assert isinstance(exp, SinusoidRegression)
    before = all_params(exp)
    losses = [exp.meta_step(step)["loss"] for step in (1, 2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = all_params(exp)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    metrics = exp.evaluate("test")
    assert set(metrics) == {"mse_k2_step0", "mse_k2_step2"}
    assert all(v >= 0 for v in metrics.values())
    with pytest.raises(ValueError, match="unknown split"):
        exp.evaluate("nope")


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil"])
def test_few_shot_builds_steps_and_evaluates(algorithm):
    need(algorithm)
    exp = build_experiment(run_config("few_shot", {**TINY_FEW_SHOT, "algorithm": algorithm}))
    assert isinstance(exp, FewShotClassification)
    head_before = exp.model.head.weight.detach().clone()
    conv_before = exp.model.features[0].weight.detach().clone()
    for step in (1, 2):
        assert torch.isfinite(torch.tensor(exp.meta_step(step)["loss"]))
    assert not torch.equal(head_before, exp.model.head.weight)
    assert not torch.equal(conv_before, exp.model.features[0].weight)
    for split in ("val", "test", "transfer"):
        metrics = exp.evaluate(split)
        assert set(metrics) == {"acc_step1", "acc_step2", "loss_step1", "loss_step2"}
        assert all(0.0 <= metrics[f"acc_step{s}"] <= 1.0 for s in (1, 2))


def test_imaml_solver_settings_reach_the_learner():
    need("imaml")
    default = build_experiment(run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "imaml",
                                                       "imaml_lambda": 2.0}))
    learner = default.trainer.learner
    assert (learner.solver, learner.min_eig) == ("cg", pytest.approx(2.0))
    other = build_experiment(run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "imaml",
                                                     "imaml_solver": "lanczos",
                                                     "imaml_min_eig": 0.5}))
    assert (other.trainer.learner.solver, other.trainer.learner.min_eig) == ("lanczos", 0.5)
    other.meta_step(1)
    assert other.trainer.learner.last_diagnostics[0]["linear_solver"] == "lanczos"
    with pytest.raises(ValueError, match="imaml_min_eig must be > 0"):
        run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "imaml", "imaml_min_eig": 0.0})


def test_sinusoid_evaluation_reports_diverging_adaptation_as_inf():
    # Meta-SGD's learned rates can diverge when run for more steps than trained for;
    # evaluation reports that (MSE inf and a warning) instead of aborting.
    need("metasgd")
    exp = build_experiment(run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "metasgd"}))
    with torch.no_grad():
        for lr in exp.trainer.learner.inner_lrs.values():
            lr.fill_(1e30)
    with pytest.warns(RuntimeWarning, match=r"diverged on 2 of 2 test tasks after 2 steps"):
        metrics = exp.evaluate("test")
    assert metrics["mse_k2_step2"] == float("inf")
    assert 0 <= metrics["mse_k2_step0"] < float("inf")


def test_anil_adapts_only_the_head():
    need("anil")
    exp = build_experiment(run_config("few_shot", {**TINY_FEW_SHOT, "algorithm": "anil"}))
    batch = exp.eval_samplers["test"].sample(1)
    task = batch.task(0)
    adapted = exp.trainer.adapt(task.support_x, task.support_y,
                                torch.nn.functional.cross_entropy, 2)
    for name, p in exp.model.named_parameters():
        moved = not torch.equal(adapted[name], p.detach())
        assert moved == name.startswith("head."), name


def test_evaluation_is_deterministic_and_independent_of_training_stream():
    need("maml")
    cfg = run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "maml"})
    a, b = build_experiment(cfg), build_experiment(cfg)
    b.generator.manual_seed(12345)  # a different training stream must not change eval tasks
    assert a.evaluate("test") == b.evaluate("test")
    assert a.evaluate("val") != a.evaluate("test")


@pytest.mark.parametrize("experiment,settings", [
    ("sinusoid", {**TINY_SINUSOID, "algorithm": "maml"}),
    ("sinusoid", {**TINY_SINUSOID, "algorithm": "pretrained"}),
    ("few_shot", {**TINY_FEW_SHOT, "algorithm": "maml"}),
])
def test_checkpoint_round_trip_resumes_bit_exactly(tmp_path, experiment, settings):
    """Steps 1–2, checkpoint through the runner's files, resume in a fresh experiment,
    step 3: parameters, optimizer state and losses equal an uninterrupted run's."""
    need(settings["algorithm"])
    cfg = run_config(experiment, settings, seed=3, steps=3)
    straight = build_experiment(cfg)
    losses = [straight.meta_step(s)["loss"] for s in (1, 2, 3)]

    first = build_experiment(cfg)
    for s in (1, 2):
        first.meta_step(s)
    path = write_checkpoint(tmp_path, step=2, experiment=cfg.experiment, config=to_dict(cfg),
                            state=checkpoint_state(first, 0.0))
    resumed = build_experiment(cfg)
    torch.manual_seed(999)  # global RNG scrambled: the checkpoint must restore everything
    load_into(resumed, cfg, path)
    assert resumed.meta_step(3)["loss"] == losses[2]
    want, got = straight.state_dict()["trainer"], resumed.state_dict()["trainer"]
    for k in want["params"]:
        assert torch.equal(want["params"][k], got["params"][k]), k
    assert torch.equal(want["optimizer"]["step"], got["optimizer"]["step"])
    for k in want["optimizer"]["exp_avg"]:
        assert torch.equal(want["optimizer"]["exp_avg"][k], got["optimizer"]["exp_avg"][k])
        assert torch.equal(want["optimizer"]["exp_avg_sq"][k],
                           got["optimizer"]["exp_avg_sq"][k])


def test_same_seed_same_run_different_seed_different_run():
    need("maml")
    cfg = run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "maml"}, seed=1)
    a, b = build_experiment(cfg), build_experiment(cfg)
    c = build_experiment(run_config("sinusoid", {**TINY_SINUSOID, "algorithm": "maml"}, seed=2))
    for s in (1, 2):
        assert a.meta_step(s) == b.meta_step(s)
        c.meta_step(s)
    assert all(torch.equal(x, y) for x, y in zip(all_params(a).values(), all_params(b).values()))
    assert not torch.equal(all_params(a)["head.weight"], all_params(c)["head.weight"])


CONFIG_FILES = sorted(p for pattern in ("maml_*", "fomaml_*", "anil_*", "metasgd_*",
                                        "reptile_*", "imaml_*")
                      for p in (ROOT / "configs").glob(pattern + ".yaml"))


def test_every_algorithm_has_sinusoid_and_glyph_configs():
    names = {p.stem for p in CONFIG_FILES}
    for algo in ALGORITHMS:
        assert {f"{algo}_sinusoid", f"{algo}_glyph_5way1shot",
                f"{algo}_glyph_5way5shot"} <= names, algo
    assert "maml_sinusoid_pretrained" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_files_parse_and_name_their_algorithm(path):
    cfg = load_run_config(path)
    algo = path.stem.split("_")[0]
    expected = "pretrained" if path.stem.endswith("_pretrained") else algo
    assert cfg.settings.algorithm == expected
    if "glyph" in path.stem:
        assert cfg.experiment == "few_shot"
        assert cfg.settings.n_way == 5
        assert cfg.settings.k_shot == int(path.stem[-5])


@pytest.mark.slow
def test_maml_beats_pretrained_baseline_on_sinusoids():
    """After 400 outer steps each, MAML's 10-shot MSE after 1 and 10 steps is well below
    the jointly pretrained network's (MAML paper, figure 2)."""
    need("maml")
    torch.set_num_threads(1)
    results = {}
    for algorithm in ("maml", "pretrained"):
        cfg = load_run_config(ROOT / "configs" / ("maml_sinusoid_pretrained.yaml"
                                                  if algorithm == "pretrained"
                                                  else "maml_sinusoid.yaml"),
                              ["steps=400", "settings.eval_tasks=40", "settings.eval_query=50"])
        exp = build_experiment(cfg)
        for step in range(1, cfg.steps + 1):
            exp.meta_step(step)
        results[algorithm] = exp.evaluate("test")
    for key in ("mse_k10_step1", "mse_k10_step10"):
        assert results["maml"][key] < 0.75 * results["pretrained"][key], (key, results)
