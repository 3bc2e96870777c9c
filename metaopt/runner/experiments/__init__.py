"""Built-in experiments; importing this package registers them in ``EXPERIMENTS``."""

from metaopt.runner.experiments.ridge_hyper import RidgeHyper, RidgeHyperConfig

__all__ = ["RidgeHyper", "RidgeHyperConfig"]
