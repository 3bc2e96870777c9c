"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): adapt only the head.

The body's features do not change in the inner loop, so they are computed once per
task (support and query) with the meta-parameters φ_body, and only the head is
unrolled on top of them. The meta-gradient reaches the body through those features,
which is exactly MAML with the inner loop restricted to the head
(``MAML(model, inner_params=head_names)``) at a fraction of the cost.
"""

from __future__ import annotations

from torch import Tensor, nn

from metaopt.algorithms._model import FunctionalModel
from metaopt.algorithms.base import LossFn
from metaopt.algorithms.maml import MAML
from metaopt.bilevel.unroll import unroll
from metaopt.params import Params

__all__ = ["ANIL"]


class ANIL(MAML):
    """MAML with the inner loop on the head only, body features computed once per task.

    Args:
        model: an ``nn.Sequential`` whose trailing children form the head (so the
            model is ``head(body(x))``). Wrap other models as
            ``nn.Sequential(body, head)``.
        head: how many trailing children of ``model`` are the head (default 1).
        Other arguments as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, *, head: int = 1, **kwargs) -> None:
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"ANIL needs an nn.Sequential (body..., head), got "
                            f"{type(model).__name__}; wrap it as nn.Sequential(body, head)")
        if not isinstance(head, int) or not 1 <= head < len(model):
            raise ValueError(f"head must be between 1 and {len(model) - 1} trailing "
                             f"children of the model, got {head!r}")
        body_mod, head_mod = model[:len(model) - head], model[len(model) - head:]
        head_names = [n for n, _ in head_mod.named_parameters()]
        if not head_names:
            raise ValueError("the head has no parameters to adapt")
        if "inner_params" in kwargs:
            raise TypeError("ANIL adapts the head; inner_params is not an ANIL argument")
        super().__init__(model, inner_lr, inner_steps, first_order, inner_params=head_names,
                         **kwargs)
        # Slices of an nn.Sequential keep their children's names ("3.weight"), so the
        # model's parameter names address both halves.
        self._body = FunctionalModel(body_mod, rewrites=self._fmodel.rewrites)
        self._head = FunctionalModel(head_mod, rewrites=self._fmodel.rewrites)
        self.head_names = head_names

    def _head_unroll(self, phi: Params, feats: Tensor, y: Tensor, loss_fn: LossFn,
                     steps: int, checks: bool) -> Params:
        head, buffers = self._head, self._head.buffers()

        def inner(theta: Params, step: int) -> Tensor:
            return loss_fn(head(theta, feats, buffers), y)

        theta0 = {k: phi[k] for k in self.head_names}
        return unroll(inner, self.optimizer_for(phi), theta0, steps,
                      stop_gradient=self.first_order, check_finite=checks).theta

    def _features(self, phi: Params, x: Tensor) -> Tensor:
        return self._body({k: v for k, v in phi.items() if k not in self.head_names
                           and k in self._fmodel.param_names}, x)

    def task_loss(self, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, loss_fn: LossFn, *, checks: bool) -> Tensor:
        theta = self._head_unroll(phi, self._features(phi, support_x), support_y, loss_fn,
                                  self.inner_steps, checks)
        return loss_fn(self._head(theta, self._features(phi, query_x)), query_y)

    def adapt_task(self, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   steps: int) -> Params:
        theta = self._head_unroll(phi, self._features(phi, x), y, loss_fn, steps, True)
        return {**{k: v for k, v in phi.items() if k in self._fmodel.param_names}, **theta}
