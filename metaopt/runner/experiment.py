"""The contract between the meta-training loop and any algorithm, and how one registers.

An *experiment* is an algorithm on a task with its settings: MAML on sinusoids,
hyper-cleaning with IFT, a learned optimizer trained by PES, ridge-penalty learning.
The runner (:mod:`metaopt.runner.loop`) owns everything generic — outer-step
counting, periodic evaluation, progress, metrics files, checkpoints, signals,
RNG state — and calls only the five members below. An experiment owns its model,
meta-parameters, outer optimizer and task samplers.

Writing one::

    @dataclass
    class SinusoidMAMLConfig(ExperimentConfig):
        inner_lr: float = 0.01
        meta_batch: int = 25
        hidden: list[int] = field(default_factory=lambda: [40, 40])

    @register_experiment("maml_sinusoid", config=SinusoidMAMLConfig)
    class SinusoidMAML(Experiment):
        \"\"\"MAML on sinusoid regression (Finn et al. 2017).\"\"\"

        def __init__(self, config, *, device, dtype, seed): ...
        def meta_step(self, step): ...            # -> {"loss": 0.31, ...}
        def evaluate(self, split): ...            # -> {"mse_1step": ..., ...}
        def state_dict(self): ...                 # tensors + JSON-able values
        def load_state_dict(self, state): ...

A YAML config then names it (``experiment: maml_sinusoid``) and fills its typed
section (``settings:``); see :mod:`metaopt.runner.config`.

Rules that make exact resume work (the runner checks what it can):

* All randomness comes from the global RNGs (Python ``random``, NumPy, torch — the
  runner seeds, saves and restores them) or from ``torch.Generator`` objects that the
  experiment lists in :meth:`Experiment.generators` (the runner saves and restores
  those too). Never draw from a fresh, unseeded source.
* :meth:`Experiment.state_dict` returns *everything* that changes during training:
  meta-parameters, outer optimizer state, warm-started inner solutions, counters.
  Leaves are tensors or JSON values (``None``, bool, int, float, str, lists of them);
  nest dicts freely (string keys). Tensors go to safetensors, the rest to JSON — no
  pickling anywhere.
* :meth:`Experiment.load_state_dict` receives exactly that structure back (the runner
  has already checked that keys, tensor shapes and dtypes match a freshly built
  experiment, so it may copy tensors in without further checks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

import torch
from torch import Tensor

from metaopt.errors import ConfigError
from metaopt.registry import EXPERIMENTS

__all__ = [
    "Experiment",
    "ExperimentConfig",
    "Metrics",
    "StateDict",
    "get_experiment",
    "register_experiment",
]

#: What ``meta_step`` and ``evaluate`` return: metric name → finite Python float.
Metrics = dict[str, float]

#: Nested dicts whose leaves are tensors or JSON values (see module docstring).
StateDict = dict[str, Union[Tensor, "StateDict", Any]]


@dataclass
class ExperimentConfig:
    """Base class for each experiment's own typed settings (a dataclass).

    Subclass it with ``@dataclass`` and typed fields; fields without a default are
    required in the YAML file. Supported field types: ``bool``, ``int``, ``float``,
    ``str``, ``X | None``, ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``,
    ``dict[str, X]`` and nested dataclasses. Check value ranges in
    ``__post_init__`` by raising ``ValueError``; the loader reports the message
    with the file it came from.
    """


class Experiment(ABC):
    """One algorithm on one task: built from its config, stepped by the runner.

    Subclasses are registered with :func:`register_experiment`, which sets
    :attr:`name` and :attr:`Config`.
    """

    #: Registry name (set by :func:`register_experiment`).
    name: ClassVar[str] = ""
    #: The experiment's config dataclass (set by :func:`register_experiment`).
    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    #: Splits :meth:`evaluate` accepts; the runner's periodic evaluation uses the first.
    splits: ClassVar[tuple[str, ...]] = ("val", "test")
    #: The :class:`~metaopt.distributed.Executor` given by :meth:`use_executor` (None:
    #: in-process); the runner shuts it down when the run ends.
    executor: Any = None

    @abstractmethod
    def __init__(self, config: ExperimentConfig, *, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        """Build model, meta-parameters, outer optimizer and samplers.

        Global RNGs are already seeded with ``seed`` when this runs; seed any
        ``torch.Generator`` you create from ``seed`` too and list it in
        :meth:`generators`.
        """

    @abstractmethod
    def meta_step(self, step: int) -> Metrics:
        """One outer step: sample a meta-batch, estimate the meta-gradient, update.

        ``step`` counts from 1. Returns metrics of this step (meta-train loss, …)
        as Python floats; they go to ``metrics.jsonl`` under split ``"train"``.
        """

    @abstractmethod
    def evaluate(self, split: str) -> Metrics:
        """Metrics of the current meta-parameters on ``split`` (one of :attr:`splits`)."""

    @abstractmethod
    def state_dict(self) -> StateDict:
        """Everything needed to continue training bit-exactly (tensors + JSON values)."""

    @abstractmethod
    def load_state_dict(self, state: StateDict) -> None:
        """Restore what :meth:`state_dict` returned (structure already verified)."""

    def generators(self) -> Mapping[str, torch.Generator]:
        """The ``torch.Generator`` objects this experiment draws from, by stable name.

        The runner saves and restores their states with every checkpoint.
        """
        return {}

    @classmethod
    def mutable_settings(cls, config: ExperimentConfig) -> tuple[str, ...]:
        """Fields of ``config`` a run may change between two outer steps (default: none).

        A field belongs here only if the experiment reads it afresh when built and
        :meth:`state_dict` does not hold it — outer and inner learning rates
        typically — so that building the experiment from the changed config and
        loading a checkpoint's state continues the same run with the new value.
        Population-based training (:mod:`metaopt.distributed.tune`) mutates only these.
        """
        return ()

    @classmethod
    def check_executor(cls, config: ExperimentConfig, executor: Any) -> None:
        """Raise :class:`ConfigError` unless ``config`` can run on ``executor``.

        ``executor`` is the run's :class:`~metaopt.runner.executor_config.ExecutorConfig`
        (checked only when it is not the default in-process one). The default refuses:
        an experiment that distributes its meta-step overrides this and
        :meth:`use_executor`.
        """
        raise ConfigError(f"experiment '{cls.name}' cannot run with executor kind "
                          f"'{executor.kind}' ({executor.num_workers} workers): its "
                          f"meta-step has no task batch or particle pool to distribute; "
                          f"remove the executor section")

    def use_executor(self, executor: Any) -> None:
        """Run meta-steps on ``executor``'s workers (a :class:`~metaopt.distributed.Executor`).

        Called once, right after ``__init__`` and before any ``load_state_dict``;
        keep it in :attr:`executor`. The results must not depend on it beyond float
        rounding.
        """
        raise ConfigError(f"experiment '{self.name}' cannot run on an executor")

    @classmethod
    def required_extras(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        """``(module, extra)`` pairs this experiment needs with ``config``, e.g.
        ``[("mlxtend", "data")]``.

        The CLI checks them before creating a run directory and names the extra to
        install (``pip install 'metaopt[data]'``) if a module is missing.
        """
        return []


E = TypeVar("E", bound=type[Experiment])


def register_experiment(name: str, *, config: type[ExperimentConfig],
                        help: str = "") -> Callable[[E], E]:
    """Class decorator: register an :class:`Experiment` under ``name`` with its config.

    ``metaopt train`` finds it by the ``experiment:`` key of a YAML file, and
    ``metaopt list`` shows ``help`` (default: the first docstring line).
    """
    if not (isinstance(config, type) and issubclass(config, ExperimentConfig)):
        raise TypeError(f"experiment '{name}': config must be an ExperimentConfig "
                        f"dataclass, got {config!r}")

    def add(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Experiment)):
            raise TypeError(f"experiment '{name}': {cls!r} is not an Experiment subclass")
        cls.name = name
        cls.Config = config
        EXPERIMENTS.register(name, cls, help=help)
        return cls

    return add


def get_experiment(name: str) -> type[Experiment]:
    """The experiment class registered as ``name``.

    Raises :class:`~metaopt.registry.UnknownNameError` (a ``KeyError``) listing the
    registered names. The built-in experiments are registered by
    :func:`metaopt.runner.builtins.register_builtins` (the config loader calls it).
    """
    return EXPERIMENTS.get(name)
