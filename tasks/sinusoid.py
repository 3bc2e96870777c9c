"""Sinusoid regression tasks of the MAML paper (Finn et al., 2017, section 5.1).

Each task is ``y = A · sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]``, phase
``φ ~ U[0, π]``; inputs ``x ~ U[−5, 5]``. A task gives ``k_shot`` support and
``q_query`` query points, drawn independently from the same input range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tasks.batch import TaskBatch

__all__ = ["SinusoidTasks", "sinusoid"]


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``amplitude · sin(x − phase)``; ``amplitude``/``phase`` broadcast against ``x``."""
    return amplitude * torch.sin(x - phase)


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float],
             generator: torch.Generator) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)


@dataclass
class SinusoidTasks:
    """Sinusoid regression family; ``sample`` returns x and y as ``[B, K, 1]``.

    ``info`` of the returned batch holds each task's ``amplitude`` and ``phase`` (``[B]``),
    so the true function can be evaluated on any grid with :func:`sinusoid`.
    ``noise_std`` adds Gaussian label noise (0 in the paper).
    """

    k_shot: int = 10
    q_query: int = 10
    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_std: float = 0.0
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_shot < 1 or self.q_query < 0:
            raise ValueError(f"need k_shot >= 1 and q_query >= 0, got {self.k_shot}, "
                             f"{self.q_query}")
        for name in ("amplitude_range", "phase_range", "x_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got "
                                 f"{getattr(self, name)}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``batch_size`` tasks with ``k_shot`` support and ``q_query`` query points."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        g = self.generator if generator is None else generator
        amplitude = _uniform((batch_size,), self.amplitude_range, g)
        phase = _uniform((batch_size,), self.phase_range, g)
        x = _uniform((batch_size, self.k_shot + self.q_query, 1), self.x_range, g)
        y = sinusoid(x, amplitude[:, None, None], phase[:, None, None])
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:],
                         info={"amplitude": amplitude, "phase": phase})
