"""Gradient checkpointing that stays correct under ``torch.func.functional_call``.

``transformers``' own ``gradient_checkpointing_enable()`` recomputes a layer in
backward with whatever weights the module holds *then*; under ``functional_call``
those are the module's own weights again (the substituted ones were restored when
the call returned), so meta-gradients come out silently wrong. Here each layer's
weights are read when the layer is called and passed to
:func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``) as explicit
arguments; the recomputation substitutes exactly those tensors again.

:class:`CheckpointedLayer` wraps one layer (its parameters are then named
``<layer>.layer.<name>``); :func:`checkpoint_layers` wraps every entry of a
``ModuleList`` (the decoder layers of a Hugging Face causal LM: ``model.model.layers``
for Llama-style models, ``model.transformer.h`` for GPT-2). Call the model with
``use_cache=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from metaopt.params import functional_call

__all__ = ["CheckpointedLayer", "checkpoint_layers"]


class CheckpointedLayer(nn.Module):
    """``layer`` recomputed in backward with the weights it was called with."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        named = list(self.layer.named_parameters())
        names = [n for n, _ in named]
        layer = self.layer

        def run(*weights: Tensor) -> Any:
            return functional_call(layer, dict(zip(names, weights)), args, kwargs)

        return checkpoint(run, *(p for _, p in named), use_reentrant=False)


def checkpoint_layers(layers: nn.ModuleList) -> nn.ModuleList:
    """Wrap every layer of ``layers`` in a :class:`CheckpointedLayer` (in place)."""
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"layers must be an nn.ModuleList, got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, CheckpointedLayer):
            layers[i] = CheckpointedLayer(layer)
    return layers
