"""Hyperparameters as outer parameters φ: how a φ entry enters the inner problem.

Each helper turns entries of φ (a parameter dict, the thing estimators
differentiate) into a piece of an inner objective or inner optimizer:

* per-sample weights ``σ(w_i)`` for a weighted training loss (data hyper-cleaning);
* per-parameter (or per-layer) learning rates and weight decays for SGD, given in
  log space so they stay positive by construction, or raw with a :class:`Box`;
* an L2 regularisation strength (scalar or per parameter), in log space;
* a small network as hyperparameter — :class:`LossWeightNet` maps each sample's
  loss to a weight in (0, 1) (Meta-Weight-Net, Shu et al. 2019); its weights live in
  φ under a prefix and reach it through :func:`metaopt.params.functional_call`.

Everything is a pure function of φ, so every estimator (unrolled, implicit, F2SA,
BOME) sees the same problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from metaopt.optim import GradientTransformation, sgd
from metaopt.params import Params, functional_call
from metaopt.tree import tree_map

__all__ = [
    "LossWeightNet",
    "l2_penalty",
    "learned_sgd",
    "net_params",
    "net_weights",
    "prefixed",
    "sample_weights",
    "unprefixed",
    "weighted_mean",
]


def sample_weights(w: Tensor, transform: str = "sigmoid") -> Tensor:
    """Per-sample weights in [0, 1] from unconstrained logits ``w`` (``"sigmoid"``), or
    ``w`` itself (``"identity"``; pair it with a ``Box(0, 1)`` constraint)."""
    if transform == "sigmoid":
        return torch.sigmoid(w)
    if transform == "identity":
        return w
    raise ValueError(f"unknown sample-weight transform {transform!r}; use sigmoid or identity")


def weighted_mean(losses: Tensor, weights: Tensor, normalise: bool = False) -> Tensor:
    """``Σ weights·losses / n`` (or ``/ Σ weights`` with ``normalise``).

    Dividing by ``n`` keeps the inner objective's scale independent of how many
    samples are switched off; ``normalise`` gives a weighted average instead.
    """
    if losses.shape != weights.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} "
                         "differ in shape")
    total = (weights * losses).sum()
    if normalise:
        return total / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    return total / losses.numel()


def prefixed(params: Mapping[str, Tensor], prefix: str) -> Params:
    """``{prefix/name: tensor}`` — to place a dict (a net's weights, per-layer lrs) in φ."""
    return {f"{prefix}/{k}": v for k, v in params.items()}


def unprefixed(phi: Mapping[str, Tensor], prefix: str) -> Params:
    """The entries of φ under ``prefix/``, with the prefix stripped."""
    head = prefix + "/"
    return {k[len(head):]: v for k, v in phi.items() if k.startswith(head)}


def learned_sgd(lr_prefix: str = "lr", wd_prefix: str | None = None, *,
                log_space: bool = True, momentum: float = 0.0
                ) -> Callable[[Params], GradientTransformation]:
    """An inner-optimizer factory ``φ -> sgd(...)`` reading per-parameter hyperparameters.

    φ holds ``{lr_prefix}/{param}`` (and ``{wd_prefix}/{param}``) entries, one per inner
    parameter (a scalar per layer, or the parameter's shape for per-entry rates). In
    log space the value used is ``exp(φ)``; otherwise φ itself, which then needs a
    ``Box(low=0)`` constraint in the outer loop. Pass the factory as
    ``BilevelProblem(inner_optimizer=...)``.
    """

    def build(phi: Params) -> GradientTransformation:
        lr = unprefixed(phi, lr_prefix)
        if not lr:
            raise KeyError(f"no learning rates under '{lr_prefix}/' in φ (keys {sorted(phi)})")
        wd: Mapping[str, Tensor] | float = 0.0
        if wd_prefix is not None:
            wd = unprefixed(phi, wd_prefix)
        if log_space:
            lr = tree_map(torch.exp, lr)
            if isinstance(wd, Mapping):
                wd = tree_map(torch.exp, wd)
        return sgd(lr, momentum=momentum, weight_decay=wd)

    return build


def l2_penalty(theta: Mapping[str, Tensor], strength: Tensor | Mapping[str, Tensor], *,
               log_space: bool = True, keys: tuple[str, ...] | None = None) -> Tensor:
    """``Σ_k (λ_k / 2)·‖θ_k‖²`` with λ scalar or per parameter (``exp`` of it in log space).

    ``keys`` restricts the penalty (e.g. to weights, not biases).
    """
    names = list(theta) if keys is None else list(keys)
    terms = []
    for k in names:
        lam = strength[k] if isinstance(strength, Mapping) else strength
        lam = torch.exp(lam) if log_space else lam
        terms.append(0.5 * (lam * theta[k] ** 2).sum())
    return torch.stack(terms).sum()


class LossWeightNet(nn.Module):
    """A small MLP ``loss_i -> weight_i ∈ (0, 1)``: a network as hyperparameter.

    Meta-Weight-Net style: samples with large loss (likely mislabelled) can be learned
    to receive small weight. Use it functionally: put :func:`net_params` into φ and
    call :func:`net_weights`.
    """

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.body(losses.unsqueeze(-1))).squeeze(-1)


def net_params(net: nn.Module, prefix: str = "net") -> Params:
    """The net's parameters as detached φ entries under ``prefix/``."""
    return prefixed({k: v.detach().clone() for k, v in net.named_parameters()}, prefix)


def net_weights(net: nn.Module, phi: Mapping[str, Tensor], losses: Tensor,
                prefix: str = "net") -> Tensor:
    """Per-sample weights from the net whose parameters are φ's ``prefix/`` entries."""
    return functional_call(net, unprefixed(phi, prefix), (losses,))
