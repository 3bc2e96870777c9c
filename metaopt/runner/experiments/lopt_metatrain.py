"""``lopt_metatrain``: meta-train a learned optimizer with PES/ES/truncated BPTT.

The inner problem is a task from :mod:`tasks.lopt_tasks` (``task:`` in the settings:
an MLP in standard or μP parametrisation, the teacher MLP, a convnet, a tiny
transformer LM or logistic regression) trained by the learned optimizer
(``optimizer:`` an architecture name, e.g. ``mulo_small_fc`` for μLO or
``small_fc_lopt`` for its standard twin). ``num_tasks`` copies of the task (each its
own initialisation and data stream) run in parallel as a
:class:`~metaopt.algorithms.lopt_training.LearnedOptimizerSystem`; every outer step
the estimator advances them one truncation and returns dF/dφ; φ (the optimizer's
meta-parameters) takes an AdamW step with linear warm-up and gradient-norm clipping
(the μLO recipe: PES, truncation 50, σ = 0.01, 8 tasks, horizons log-uniform in
[100, 1000], AdamW 3e-3).

``task:`` may also be a list of task sections: a **mixture** of tasks. Each entry gets
its own system of ``num_tasks`` rows (rows of one system share the model's shapes, so
tasks of different shapes cannot share one) and its own estimator, seeded apart; the
meta-gradient of an outer step is the mean of the entries' estimates, as
learned_optimization averages the estimates of its task families. A mixture runs in
this process (no ``executor:``, ``max_staleness: 0``).

Evaluation runs the current learned optimizer for ``eval_steps`` steps on the tasks of
a held-out suite (:func:`tasks.lopt_tasks.heldout_suite`, seeds never used in
training) and reports the mean final training loss and test metric.

Distributed (``executor:`` in the run config) or with ``max_staleness > 0``, PES runs
through a :class:`~metaopt.distributed.pes_pool.PESPool`: the task slots live on the
workers, only φ and seeds travel, and the estimate is bitwise the in-process one
(``max_staleness: 0``) or the fixed stale schedule of the pool (truncation ``k`` uses
φ after ``k − s`` updates). The checkpoint holds the pool's
:meth:`~metaopt.distributed.pes_pool.PESPool.checkpoint_state` (plus, for ``s > 0``,
the queued truncations' loss differences), so resume is exact either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaopt.algorithms.lopt_training import (
    META_LOSSES,
    LearnedOptimizerSystem,
    init_kwargs,
    meta_parameters,
)
from metaopt.bilevel import ES, PES, LogUniformLength, TruncatedBPTT
from metaopt.bilevel.truncation import SEGMENT_OBJECTIVES, TruncatedState, mix_seed
from metaopt.distributed.executor import LocalExecutor
from metaopt.distributed.pes_pool import PESPool, pending_from_state_dict, pending_state_dict
from metaopt.errors import ConfigError
from metaopt.lopt import ARCHITECTURES, LearnedOptimizer
from metaopt.lopt.cpu_kernels import select_backend
from metaopt.optim import adamw, apply_updates
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    register_experiment,
)
from metaopt.tree import tree_map_nested

__all__ = ["LoptMetaTrain", "LoptMetaTrainConfig", "evaluate_lopt", "evaluate_lopt_per_task"]

ESTIMATORS = {"pes": PES, "es": ES, "tbptt": TruncatedBPTT}
TASK_KINDS = ("mlp", "teacher", "conv", "transformer", "logreg")


#: Other architectures whose releases ``init_from`` accepts per optimizer: μLO's small_fc
#: (``mulo_small_fc``) has exactly small_fc_lopt's meta-parameters and only multiplies
#: each tensor's step by its μP scale, so a small_fc_lopt release (e.g. the SP twin) is
#: a μLO starting point with the same φ.
INIT_FROM_ALSO: dict[str, tuple[str, ...]] = {"mulo_small_fc": ("small_fc_lopt",)}


@dataclass
class LoptMetaTrainConfig(ExperimentConfig):
    """Settings of :class:`LoptMetaTrain`."""

    optimizer: str = "mulo_small_fc"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    #: start φ from a trained optimizer (a registered name such as
    #: ``mulo-small-fc-w128`` or a native checkpoint directory) instead of the seeded
    #: initialisation: fine-tuning, e.g. under another ``meta_loss``. Its architecture
    #: and constructor config must equal ``optimizer`` / ``optimizer_options``
    #: (architectures with the same meta-parameters also qualify: INIT_FROM_ALSO).
    init_from: str | None = None
    #: one task section, or a list of them (a mixture; see the module docstring)
    task: dict[str, Any] | list[dict[str, Any]] = field(default_factory=lambda: {
        "kind": "mlp", "param": "mup", "width": 128, "depth": 2, "activation": "relu",
        "dataset": "digits", "batch_size": 128})
    estimator: str = "pes"
    num_tasks: int = 8
    truncation: int = 50
    sigma: float = 0.01
    horizon_low: int = 100
    horizon_high: int = 1000
    max_loss: float | None = 10.0
    #: each inner step's meta-objective term: "loss" or "log" (LearnedOptimizerSystem)
    meta_loss: str = "loss"
    #: how a truncation's step terms become its objective: "mean" or "log_mean" (the
    #: log of each episode segment's mean loss; needs meta_loss "loss"; see
    #: metaopt.bilevel.truncation.per_task_sums)
    segment_objective: str = "mean"
    outer_lr: float = 3e-3
    warmup_steps: int = 100
    max_grad_norm: float = 3.0
    eval_suite: str = "mlp_mup_heldout"
    eval_widths: list[int] = field(default_factory=lambda: [128])
    eval_tasks: int = 2
    eval_steps: int = 200
    #: the learned optimizer's step backend in meta-training: "reference" (pure PyTorch,
    #: vmapped rows) or "cpu_kernels" (fused C kernels for ES/PES rows; equal to float32
    #: rounding; truncated BPTT always takes the reference)
    backend: str = "reference"
    max_staleness: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ARCHITECTURES:
            raise ValueError(f"optimizer: unknown learned optimizer '{self.optimizer}' "
                             f"(known: {sorted(ARCHITECTURES)})")
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        if self.segment_objective not in SEGMENT_OBJECTIVES:
            raise ValueError(f"segment_objective must be one of {SEGMENT_OBJECTIVES}, got "
                             f"{self.segment_objective!r}")
        if self.segment_objective == "log_mean" and self.meta_loss != "loss":
            raise ValueError(f"segment_objective 'log_mean' takes the log itself: it needs "
                             f"meta_loss 'loss', got {self.meta_loss!r}")
        if self.backend not in ("reference", "cpu_kernels"):
            raise ValueError(f"backend must be 'reference' or 'cpu_kernels', got "
                             f"{self.backend!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got "
                             f"'{self.estimator}'")
        for i, spec in enumerate(self.task_specs):
            where = "task" if isinstance(self.task, dict) else f"task[{i}]"
            if spec.get("kind") not in TASK_KINDS:
                raise ValueError(f"{where}.kind must be one of {TASK_KINDS}, got "
                                 f"{spec.get('kind')!r}")
        if not self.task_specs:
            raise ValueError("task: the mixture list is empty")
        if self.is_mixture and self.max_staleness > 0:
            raise ValueError("max_staleness > 0 needs a single task, not a mixture "
                             f"of {len(self.task_specs)}")
        for name in ("num_tasks", "truncation", "horizon_low", "eval_steps", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.horizon_high < self.horizon_low:
            raise ValueError("horizon_high must be >= horizon_low")
        if not (self.outer_lr > 0 and self.sigma > 0 and self.max_grad_norm > 0):
            raise ValueError("outer_lr, sigma and max_grad_norm must be positive")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_staleness > 0 and self.estimator != "pes":
            raise ValueError(f"max_staleness > 0 needs estimator 'pes' (the particle "
                             f"pool), got '{self.estimator}'")

    @property
    def task_specs(self) -> list[dict[str, Any]]:
        """The task sections: one, or the mixture's entries."""
        return [self.task] if isinstance(self.task, dict) else list(self.task)

    @property
    def is_mixture(self) -> bool:
        return not isinstance(self.task, dict)


def build_task(spec: dict[str, Any], seed: int) -> Any:
    """The training task a ``task:`` section describes (seed below the held-out range)."""
    from tasks import lopt_tasks as lt

    spec = dict(spec)
    kind = spec.pop("kind")
    spec.setdefault("seed", seed % lt.HELDOUT_SEED_BASE)
    if kind == "teacher":
        spec.pop("seed")
        return lt.teacher_task(**spec)
    builder = {"mlp": lt.mlp_task, "conv": lt.conv_task, "transformer": lt.transformer_task,
               "logreg": lt.logreg_task}[kind]
    return builder(**spec)


def _final_window(losses: list[float], k: int) -> list[float]:
    """The losses of the last 10 % (at least one) of the first ``k`` steps."""
    return losses[k - max(1, k // 10):k]


def _window_mean(losses: list[float], k: int) -> float:
    """Mean of :func:`_final_window` (summed in step order: the value a k-step run reports)."""
    window = _final_window(losses, k)
    return sum(window) / len(window)


@torch.no_grad()
def evaluate_lopt_per_task(lopt: LearnedOptimizer, tasks: list[Any], steps: int,
                           seed: int = 0, backend: str = "reference",
                           report_at: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Train each task ``steps`` steps with ``lopt``; per task its final loss and metric.

    Task ``i`` draws its initialisation and batches from a generator seeded
    ``seed * 1000 + i``. ``final_loss`` is the task's mean training loss over the last
    10 % of steps, ``final_median_loss`` its median there (a few loss spikes move the
    mean, not the median). A run that turns non-finite counts as loss ``inf`` (and metric
    0). ``backend``: the optimizer step's (``select_backend``; the kernels equal the
    reference to rounding).

    ``report_at``: step counts ``k <= steps`` at which to also report the final loss a
    ``k``-step run would have (the mean over the last 10 % of its first ``k`` steps; the
    run with fewer steps is a prefix of this one), as ``final_loss_at: {k: loss}`` —
    a horizon-stability curve from one run; ``inf`` once the run has turned non-finite.
    """
    report_at = sorted({int(k) for k in report_at})
    if report_at and not 1 <= report_at[0] <= report_at[-1] <= steps:
        raise ValueError(f"report_at must lie in [1, steps={steps}], got {report_at}")
    kern = select_backend(backend)
    out = []
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        theta = task.init_params(gen)
        state = lopt.init(theta, steps, **init_kwargs(lopt, task))
        losses: list[float] = []
        for _ in range(steps):
            with torch.enable_grad():
                th = {n: v.detach().requires_grad_() for n, v in theta.items()}
                loss = task.loss(th, task.sample_batch(gen, "train"))
                grads = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
            if not bool(torch.isfinite(loss)) or not all(
                    bool(torch.isfinite(g).all()) for g in grads.values()):
                break
            theta, state = lopt.update(grads, state, theta, loss=loss.detach(), backend=kern)
            losses.append(float(loss))
        finished = len(losses) == steps
        tail = _final_window(losses, steps) if finished else [math.inf]
        final = sum(tail) / len(tail)
        metric = (float(task.metric(theta, task.sample_batch(gen, "test")))
                  if task.metric is not None and math.isfinite(final) else 0.0)
        row: dict[str, Any] = {
            "final_loss": final,
            "final_median_loss": float(torch.tensor(tail, dtype=torch.float64).median()),
            "test_metric": metric}
        if report_at:
            row["final_loss_at"] = {k: _window_mean(losses, k) if k <= len(losses) else math.inf
                                    for k in report_at}
        out.append(row)
    return out


def evaluate_lopt(lopt: LearnedOptimizer, tasks: list[Any], steps: int, seed: int = 0,
                  backend: str = "reference") -> dict[str, float]:
    """:func:`evaluate_lopt_per_task` averaged over the tasks: mean final loss, mean
    final median loss and mean test metric."""
    runs = evaluate_lopt_per_task(lopt, tasks, steps, seed=seed, backend=backend)
    return {key: sum(r[key] for r in runs) / len(runs)
            for key in ("final_loss", "final_median_loss", "test_metric")}


@register_experiment("lopt_metatrain", config=LoptMetaTrainConfig)
class LoptMetaTrain(Experiment):
    """A learned optimizer meta-trained by a truncated estimator on a task family."""

    def __init__(self, config: LoptMetaTrainConfig, *, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        self.config = config
        self.device, self.seed = device, seed
        torch.manual_seed(seed)  # the optimizer's meta-parameter initialisation
        self.lopt = ARCHITECTURES[config.optimizer](**config.optimizer_options)
        if config.init_from is not None:
            self._load_initial_meta_parameters(config.init_from)
        self.tasks = [build_task(spec, seed) for spec in config.task_specs]
        self.systems = [LearnedOptimizerSystem(self.lopt, task, num_steps=config.horizon_high,
                                               max_loss=config.max_loss,
                                               backend=config.backend,
                                               meta_loss=config.meta_loss)
                        for task in self.tasks]
        # entry i's estimator is seeded apart from the others (entry 0: the run seed)
        self.estimators = [self._make_estimator(mix_seed(seed, 7919 * i) if i else seed)
                           for i in range(len(self.tasks))]
        self.phi = meta_parameters(self.lopt)
        self.outer_state = adamw(config.outer_lr).init(self.phi)
        self.est_states: list[TruncatedState] = [
            est.start(system, self.phi, None)
            for est, system in zip(self.estimators, self.systems)]
        self._eval_tasks: dict[str, list[Any]] = {}
        self.pool: PESPool | None = None
        if config.max_staleness > 0:  # the stale schedule, in this process
            self._start_pool(LocalExecutor(1), [])

    def _load_initial_meta_parameters(self, source: str) -> None:
        from metaopt.lopt import load_checkpoint

        start = load_checkpoint(source)
        accepted = (self.config.optimizer, *INIT_FROM_ALSO.get(self.config.optimizer, ()))
        if start.architecture not in accepted or start.config() != self.lopt.config():
            raise ConfigError(
                f"settings.init_from: '{source}' is a {start.architecture} with config "
                f"{start.config()}, but optimizer/optimizer_options build a "
                f"{self.config.optimizer} with config {self.lopt.config()}")
        self.lopt.load_state_dict(start.state_dict(), strict=True)

    def _make_estimator(self, seed: int) -> PES | ES | TruncatedBPTT:
        cfg = self.config
        common = {"num_tasks": cfg.num_tasks, "truncation": cfg.truncation, "seed": seed,
                  "schedule": LogUniformLength(cfg.horizon_low, cfg.horizon_high),
                  "segment_objective": cfg.segment_objective}
        if cfg.estimator == "tbptt":
            return TruncatedBPTT(**common)
        return ESTIMATORS[cfg.estimator](sigma=cfg.sigma, **common)

    # the single-task attributes the distributed pool and the tests address
    @property
    def task(self) -> Any:
        return self.tasks[0]

    @property
    def system(self) -> LearnedOptimizerSystem:
        return self.systems[0]

    @property
    def estimator(self) -> PES | ES | TruncatedBPTT:
        return self.estimators[0]

    @property
    def est_state(self) -> TruncatedState:
        return self.est_states[0]

    @est_state.setter
    def est_state(self, value: TruncatedState) -> None:
        self.est_states[0] = value

    @classmethod
    def check_executor(cls, config: LoptMetaTrainConfig, executor: Any) -> None:
        if config.is_mixture:
            raise ConfigError(f"experiment 'lopt_metatrain': a task mixture "
                              f"({len(config.task_specs)} entries) runs in one process; "
                              f"remove executor: or use a single task")
        if config.estimator != "pes":
            raise ConfigError(f"experiment 'lopt_metatrain' distributes PES only "
                              f"(settings.estimator: '{config.estimator}')")
        if executor.gpus_per_worker > 0:
            raise ConfigError("experiment 'lopt_metatrain': executor.gpus_per_worker > 0 "
                              "is not supported (its tasks build their data on CPU)")
        if config.num_tasks < executor.num_workers:
            raise ConfigError(f"experiment 'lopt_metatrain': settings.num_tasks="
                              f"{config.num_tasks} is fewer than executor.num_workers="
                              f"{executor.num_workers}")

    def use_executor(self, executor: Any) -> None:
        self.executor = executor
        self._start_pool(executor, [])

    def _start_pool(self, executor: Any, pending: list) -> None:
        self.pool = PESPool(executor, self.estimator, self.system, self.phi, self.est_state,
                            pending=pending, max_staleness=self.config.max_staleness)

    # ------------------------------------------------------------------ the contract
    def meta_step(self, step: int) -> Metrics:
        cfg = self.config
        if self.pool is not None:
            hgs = [self.pool.step(self.phi)]
        else:
            hgs = [est(system, self.phi, None, state) for est, system, state
                   in zip(self.estimators, self.systems, self.est_states)]
        n = len(hgs)
        mean_grad = {k: sum(hg.grad[k] for hg in hgs) / n for k in hgs[0].grad}
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in mean_grad.values())))
        if not math.isfinite(norm):
            raise FloatingPointError(f"lopt_metatrain: non-finite meta-gradient at outer "
                                     f"step {step}")
        scale = min(1.0, cfg.max_grad_norm / (norm + 1e-12))
        grad = {k: g * scale for k, g in mean_grad.items()}
        lr = cfg.outer_lr * min(1.0, step / max(1, cfg.warmup_steps))
        updates, self.outer_state = adamw(lr).update(grad, self.outer_state, self.phi)
        self.phi = {k: v.detach() for k, v in apply_updates(self.phi, updates).items()}
        if self.pool is None:
            self.est_states = [hg.state for hg in hgs]
        inner_steps = 2 * cfg.num_tasks * cfg.truncation if cfg.estimator != "tbptt" \
            else cfg.num_tasks * cfg.truncation
        out: Metrics = {"loss": sum(float(hg.outer_loss) for hg in hgs) / n,
                        "grad_norm": norm,
                        "resets": sum(hg.diagnostics.get("resets", 0) for hg in hgs),
                        "nonfinite_resets": sum(hg.diagnostics.get("nonfinite_resets", 0)
                                                for hg in hgs),
                        "inner_steps": inner_steps * n}
        if n > 1:  # each entry's meta-loss: which task the optimizer is worst on
            out.update({f"loss_{i}": float(hg.outer_loss) for i, hg in enumerate(hgs)})
        return out

    def evaluate(self, split: str) -> Metrics:
        return self.evaluate_optimizer(self.trained_optimizer(), split)

    def evaluate_optimizer(self, lopt: LearnedOptimizer, split: str) -> Metrics:
        """:meth:`evaluate` of any learned optimizer (e.g. a step-rescaled copy of the
        trained one) on this run's evaluation tasks."""
        if split not in self.splits:
            raise ValueError(f"lopt_metatrain has splits {self.splits}, not '{split}'")
        from tasks.lopt_tasks import heldout_suite

        if split not in self._eval_tasks:
            suite = heldout_suite(self.config.eval_suite, widths=self.config.eval_widths)
            start = 0 if split == "val" else self.config.eval_tasks
            chosen = suite[start:start + self.config.eval_tasks] or suite[:self.config.eval_tasks]
            self._eval_tasks[split] = chosen
        return evaluate_lopt(lopt, self._eval_tasks[split], self.config.eval_steps)

    def state_dict(self) -> StateDict:
        if self.pool is not None:
            self.est_state = self.pool.checkpoint_state()
        out = {"phi": dict(self.phi), "outer_opt": self.outer_state}
        if self.config.is_mixture:
            out["estimators"] = {str(i): s.state_dict() for i, s in enumerate(self.est_states)}
        else:
            out["estimator"] = self.est_state.state_dict()
        if self.config.max_staleness > 0:
            out["pending"] = pending_state_dict(self.pool.pending(), self.config.max_staleness,
                                                self.config.num_tasks)
        return out

    def load_state_dict(self, state: StateDict) -> None:
        self.phi = {k: v.clone() for k, v in state["phi"].items()}
        self.outer_state = tree_map_nested(Tensor.clone, state["outer_opt"])
        parts = [state["estimator"]] if not self.config.is_mixture else [
            state["estimators"][str(i)] for i in range(len(self.tasks))]
        self.est_states = [TruncatedState.from_state_dict(tree_map_nested(Tensor.clone, p))
                           for p in parts]
        if self.pool is not None:
            pending = pending_from_state_dict(state["pending"]) if "pending" in state else []
            self._start_pool(self.pool.executor, pending)

    # ------------------------------------------------------------------ helpers
    def trained_optimizer(self) -> LearnedOptimizer:
        """The learned optimizer with the current meta-parameters (a fresh module)."""
        lopt = ARCHITECTURES[self.config.optimizer](**self.config.optimizer_options)
        lopt.load_state_dict(self.phi, strict=True)
        return lopt
