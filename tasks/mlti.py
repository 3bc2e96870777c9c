"""MLTI task interpolation (Yao et al., "Meta-Learning with Fewer Tasks through Task
Interpolation", ICLR 2022 / arXiv 2021) as a task-augmentation hook.

Variant implemented — **input-level MLTI** (the paper interpolates at a randomly chosen
layer; the input layer is the special case that needs no model hook):

* each task ``i`` of a meta-batch is, with probability ``p``, replaced by its interpolation
  with a partner task ``j`` drawn from the same meta-batch (``j ≠ i`` when ``B > 1``);
* one ``λ ~ Beta(α, α)`` per interpolated task, shared by its support and query sets;
* inputs mix position by position: ``x = λ x_i + (1 − λ) x_j``;
* labels mix the same way — class ids become one-hot first, so labels are soft:
  ``y = λ onehot(y_i) + (1 − λ) onehot(y_j)`` (``[B, M, N]``); regression targets mix
  directly.
* ``label_sharing=False`` (default, the paper's setting for few-shot classification
  where episode labels are arbitrary): examples are paired by position, and episodes
  from :class:`~tasks.episodes.EpisodeSampler` are class-major, so label ``n`` of task
  ``i`` is mixed with label ``n`` of task ``j`` — the interpolated class ``n`` is a new
  class and its label stays one-hot. ``label_sharing=True`` (labels mean the same in all
  tasks, as in regression or fixed-class data) pairs every example with a random example
  of the partner's same set, so class labels become genuinely soft mixtures.

The mixed batch keeps task ``i``'s ``classes`` and ``info`` (plus the MLTI record); the
same :func:`interpolate_tasks` can mix hidden features at any layer inside a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from tasks.batch import TaskBatch

__all__ = ["MLTI", "interpolate_tasks"]


def _as_mixable(y: Tensor, num_classes: int | None, dtype: torch.dtype) -> Tensor:
    if num_classes is not None and not y.is_floating_point():
        return F.one_hot(y.long(), num_classes).to(dtype)
    return y.to(dtype) if not y.is_floating_point() else y


def _mix(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    shape = (lam.shape[0],) + (1,) * (a.dim() - 1)
    lam = lam.to(a.dtype).reshape(shape)
    return lam * a + (1 - lam) * b


def interpolate_tasks(batch: TaskBatch, partner: Tensor, lam: Tensor, *,
                      pairing: tuple[Tensor, Tensor] | None = None) -> TaskBatch:
    """Mix task ``i`` with task ``partner[i]`` using weight ``lam[i]`` (``[B]`` each).

    ``pairing`` optionally gives, per set, which example of the partner each example is
    mixed with (``[B, M]`` and ``[B, P]`` indices); by default the same position.
    Labels come back soft (``[B, M, N]``) for classification.
    """
    b = batch.batch_size
    if partner.shape != (b,) or lam.shape != (b,):
        raise ValueError(f"partner and lam must be [{b}], got {tuple(partner.shape)}, "
                         f"{tuple(lam.shape)}")
    dtype = batch.support_x.dtype if batch.support_x.is_floating_point() else torch.float32
    sets = []
    for s, (x, y) in enumerate(((batch.support_x, batch.support_y),
                                (batch.query_x, batch.query_y))):
        x = x.to(dtype)
        y = _as_mixable(y, batch.num_classes, dtype)
        x_other, y_other = x[partner], y[partner]
        if pairing is not None:
            idx = pairing[s]
            x_other = torch.gather(x_other, 1, idx.reshape(*idx.shape, *(1,) * (x.dim() - 2))
                                   .expand_as(x_other))
            y_other = torch.gather(y_other, 1, idx.reshape(*idx.shape, *(1,) * (y.dim() - 2))
                                   .expand_as(y_other))
        sets += [_mix(x, x_other, lam), _mix(y, y_other, lam)]
    info = dict(batch.info)
    info.update(mlti_partner=partner, mlti_lambda=lam)
    if pairing is not None:
        info.update(mlti_pairing_support=pairing[0], mlti_pairing_query=pairing[1])
    return TaskBatch(*sets, num_classes=batch.num_classes, classes=batch.classes, info=info)


@dataclass(frozen=True)
class MLTI:
    """Task augmentation ``(batch, generator) -> batch`` implementing input-level MLTI.

    ``alpha``: Beta(α, α) concentration; ``p``: probability that a task is replaced by an
    interpolated one (tasks not replaced keep ``λ = 1``); ``label_sharing``: see module
    docstring. ``info`` of the result records ``mlti_partner`` and ``mlti_lambda`` (and,
    with ``label_sharing``, ``mlti_pairing_support``/``mlti_pairing_query``).
    """

    alpha: float = 0.5
    p: float = 1.0
    label_sharing: bool = False

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"p must lie in [0, 1], got {self.p}")

    def __call__(self, batch: TaskBatch, generator: torch.Generator) -> TaskBatch:
        b = batch.batch_size
        if b > 1:  # a random partner different from the task itself
            partner = (torch.arange(b) + torch.randint(1, b, (b,), generator=generator)) % b
        else:
            partner = torch.zeros(1, dtype=torch.long)
        # Beta(α, α) from two Gammas, drawn with our generator for determinism.
        g1 = _standard_gamma(self.alpha, b, generator)
        g2 = _standard_gamma(self.alpha, b, generator)
        total = g1 + g2
        lam = torch.where(total > 0, g1 / total.clamp_min(1e-300), torch.full_like(g1, 0.5))
        lam = lam.float()
        keep = torch.rand(b, generator=generator) >= self.p
        lam = torch.where(keep, torch.ones_like(lam), lam)
        pairing = None
        if self.label_sharing:
            m, q = batch.support_x.shape[1], batch.query_x.shape[1]
            pairing = (torch.rand(b, m, generator=generator).argsort(dim=1),
                       torch.rand(b, q, generator=generator).argsort(dim=1))
        return interpolate_tasks(batch, partner, lam, pairing=pairing)


def _standard_gamma(shape: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Gamma(shape, 1) with an explicit generator (Marsaglia–Tsang).

    ``torch._standard_gamma`` takes no generator, so we draw it ourselves; for
    ``shape < 1`` we use ``Gamma(a) = Gamma(a + 1) · U^(1/a)``.
    """
    boost = shape < 1
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.ones(n, dtype=torch.bool)
    while bool(todo.any()):
        k = int(todo.sum())
        z = torch.randn(k, generator=generator, dtype=torch.float64)
        u = torch.rand(k, generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300))
                        < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        idx = torch.nonzero(todo).flatten()
        out[idx[ok]] = (d * v)[ok]
        todo[idx[ok]] = False
    if boost:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        out = out * u ** (1.0 / shape)
    return out
