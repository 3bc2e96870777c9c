"""Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per parameter entry.

θ₁ = φ − α ⊙ ∇L_support(φ), where α has the shape of φ and is meta-learned with it.
The learning rates are part of φ and reach the differentiable SGD of
:mod:`metaopt.optim` as a per-parameter hyperparameter dict: each task's problem has
``inner_optimizer`` = a function of φ (:meth:`MetaSGD.optimizer_for`), so the rates
receive their meta-gradient through the same estimator as MAML.
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.optim import GradientTransformation, sgd
from metaopt.params import Params

__all__ = ["MetaSGD"]

_LR_PREFIX = "inner_lr:"


class MetaSGD(MAML):
    """MAML with meta-learned per-entry inner learning rates.

    The rates live in ``self.inner_lrs`` (an ``nn.ParameterDict``; the key is the
    parameter name with ``.`` replaced by ``__``) and are part of
    ``self.parameters()`` — give ``metasgd.parameters()`` to the outer optimizer.
    ``lr_of(name)`` returns the rate tensor of a model parameter.

    Args:
        model: the network.
        inner_lr: initial value of every learned rate.
        inner_steps, first_order, estimator, strategy, memory_budget, chunk_size:
            as for :class:`MAML`.
        scalar_lrs: one learned rate per parameter tensor instead of per entry.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, *, scalar_lrs: bool = False, **kwargs) -> None:
        if "inner_optimizer" in kwargs:
            raise TypeError("MetaSGD learns its SGD rates; inner_optimizer is not an argument")
        super().__init__(model, inner_lr, inner_steps, first_order, **kwargs)
        self.inner_lrs = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(torch.full(
                () if scalar_lrs else p.shape, float(inner_lr), dtype=p.dtype, device=p.device))
            for name, p in model.named_parameters()
        })

    def lr_of(self, name: str) -> torch.Tensor:
        """The learned inner learning rate(s) of model parameter ``name``."""
        return self.inner_lrs[name.replace(".", "__")]

    def outer_parameters(self) -> Params:
        phi = self._fmodel.parameters()
        phi.update({_LR_PREFIX + n: self.lr_of(n) for n in self._fmodel.param_names})
        return phi

    def optimizer_for(self, phi: Params) -> GradientTransformation:
        """SGD with the learned rates of φ."""
        return sgd({n: phi[_LR_PREFIX + n] for n in self.inner_params})
