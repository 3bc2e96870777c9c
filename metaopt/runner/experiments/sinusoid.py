"""Sinusoid regression with the MAML family, and the "pretrained" baseline it beats.

The MAML paper's setup (Finn et al., 2017, section 5.1): a 1-40-40-1 ReLU MLP,
K-shot support sets, meta-batch 25, Adam outer lr 1e-3, inner SGD lr 0.01 with one
inner step during training. Evaluation fine-tunes on K = 5 and K = 10 support points
of held-out tasks with plain gradient steps and reports the query MSE after each of
``eval_steps`` steps.

``algorithm: pretrained`` is the paper's baseline: the same network trained on all
tasks jointly (ordinary regression on the pooled points of each meta-batch), then
fine-tuned exactly like the meta-learned one at test time.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metaopt.errors import ConfigError
from metaopt.params import NonFiniteError
from metaopt.runner.experiment import Experiment, Metrics, StateDict, register_experiment
from metaopt.runner.experiments.few_shot import (
    MetaLearningSettings,
    MetaTrainer,
    check_shardable,
    mutable_meta_settings,
)

__all__ = ["SinusoidRegression", "SinusoidSettings", "mlp"]


@dataclass
class SinusoidSettings(MetaLearningSettings):
    """Sinusoid settings (defaults: the MAML paper's, 10-shot training).

    Attributes:
        algorithm: a MAML-family algorithm, or ``pretrained`` for the joint-training
            baseline.
        k_shot: support points per training task.
        q_query: query points per training task.
        hidden: hidden layer widths of the ReLU MLP.
        eval_shots: support sizes K evaluated.
        eval_query: query points per held-out task (a dense, fixed set).
    """

    algorithm: Literal["maml", "fomaml", "anil", "metasgd", "reptile", "imaml",
                       "pretrained"] = "maml"
    k_shot: int = 10
    q_query: int = 10
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    eval_shots: list[int] = field(default_factory=lambda: [5, 10])
    eval_query: int = 100
    strategy: Literal["loop", "vmap", "auto"] = "vmap"

    def __post_init__(self) -> None:
        super().__post_init__()
        for what in ("k_shot", "q_query", "eval_query"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1, got {getattr(self, what)}")
        if not self.eval_shots or min(self.eval_shots) < 1:
            raise ValueError(f"eval_shots must list support sizes >= 1, got {self.eval_shots}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must list layer widths >= 1, got {self.hidden}")


def mlp(hidden: list[int]) -> nn.Sequential:
    """``1 → hidden… → 1`` ReLU MLP; the last ``nn.Linear`` is named ``head``."""
    layers: list[tuple[str, nn.Module]] = []
    width = 1
    for i, h in enumerate(hidden):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append(("head", nn.Linear(width, 1)))
    return nn.Sequential(OrderedDict(layers))


@register_experiment("sinusoid", config=SinusoidSettings,
                     help="sinusoid regression: MAML family vs the pretrained baseline")
class SinusoidRegression(Experiment):
    """MAML-family meta-learning (or joint pretraining) on sinusoid regression.

    Metrics of :meth:`evaluate`: ``mse_k{K}_step{S}`` — query MSE on ``eval_tasks``
    fixed held-out tasks after ``S`` adaptation steps on ``K`` support points.
    """

    @classmethod
    def mutable_settings(cls, config: SinusoidSettings) -> tuple[str, ...]:
        return mutable_meta_settings(config)

    def __init__(self, config: SinusoidSettings, *, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        from tasks.sinusoid import SinusoidTasks

        self.config = config
        self.device, self.dtype = device, dtype
        self.tasks = SinusoidTasks(k_shot=config.k_shot, q_query=config.q_query, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left untouched
            torch.manual_seed(seed)
            self.model = mlp(config.hidden).to(device, dtype)
        # The baseline is fine-tuned at test time exactly like MAML: plain SGD steps.
        algorithm = "maml" if config.algorithm == "pretrained" else config.algorithm
        self.trainer = MetaTrainer(self.model, config, head="head", algorithm=algorithm)

    @classmethod
    def check_executor(cls, config: SinusoidSettings, executor: Any) -> None:
        if config.algorithm == "pretrained":
            raise ConfigError("experiment 'sinusoid' with algorithm 'pretrained' cannot run "
                              "distributed (joint training has no task batch to split)")
        check_shardable(cls.name, config, executor)

    def use_executor(self, executor: Any) -> None:
        self.executor = self.trainer.executor = executor

    def generators(self) -> Mapping[str, torch.Generator]:
        """The training-task stream (held-out tasks are regenerated per evaluation)."""
        return {"tasks": self.generator}

    def meta_step(self, step: int) -> Metrics:
        batch = self.tasks.sample(self.config.meta_batch, self.generator)
        batch = batch.to(self.device, self.dtype)
        if self.config.algorithm == "pretrained":
            return {"loss": self._pretrain_step(batch.support_x, batch.support_y,
                                                batch.query_x, batch.query_y)}
        loss = self.trainer.meta_step(batch.support_x, batch.support_y, batch.query_x,
                                      batch.query_y, F.mse_loss)
        return {"loss": loss}

    def _pretrain_step(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> float:
        """Joint training: one regression step on every point of every task."""
        self.trainer.zero_grad()
        x = torch.cat([sx, qx], 1).reshape(-1, 1)
        y = torch.cat([sy, qy], 1).reshape(-1, 1)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()
        self.trainer.apply_gradients()
        return float(loss.detach())

    def held_out_tasks(self, split: str, k_shot: int):
        """The fixed held-out tasks of ``split`` with ``k_shot`` support points.

        The same ``eval_seed`` gives the same tasks for every run and algorithm.
        """
        from tasks.sinusoid import SinusoidTasks

        if split not in self.splits:
            raise ValueError(f"unknown split '{split}'; splits are {', '.join(self.splits)}")
        offset = self.splits.index(split)
        family = SinusoidTasks(k_shot=k_shot, q_query=self.config.eval_query,
                               seed=self.config.eval_seed + 7919 * offset + k_shot)
        return family.sample(self.config.eval_tasks).to(self.device, self.dtype)

    def mse_curve(self, split: str, k_shot: int, steps: list[int]) -> dict[int, float]:
        """Mean query MSE over the held-out tasks after each of ``steps`` adaptation steps.

        An adaptation that diverges (the inner loss becomes NaN/inf, e.g. Meta-SGD's
        learned rates run for more steps than they were trained for) counts as an
        infinite MSE for that task and step count, with a warning giving how many
        tasks diverged; it does not abort the evaluation.
        """
        batch = self.held_out_tasks(split, k_shot)
        total = {s: 0.0 for s in steps}
        diverged = {s: 0 for s in steps}
        for task in batch.tasks():
            for s, params in self._adapt_path(task.support_x, task.support_y, steps).items():
                if params is None:
                    diverged[s] += 1
                    total[s] = math.inf
                    continue
                pred = self.trainer.predict(params, task.query_x)
                total[s] += float(F.mse_loss(pred, task.query_y))
        for s, n in diverged.items():
            if n:
                warnings.warn(f"{self.config.algorithm}: adaptation diverged on {n} of "
                              f"{batch.batch_size} {split} tasks after {s} steps at K={k_shot} "
                              "(counted as MSE inf)", RuntimeWarning, stacklevel=2)
        return {s: total[s] / batch.batch_size for s in steps}

    def _adapt_path(self, x: Tensor, y: Tensor,
                    steps: list[int]) -> dict[int, dict[str, Tensor] | None]:
        """:meth:`MetaTrainer.adapt_path`, with ``None`` for step counts that diverge."""
        try:
            return self.trainer.adapt_path(x, y, F.mse_loss, steps)
        except NonFiniteError:
            out: dict[int, dict[str, Tensor] | None] = {}
            for s in steps:
                try:
                    out[s] = self.trainer.adapt_path(x, y, F.mse_loss, [s])[s]
                except NonFiniteError:
                    out[s] = None
            return out

    def evaluate(self, split: str) -> Metrics:
        out: Metrics = {}
        for k in self.config.eval_shots:
            for s, mse in self.mse_curve(split, k, sorted(set(self.config.eval_steps))).items():
                out[f"mse_k{k}_step{s}"] = mse
        return out

    def state_dict(self) -> StateDict:
        return {"trainer": self.trainer.state_dict()}

    def load_state_dict(self, state: StateDict) -> None:
        self.trainer.load_state_dict(state["trainer"])
