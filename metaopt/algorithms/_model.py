"""A user's ``nn.Module`` as a pure function of a parameter dict, with buffers handled.

Normalisation layers are the one place where a plain ``functional_call`` would do
the wrong thing in meta-learning:

* **Training mode** (``model.train()``): BatchNorm-style layers normalise with the
  statistics of the batch they see — every support set and every query set of
  every task separately (as MAML, higher, learn2learn and TorchOpt do). Their
  running statistics are **not touched**: we pass ``None`` for the layer's
  ``running_mean``/``running_var``/``num_batches_tracked`` so the layer uses batch
  statistics and updates nothing. Without this, every inner step of every task would
  write into the shared running averages (and under ``vmap`` the in-place update is
  an error). Running stats therefore stay at whatever the user set; evaluate in
  training mode (transductive, as in the MAML paper) or fill them yourself.
* **Eval mode** (``model.eval()``): the running statistics are read, never written,
  so they are passed through unchanged.

Any other buffer is passed as the module's own tensor. A module that writes into
such a buffer in place still works in the per-task loop; under ``vmap`` it fails,
and the algorithms then fall back to the loop (see ``_execution``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from metaopt.params import Params

__all__ = ["FunctionalModel"]

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class FunctionalModel:
    """``model`` as ``f(params, x)``; see the module docstring for buffer rules."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.norm_modules = [(prefix, mod) for prefix, mod in model.named_modules()
                             if isinstance(mod, _NormBase)]
        self.param_names = [n for n, _ in model.named_parameters()]
        if not self.param_names:
            raise ValueError(f"{type(model).__name__} has no parameters to meta-learn")

    def buffers(self) -> dict[str, Tensor | None]:
        """The buffers to call the model with, following the rules above.

        Each normalisation layer's own ``training`` flag decides (so a model with a
        frozen, eval-mode BatchNorm inside a training model is respected).
        """
        bufs: dict[str, Tensor | None] = dict(self.model.named_buffers())
        for prefix, mod in self.norm_modules:
            if mod.training:
                for b in _NORM_BUFFERS:
                    bufs[f"{prefix}.{b}" if prefix else b] = None
        return bufs

    def parameters(self) -> Params:
        """The model's live parameters (autograd leaves, by name)."""
        return dict(self.model.named_parameters())

    def __call__(self, params: Mapping[str, Tensor], x: Tensor,
                 buffers: Mapping[str, Tensor | None] | None = None) -> Tensor:
        tensors = dict(self.buffers() if buffers is None else buffers)
        tensors.update(params)
        return torch.func.functional_call(self.model, tensors, (x,), strict=False)
