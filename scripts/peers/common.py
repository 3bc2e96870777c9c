"""Models, synthetic tasks and shared plumbing for the MAML peer benchmark.

Model choices (identical for every contender):

* ``mlp``: the sinusoid regression net of the MAML paper, 1-40-40-1 with ReLU, MSE loss,
  10 support and 10 query points per task, inner lr 0.01.
* ``conv``: the standard 4-block MAML conv net for 28×28 single-channel input. Each block is
  ``Conv2d(c_in, 64, 3, padding=1) → BatchNorm2d(64, track_running_stats=False) → ReLU →
  MaxPool2d(2)`` (28→14→7→3→1), then ``Linear(64, 5)``; cross-entropy, 5-way 1-shot with 15
  queries per class, inner lr 0.4. BatchNorm is affine and always normalises with the
  statistics of the batch it sees (every support and every query set on its own): this is
  what the classic MAML/higher Omniglot set-up (training mode, momentum 1) computes, without
  running-stat buffers that the peers would mutate differently.

Tasks are random tensors drawn from a fixed seed (the benchmark measures meta-gradient
computation, not learning): sinusoid tasks for the mlp, Gaussian-noise images with random
labels for the conv net.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tasks = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(support_x, support_y, query_x, query_y)``, each with a leading task axis."""
LossFn = Callable[[Tensor, Tensor], Tensor]
ModelFactoryState = tuple[Callable[[], nn.Module], dict[str, Tensor]]
"""A model constructor and the state dict every contender starts from."""
StepFn = Callable[[Tasks], Tensor]
MakeStep = Callable[[nn.Module, int, float, LossFn], StepFn]


def make_mlp() -> nn.Module:
    """The MAML sinusoid regressor: 1-40-40-1, ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def make_conv(channels: int = 64, ways: int = 5) -> nn.Module:
    """The 4-block MAML conv net for 28×28×1 input (see the module docstring)."""
    layers: list[nn.Module] = []
    c_in = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(c_in, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c_in = channels
    layers += [nn.Flatten(), nn.Linear(channels, ways)]
    return nn.Sequential(*layers)


def sinusoid_tasks(meta_batch: int, shots: int = 10, queries: int = 10, seed: int = 0) -> Tasks:
    """Sinusoid regression tasks (amplitude U[0.1, 5], phase U[0, π], x U[−5, 5])."""
    gen = torch.Generator().manual_seed(seed)
    amp = torch.empty(meta_batch, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(meta_batch, 1, 1).uniform_(0.0, math.pi, generator=gen)
    xs = torch.empty(meta_batch, shots + queries, 1).uniform_(-5.0, 5.0, generator=gen)
    ys = amp * torch.sin(xs - phase)
    return xs[:, :shots], ys[:, :shots], xs[:, shots:], ys[:, shots:]


def image_tasks(
    meta_batch: int, ways: int = 5, shots: int = 1, queries: int = 15, seed: int = 0
) -> Tasks:
    """N-way K-shot episodes of 28×28 Gaussian-noise images, labels ``0..ways-1``."""
    gen = torch.Generator().manual_seed(seed)
    sx = torch.randn(meta_batch, ways * shots, 1, 28, 28, generator=gen)
    qx = torch.randn(meta_batch, ways * queries, 1, 28, 28, generator=gen)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1).contiguous()
    return sx, sy, qx, qy


@dataclass(frozen=True)
class Problem:
    """One benchmark configuration: model, tasks and inner loop."""

    model: str
    meta_batch: int
    inner_steps: int
    inner_lr: float
    loss_fn: LossFn
    factory: Callable[[], nn.Module]
    tasks: Tasks
    state: dict[str, Tensor]

    @property
    def model_factory_state(self) -> ModelFactoryState:
        return self.factory, self.state

    @property
    def key(self) -> str:
        return f"{self.model} B={self.meta_batch} steps={self.inner_steps}"


def make_problem(
    model: str,
    meta_batch: int,
    inner_steps: int,
    seed: int = 0,
    channels: int = 64,
    device: str | torch.device = "cpu",
) -> Problem:
    """Build the configuration ``model`` ∈ {mlp, conv} with weights and tasks from ``seed``.

    Weights and tasks are drawn on the CPU (so they are identical on every device) and then
    moved to ``device``.
    """
    if model == "mlp":
        factory: Callable[[], nn.Module] = make_mlp
        tasks, inner_lr, loss_fn = sinusoid_tasks(meta_batch, seed=seed + 1), 0.01, F.mse_loss
    elif model == "conv":
        def factory() -> nn.Module:
            return make_conv(channels)

        tasks, inner_lr, loss_fn = image_tasks(meta_batch, seed=seed + 1), 0.4, F.cross_entropy
    else:
        raise ValueError(f"unknown model {model!r}; expected 'mlp' or 'conv'")
    torch.manual_seed(seed)
    state = {k: v.detach().clone().to(device) for k, v in factory().state_dict().items()}
    tasks = tuple(t.to(device) for t in tasks)
    return Problem(model, meta_batch, inner_steps, inner_lr, loss_fn, factory, tasks, state)


def to_float64(problem: Problem) -> Problem:
    """The same problem in float64: weights and floating task tensors cast, labels kept."""
    def cast(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    return replace(problem, tasks=tuple(cast(t) for t in problem.tasks),
                   state={k: cast(v) for k, v in problem.state.items()})


def instantiate(model_factory_state: ModelFactoryState) -> nn.Module:
    """A fresh model in training mode holding a copy of the given state (on its device,
    in the dtype of its floating tensors)."""
    factory, state = model_factory_state
    first = next(v for v in state.values() if v.is_floating_point())
    model = factory().to(device=first.device, dtype=first.dtype)
    model.load_state_dict(state)
    return model.train()


def task_slices(tasks: Tasks) -> list[Tasks]:
    """Split a task batch along its leading axis."""
    sx, sy, qx, qy = tasks
    return [(sx[i], sy[i], qx[i], qy[i]) for i in range(sx.shape[0])]


QueryLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def per_task_step(model: nn.Module, tasks: Tasks, query_loss: QueryLoss,
                  after_task: Callable[[], None] | None = None) -> Tensor:
    """The task loop every peer shares: zero the model's gradients, then for each task
    adapt on the support set and back-propagate ``query_loss / n_tasks`` (gradients
    accumulate, one task's graph alive at a time); return the detached mean query loss.

    ``query_loss(sx, sy, qx, qy)`` is the library-specific part: the inner loop and the
    query loss of one task. ``after_task`` runs after each task's backward.
    """
    model.zero_grad(set_to_none=True)
    n_tasks = tasks[0].shape[0]
    losses = []
    for sx, sy, qx, qy in task_slices(tasks):
        loss = query_loss(sx, sy, qx, qy)
        (loss / n_tasks).backward()
        losses.append(loss.detach())
        if after_task is not None:
            after_task()
    return torch.stack(losses).mean()


def read_grads(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the model's parameter gradients (zeros where a gradient is missing)."""
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


def run_meta_gradient(
    make_step: MakeStep,
    model_factory_state: ModelFactoryState,
    tasks: Tasks,
    inner_steps: int,
    inner_lr: float,
    loss_fn: LossFn,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One meta-step of ``make_step`` on a fresh model: ``(meta_loss, grads)``."""
    model = instantiate(model_factory_state)
    loss = make_step(model, inner_steps, inner_lr, loss_fn)(tasks)
    return loss, read_grads(model)


def max_rel_diff(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """``max over params of max|g − g_ref| / (max|g_ref| + tiny)``."""
    if grads.keys() != reference.keys():
        raise ValueError(f"parameter names differ: {sorted(grads)} vs {sorted(reference)}")
    tiny = torch.finfo(torch.float32).tiny
    worst = 0.0
    for name, ref in reference.items():
        diff = (grads[name].double() - ref.double()).abs().max().item()
        worst = max(worst, diff / (ref.double().abs().max().item() + tiny))
    return worst


NOISE_REL = 1e-5
"""A parameter whose reference gradient has ``max|g_ref| < NOISE_REL · max over all
parameters of max|g_ref|`` is at float32 noise level (about 100 float32 epsilons of the
model-wide gradient scale); see :func:`signal_rel_diff`."""


def noise_level_params(reference: dict[str, Tensor], noise_rel: float = NOISE_REL) -> list[str]:
    """Parameters whose reference gradient is at float noise level (see :data:`NOISE_REL`).

    In the conv net every conv bias feeds a training-mode BatchNorm, which subtracts the
    per-channel mean: the bias's meta-gradient is analytically zero, and what any float32
    implementation returns is rounding residue (~1e-8–1e-6 of the scale), so its relative
    difference between two implementations is noise over noise, O(1).
    """
    scale = max(ref.double().abs().max().item() for ref in reference.values())
    return [name for name, ref in reference.items()
            if ref.double().abs().max().item() < noise_rel * scale]


def signal_rel_diff(grads: dict[str, Tensor], reference: dict[str, Tensor],
                    noise_rel: float = NOISE_REL) -> tuple[float, dict[str, float]]:
    """:func:`max_rel_diff` over the parameters *not* at noise level, and for those that
    are, their absolute difference ``max|g − g_ref|`` by name.

    The rule (fixed, not fitted): a parameter is at noise level when its reference
    gradient's largest magnitude is below ``noise_rel`` times the largest over all
    parameters (:func:`noise_level_params`). Their absolute differences are reported,
    not dropped, so a real gradient hiding there stays visible.
    """
    noise = set(noise_level_params(reference, noise_rel))
    worst = max_rel_diff({n: g for n, g in grads.items() if n not in noise},
                         {n: r for n, r in reference.items() if n not in noise})
    absolute = {n: (grads[n].double() - reference[n].double()).abs().max().item()
                for n in sorted(noise)}
    return worst, absolute
