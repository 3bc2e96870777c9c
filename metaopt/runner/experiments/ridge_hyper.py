"""``ridge_hyper``: learn ridge penalties of a linear regression by hypergradient descent.

The data are synthetic: ``y = X w_true + noise`` with ``X ~ N(0, I)`` and only the
first ``relevant_features`` entries of ``w_true`` non-zero, so a per-feature penalty
that grows on the irrelevant features beats any single scalar penalty.

    inner:  θ*(φ) ≈ argmin_w  ½ mean((X_tr w − y_tr)²) + ½ Σ_j exp(φ_j) w_j²
    outer:  min_φ  ½ mean((X_val θ*(φ) − y_val)²)

Each outer step draws a fresh training set (from the experiment's own
``torch.Generator``), solves the inner problem with ``inner_steps`` steps of gradient
descent (step size 1/L for the current penalties, so it is stable for any φ), asks
the configured estimator from :mod:`metaopt.bilevel` for dF/dφ, and takes an Adam step
on φ. Evaluation solves the inner problem exactly (closed form) on a fixed training
set and reports the mean squared error on the validation or test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel import BilevelProblem
from metaopt.optim import adam, apply_updates, sgd
from metaopt.runner.estimators import build_estimator, check_estimator
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    register_experiment,
)
from metaopt.tree import tree_map_nested

__all__ = ["RidgeHyper", "RidgeHyperConfig"]


@dataclass
class RidgeHyperConfig(ExperimentConfig):
    """Settings of :class:`RidgeHyper` (all sizes are numbers of samples or features)."""

    n_features: int = 20
    relevant_features: int = 5
    n_train: int = 40
    n_val: int = 200
    n_test: int = 2000
    noise: float = 0.5
    per_feature: bool = True
    init_log_penalty: float = 0.0
    estimator: str = "unrolled"
    estimator_options: dict[str, Any] = field(default_factory=dict)
    inner_steps: int = 50
    warm_start: bool = True
    resample_train: bool = True
    outer_lr: float = 0.05

    def __post_init__(self) -> None:
        for name in ("n_features", "n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.relevant_features <= self.n_features:
            raise ValueError(f"relevant_features must be in [0, n_features], got "
                             f"{self.relevant_features}")
        if self.noise < 0 or self.outer_lr <= 0 or self.inner_steps < 1:
            raise ValueError("need noise >= 0, outer_lr > 0 and inner_steps >= 1")
        check_estimator(self.estimator, self.estimator_options)


@register_experiment("ridge_hyper", config=RidgeHyperConfig)
class RidgeHyper(Experiment):
    """Per-feature (or scalar) ridge penalties learned by hypergradient descent."""

    def __init__(self, config: RidgeHyperConfig, *, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        self.config = config
        self.estimator = build_estimator(config.estimator, config.estimator_options)
        self.device, self.dtype = device, dtype
        data_gen = torch.Generator().manual_seed(seed)
        #: draws each step's training set; saved and restored by the runner
        self.sampler = torch.Generator().manual_seed(seed + 1)
        d, k = config.n_features, config.relevant_features
        w_true = torch.zeros(d, dtype=torch.float64)
        w_true[:k] = torch.randn(k, generator=data_gen, dtype=torch.float64)
        self.w_true = w_true
        self.val = self._draw(config.n_val, data_gen)
        self.test = self._draw(config.n_test, data_gen)
        self.eval_train = self._draw(config.n_train, data_gen)
        n_phi = d if config.per_feature else 1
        self.phi = {"log_penalty": torch.full((n_phi,), config.init_log_penalty,
                                              device=device, dtype=dtype)}
        self.outer_opt = adam(config.outer_lr)
        self.opt_state = self.outer_opt.init(self.phi)
        self.theta = {"w": torch.zeros(d, device=device, dtype=dtype)}

    # ------------------------------------------------------------------ the contract

    def meta_step(self, step: int) -> Metrics:
        cfg = self.config
        X, y = self._draw(cfg.n_train, self.sampler) if cfg.resample_train else self.eval_train
        Xv, yv = self.val
        lipschitz = float(torch.linalg.matrix_norm(X, ord=2) ** 2) / X.shape[0]

        def inner_loss(theta: dict[str, Tensor], phi: dict[str, Tensor]) -> Tensor:
            w = theta["w"]
            return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (phi["log_penalty"].exp() * w**2).sum()

        def outer_loss(theta: dict[str, Tensor], phi: dict[str, Tensor]) -> Tensor:
            return 0.5 * ((Xv @ theta["w"] - yv) ** 2).mean()

        def inner_optimizer(phi: dict[str, Tensor]):
            # 1/L step for the current penalties: stable whatever φ becomes
            return sgd(1.0 / (lipschitz + float(phi["log_penalty"].detach().exp().max())))

        problem = BilevelProblem(inner_loss=inner_loss, outer_loss=outer_loss,
                                 inner_optimizer=inner_optimizer, inner_steps=cfg.inner_steps,
                                 name="ridge_hyper")
        theta0 = self.theta if cfg.warm_start else {"w": torch.zeros_like(self.theta["w"])}
        hg = self.estimator(problem, self.phi, theta0)
        updates, self.opt_state = self.outer_opt.update(hg.grad, self.opt_state, self.phi)
        self.phi = {k: v.detach() for k, v in apply_updates(self.phi, updates).items()}
        self.opt_state = tree_map_nested(Tensor.detach, self.opt_state)
        self.theta = {"w": hg.theta["w"].detach()}
        log_pen = self.phi["log_penalty"]
        return {
            "val_loss": float(hg.outer_loss),
            "hypergrad_norm": float(hg.grad["log_penalty"].norm()),
            "mean_log_penalty": float(log_pen.mean()),
        }

    def evaluate(self, split: str) -> Metrics:
        if split not in self.splits:
            raise ValueError(f"ridge_hyper has splits {self.splits}, not '{split}'")
        X, y = self.eval_train
        Xe, ye = self.val if split == "val" else self.test
        w = self._ridge_solution(X, y, self.phi["log_penalty"])
        mse = float(((Xe @ w - ye) ** 2).mean())
        w_true = self.w_true.to(self.device, self.dtype)
        return {"mse": mse, "weight_error": float((w - w_true).norm())}

    def state_dict(self) -> StateDict:
        return {"phi": dict(self.phi), "outer_opt": self.opt_state, "theta": dict(self.theta)}

    def load_state_dict(self, state: StateDict) -> None:
        self.phi = {k: v.clone() for k, v in state["phi"].items()}
        self.opt_state = tree_map_nested(Tensor.clone, state["outer_opt"])
        self.theta = {k: v.clone() for k, v in state["theta"].items()}

    def generators(self) -> dict[str, torch.Generator]:
        return {"train_sampler": self.sampler}

    # ------------------------------------------------------------------ helpers

    def _draw(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` samples from the regression model (drawn in float64 on the CPU)."""
        X = torch.randn(n, self.config.n_features, generator=gen, dtype=torch.float64)
        y = X @ self.w_true + self.config.noise * torch.randn(n, generator=gen,
                                                              dtype=torch.float64)
        return X.to(self.device, self.dtype), y.to(self.device, self.dtype)

    def _ridge_solution(self, X: Tensor, y: Tensor, log_penalty: Tensor) -> Tensor:
        n, d = X.shape
        A = X.T @ X / n + torch.diag(log_penalty.exp().expand(d))
        return torch.linalg.solve(A, X.T @ y / n)
