"""Models the project ships: a small causal transformer language model.

:class:`TinyLM` is the base model and the default weighting backbone of CaMeLS
(:mod:`metaopt.algorithms.camels`); its attention is written out explicitly so
second-order gradients work on CPU. :func:`checkpoint_layers` makes any model's
layer stack (a Hugging Face decoder) checkpointed correctly under ``functional_call``.
"""

from metaopt.models.checkpointing import CheckpointedLayer, checkpoint_layers
from metaopt.models.tiny_lm import TinyLM, TinyLMConfig

__all__ = ["CheckpointedLayer", "TinyLM", "TinyLMConfig", "checkpoint_layers"]
