"""Models the project ships: a small causal transformer language model.

:class:`TinyLM` is the base model and the default weighting backbone of CaMeLS
(:mod:`metaopt.algorithms.camels`); its attention is written out explicitly so
second-order gradients work on CPU.
"""

from metaopt.models.tiny_lm import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig"]
