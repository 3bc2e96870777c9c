"""Linear-regression task mixtures of easy and hard tasks.

Following "How Does the Task Landscape Affect MAML Performance?" (Collins, Mokhtari,
Shakkottai, 2020), tasks are linear regressions ``y = x·w + ε`` whose *hardness* is how
slowly gradient descent adapts to them, i.e. the curvature of the task loss. Here:

* **easy task**: inputs ``x ~ N(0, I_d)`` (loss Hessian ≈ I, condition number 1);
* **hard task**: inputs ``x ~ N(0, diag(s))`` with ``s`` log-spaced from 1 down to
  ``1/hardness`` — the knob ``hardness`` is the condition number of a hard task's input
  covariance (and ``1/hardness`` its smallest curvature). ``hardness = 1`` makes hard
  tasks identical in distribution to easy ones.
* the second knob, ``hard_fraction``, is the probability that a task is hard.

Task optima are ``w ~ N(center, weight_std² I)`` with ``center = 0`` for easy tasks and
``center = center_gap · 1/√d`` for hard ones, so easy and hard tasks prefer different
initialisations (the situation in which MAML and plain multi-task training disagree).
Labels get Gaussian noise of std ``noise_std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tasks.batch import TaskBatch

__all__ = ["LinearMixtureTasks", "hard_task_scales"]


def hard_task_scales(dim: int, hardness: float) -> Tensor:
    """Input variances of a hard task: ``dim`` values log-spaced from 1 to ``1/hardness``."""
    if hardness < 1:
        raise ValueError(f"hardness is a condition number and must be >= 1, got {hardness}")
    if dim == 1:
        return torch.full((1,), 1.0 / hardness)
    return torch.logspace(0.0, -math.log10(hardness), dim)


@dataclass
class LinearMixtureTasks:
    """Mixture of easy and hard linear-regression tasks (see module docstring).

    ``sample`` returns x ``[B, M, dim]`` and y ``[B, M, 1]``; ``info`` holds each task's
    ``weights`` ``[B, dim]``, ``is_hard`` ``[B]`` (bool) and ``input_scales`` ``[B, dim]``
    (input variances), so losses can be reported per task group.
    """

    dim: int = 10
    k_shot: int = 20
    q_query: int = 20
    hardness: float = 10.0
    hard_fraction: float = 0.5
    weight_std: float = 1.0
    center_gap: float = 2.0
    noise_std: float = 0.1
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.k_shot < 1 or self.q_query < 0:
            raise ValueError(f"need dim >= 1, k_shot >= 1, q_query >= 0; got {self.dim}, "
                             f"{self.k_shot}, {self.q_query}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must lie in [0, 1], got {self.hard_fraction}")
        self._hard_scales = hard_task_scales(self.dim, self.hardness)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``batch_size`` tasks, each hard with probability ``hard_fraction``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        g = self.generator if generator is None else generator
        b, d, m = batch_size, self.dim, self.k_shot + self.q_query
        is_hard = torch.rand(b, generator=g) < self.hard_fraction
        center = is_hard[:, None].float() * (self.center_gap / math.sqrt(d))
        weights = center + self.weight_std * torch.randn(b, d, generator=g)
        scales = torch.where(is_hard[:, None], self._hard_scales, torch.ones(d))
        x = torch.randn(b, m, d, generator=g) * scales.sqrt()[:, None, :]
        y = torch.einsum("bmd,bd->bm", x, weights)[..., None]
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:],
                         info={"weights": weights, "is_hard": is_hard,
                               "input_scales": scales})
