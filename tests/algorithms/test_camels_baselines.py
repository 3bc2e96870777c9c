"""Baseline token weightings: uniform, span (salient / oracle) and TF-IDF, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.algorithms.camels.baselines import (
    TfIdf,
    normalize_weights,
    span_weights,
    uniform_weights,
)


def test_uniform_and_span_weights_zero_on_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0]])
    assert uniform_weights(mask).tolist() == [[1.0, 1.0, 1.0, 0.0]]
    spans = torch.tensor([[False, True, False, True]])
    assert span_weights(spans, mask).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="span_mask"):
        span_weights(spans[:, :3], mask)


def test_normalize_weights_mean_one_over_real_tokens() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    w = normalize_weights(torch.tensor([[1.0, 3.0, 9.0], [1.0, 1.0, 1.0]]), mask)
    assert w.tolist() == [[0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]


def test_tfidf_by_hand() -> None:
    # corpus: token 0 in both documents, token 1 in one, token 2 in none (N = 2).
    tfidf = TfIdf([[0, 1], [0, 0]], vocab_size=3)
    idf = [math.log(3 / 3) + 1, math.log(3 / 2) + 1, math.log(3 / 1) + 1]
    assert tfidf.idf.tolist() == pytest.approx(idf)
    ids = torch.tensor([[0, 0, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 0]])   # the last token is padding
    raw = torch.tensor([2 / 3 * idf[0], 2 / 3 * idf[0], 1 / 3 * idf[2], 0.0])
    expected = raw * 3 / raw.sum()
    assert tfidf(ids, mask)[0].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="outside"):
        TfIdf([[5]], vocab_size=3)
