"""The foundation demo learns penalties that beat the best single penalty."""

from metaopt.demo import main


def test_ridge_demo_beats_best_scalar_penalty():
    summary = main(["--steps", "40"])
    assert summary["test_mse_learned_penalties"] < summary["test_mse_best_scalar_penalty"]
    assert summary["mean_penalty_irrelevant"] > 3 * summary["mean_penalty_relevant"]
