"""Hand-made token weightings that CaMeLS is compared with.

Each returns weights ``(B, T)`` (float32, zero on padding) for a padded batch of
documents ``input_ids`` / ``attention_mask``:

- :func:`uniform_weights`: 1 on every real token (plain fine-tuning).
- :func:`span_weights`: 1 on tokens inside given character spans, 0 elsewhere. With
  salient spans (entity names, numbers, attribute values) it is the salient-span
  baseline; with the spans where the questions' answers are stated it is the oracle.
- :class:`TfIdf`: ``tf(v, doc) · idf(v)`` per token, ``idf(v) = log((1 + N) / (1 + df(v))) + 1``
  fitted on a corpus of N documents (``df``: documents holding token ``v``), then
  scaled to mean 1 over each document's real tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["TfIdf", "normalize_weights", "span_weights", "uniform_weights"]


def _mask(attention_mask: Tensor, name: str = "attention_mask") -> Tensor:
    if attention_mask.dim() != 2:
        raise ValueError(f"{name} must be (batch, time), got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask.to(torch.float32)


def normalize_weights(weights: Tensor, attention_mask: Tensor) -> Tensor:
    """Scale each row to mean 1 over its real tokens (rows of zeros stay zero)."""
    mask = _mask(attention_mask)
    w = weights * mask
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w * mask.sum(1, keepdim=True) / total.clamp_min(1e-30), w)


def uniform_weights(attention_mask: Tensor) -> Tensor:
    """Weight 1 on every real token, 0 on padding."""
    return _mask(attention_mask).clone()


def span_weights(span_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Weight 1 on real tokens inside the spans (``span_mask`` True), 0 elsewhere."""
    if span_mask.shape != attention_mask.shape:
        raise ValueError(f"span_mask shape {tuple(span_mask.shape)} != attention_mask shape "
                         f"{tuple(attention_mask.shape)}")
    return span_mask.to(torch.float32) * _mask(attention_mask)


class TfIdf:
    """TF-IDF token weights with the inverse document frequencies of a fitted corpus.

    Args:
        documents: token-id sequences of the corpus the document frequencies come from.
        vocab_size: number of token ids.
    """

    def __init__(self, documents: Iterable[Sequence[int]], vocab_size: int) -> None:
        df = torch.zeros(vocab_size, dtype=torch.float64)
        n = 0
        for doc in documents:
            ids = torch.as_tensor(list(doc), dtype=torch.long)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"TfIdf: document {n} holds a token id outside "
                                 f"[0, {vocab_size})")
            df[ids.unique()] += 1
            n += 1
        if n == 0:
            raise ValueError("TfIdf: documents is empty")
        self.num_documents = n
        self.idf = (torch.log((1 + n) / (1 + df)) + 1).to(torch.float32)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """TF-IDF weight of each token, scaled to mean 1 over each row's real tokens."""
        mask = _mask(attention_mask)
        if input_ids.shape != mask.shape:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} != attention_mask "
                             f"shape {tuple(mask.shape)}")
        vocab = self.idf.numel()
        counts = torch.zeros(input_ids.shape[0], vocab, dtype=torch.float32)
        counts.scatter_add_(1, input_ids, mask)
        tf = counts.gather(1, input_ids) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return normalize_weights(tf * self.idf[input_ids], attention_mask)

    def __repr__(self) -> str:
        return f"TfIdf(num_documents={self.num_documents}, vocab_size={self.idf.numel()})"
