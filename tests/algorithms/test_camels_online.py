"""Online adaptation helpers: baselines' weights, the stream, greedy decoding."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.algorithms.camels import (
    CaMeLS,
    TokenWeighting,
    greedy_answer,
    idf_weights,
    inverse_document_frequency,
    oracle_weights,
    stream_adapt,
    stream_answer_nll,
    uniform_weights,
)
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.optim import adam, sgd

V = 11


def _lm(seed: int, d: int = 8) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=2, max_len=16))


def test_idf_by_hand() -> None:
    """idf(v) = log(N / (1 + n_v)) + 1; padding does not count."""
    docs = torch.tensor([[1, 2, 2, 3], [1, 4, 5, 0], [1, 2, 6, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    idf = inverse_document_frequency(docs, mask, V)
    assert idf[1].item() == pytest.approx(math.log(3 / 4) + 1)
    assert idf[2].item() == pytest.approx(math.log(3 / 3) + 1)
    assert idf[0].item() == pytest.approx(math.log(3 / 1) + 1)  # only in padding
    w = idf_weights(docs, mask, idf)
    assert w[1, 3] == 0 and w[0, 1].item() == pytest.approx(idf[2].item())


def test_oracle_and_uniform_weights() -> None:
    docs = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = oracle_weights(docs, mask, [torch.tensor([3, 4]), torch.tensor([5, 0])])
    assert w.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert uniform_weights(mask).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="answer_ids"):
        oracle_weights(docs, mask, [torch.tensor([1])])


def test_stream_with_sgd_is_camels_adapt_document_by_document() -> None:
    base = _lm(0)
    camels = CaMeLS(base, TokenWeighting(_lm(1), width=8), inner_lr=0.2)
    torch.manual_seed(2)
    docs = torch.randint(0, V, (3, 9))
    mask = torch.ones_like(docs)
    w = torch.rand(3, 9)
    streamed = stream_adapt(camels.logits, camels.base_parameters(), docs, mask, w, sgd(0.2))
    theta = camels.base_parameters()
    for i in range(3):
        theta = camels.adapt(docs[i:i + 1], mask[i:i + 1], weights=w[i:i + 1], theta=theta)
    for k in theta:
        torch.testing.assert_close(streamed[k], theta[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="weights"):
        stream_adapt(camels.logits, theta, docs, mask, w[:, :4], sgd(0.2))


def test_oracle_stream_with_adam_lowers_answer_nll() -> None:
    """Answers inside the documents; Adam on the answer tokens teaches them."""
    base = _lm(0, d=16)
    camels = CaMeLS(base, TokenWeighting(_lm(1), width=8))
    torch.manual_seed(3)
    docs = torch.randint(0, V, (4, 10))
    mask = torch.ones_like(docs)
    qa = torch.cat([docs[:, :3], docs[:, 6:8]], dim=1)
    ans = torch.zeros_like(qa)
    ans[:, 3:] = 1
    theta0 = camels.base_parameters()
    before = stream_answer_nll(camels.logits, theta0, qa, ans)
    w = oracle_weights(docs, mask, list(docs[:, 6:8]))
    after = stream_answer_nll(camels.logits, stream_adapt(camels.logits, theta0, docs, mask,
                                                           w, adam(1e-2)), qa, ans)
    assert after < before - 0.05


def test_greedy_answer_is_argmax_decoding() -> None:
    model = _lm(0)
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def logits_fn(th, ids, mask):
        return model(ids, mask)

    prompt = torch.tensor([1, 2, 3])
    out = greedy_answer(logits_fn, theta, prompt, 4)
    ids = prompt[None]
    for _ in range(4):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert out == ids[0, 3:].tolist()
    assert greedy_answer(logits_fn, theta, prompt, 4, eos_id=out[0]) == []
