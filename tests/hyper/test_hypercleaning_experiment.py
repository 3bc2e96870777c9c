"""The hyper-cleaning experiment: runs with every estimator, checkpoints, improves."""

import pytest
import torch

from metaopt.runner.experiment import get_experiment
from metaopt.runner.experiments.hypercleaning import (
    ESTIMATOR_NAMES,
    HyperCleaning,
    HyperCleaningConfig,
    baseline_metrics,
    method_settings,
)

SMALL = {"n_train": 300, "n_val": 200, "n_test": 300, "inner_steps": 3, "final_steps": 50}


def _exp(estimator, **kw):
    cfg = HyperCleaningConfig(p=0.5, **method_settings(estimator, linear_iters=3, truncate=2),
                              **{**SMALL, **kw})
    return HyperCleaning(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)


def test_registered():
    assert get_experiment("hypercleaning") is HyperCleaning


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_every_estimator_steps_and_moves_weights(estimator):
    exp = _exp(estimator)
    exp.meta_step(1)  # BOME's first step may leave w alone (λ = 0 while ∇f·∇q > η‖∇q‖²)
    m = exp.meta_step(2)
    assert all(isinstance(v, float) for v in m.values())
    assert float(exp.state.phi["w"].abs().max()) > 0
    ev = exp.evaluate("test")
    assert 0.0 <= ev["acc"] <= 1.0 and 0.0 <= ev["clean_f1"] <= 1.0


@pytest.mark.parametrize("estimator", ["ift_cg", "f2sa", "bome"])
def test_state_dict_round_trip_is_exact(estimator):
    a = _exp(estimator)
    fresh = _exp(estimator).state_dict()
    a.meta_step(1)
    saved = a.state_dict()
    # same structure before and after training (what the runner checks on resume)
    assert _structure(saved) == _structure(fresh)
    b = _exp(estimator)
    b.load_state_dict(saved)
    a.meta_step(2)
    b.meta_step(2)
    assert torch.equal(a.state.phi["w"], b.state.phi["w"])


def _structure(tree):
    if isinstance(tree, dict):
        return {k: _structure(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return (tuple(tree.shape), tree.dtype)
    return type(tree).__name__


def test_weights_stay_in_box():
    exp = _exp("unrolled", outer_lr=5.0, w_max=1.0)
    for s in range(1, 4):
        exp.meta_step(s)
    assert float(exp.state.phi["w"].abs().max()) <= 1.0


def test_bad_config():
    with pytest.raises(ValueError, match="p must be"):
        HyperCleaningConfig(p=2.0)
    with pytest.raises(ValueError, match="outer_lr"):
        HyperCleaningConfig(outer_lr=-1.0)
    with pytest.raises(ValueError, match="unknown estimator 'ift'"):
        HyperCleaningConfig(estimator="ift")
    with pytest.raises(ValueError, match="'bome' does not accept option.*solver"):
        HyperCleaningConfig(estimator="bome", estimator_options={"theta_lr": 1.0,
                                                                 "solver": "cg"})


def test_estimators_come_from_the_registry():
    from metaopt.bilevel import BOME, Unrolled
    from metaopt.registry import ESTIMATORS

    exp = _exp("truncated")
    assert ESTIMATORS.get("bome") is BOME
    assert isinstance(exp.estimator, Unrolled) and exp.estimator.truncate == 2


def test_quick_small_run_beats_corrupted_baseline():
    """Three outer steps of IFT-Neumann on a 600/300/600 split beat training on all
    corrupted data (same final trainer) in test accuracy, and find the clean samples."""
    cfg = HyperCleaningConfig(p=0.5, **method_settings("ift_neumann", linear_iters=5),
                              n_train=600, n_val=300, n_test=600, inner_steps=5,
                              final_steps=100)
    exp = HyperCleaning(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    for s in range(1, 4):
        exp.meta_step(s)
    got = exp.evaluate("test")
    base = baseline_metrics(cfg, seed=0)
    assert got["acc"] > base["corrupted"]["test_acc"] + 0.05, (got, base)
    assert got["clean_f1"] > 0.85


@pytest.mark.slow
def test_quick_run_beats_corrupted_baseline():
    """A few outer steps of IFT-Neumann on the full-size task beat training on all
    corrupted data (same final trainer) in test accuracy, and find the clean samples."""
    torch.manual_seed(0)
    cfg = HyperCleaningConfig(p=0.5, **method_settings("ift_neumann", linear_iters=5),
                              inner_steps=5, final_steps=100, outer_lr=0.3)
    exp = HyperCleaning(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    for s in range(1, 6):
        exp.meta_step(s)
    got = exp.evaluate("test")
    base = baseline_metrics(cfg, seed=0)
    assert got["acc"] > base["corrupted"]["test_acc"] + 0.03, (got, base)
    assert got["clean_f1"] > 0.85
