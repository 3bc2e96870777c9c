"""Greedy decoding and EM / F1 scoring of generated answers, on a model whose output is known."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.camels.evaluation import greedy_generate, logits_with, score_answers
from metaopt.models import TinyLM, TinyLMConfig


def _counting_logits(vocab: int):
    """A 'model' whose next token is (last token + 1) mod vocab."""

    def logits_fn(ids, mask):
        return torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float() * 10

    return logits_fn


def test_greedy_generate_stops_at_eos_and_limits() -> None:
    fn = _counting_logits(8)
    assert greedy_generate(fn, [3], max_new_tokens=10, eos_id=6) == [4, 5]
    assert greedy_generate(fn, [3], max_new_tokens=1, eos_id=6) == [4]
    assert greedy_generate(fn, [1, 2], max_new_tokens=10, eos_id=7, max_len=4) == [3, 4]
    with pytest.raises(ValueError, match="prompt_ids"):
        greedy_generate(fn, [], max_new_tokens=1, eos_id=0)


def test_score_answers_em_f1() -> None:
    words = {4: "the", 5: "red", 6: "fox"}
    decode = lambda ids: " ".join(words.get(i, "?") for i in ids)  # noqa: E731
    # prompt [3] -> "the red fox" (eos 7); prompt [5] -> "fox".
    em, f, answers = score_answers(_counting_logits(8), [[3], [5]], [["Red fox"], ["dog"]],
                                   decode, eos_id=7)
    assert answers == ["the red fox", "fox"]
    assert em == 0.5 and f == pytest.approx(0.5)


def test_logits_with_uses_the_given_parameters() -> None:
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=6))
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(logits_with(model, params)(ids, None), torch.zeros(1, 3, 11))
    assert not torch.equal(logits_with(model, dict(model.named_parameters()))(ids, None),
                           torch.zeros(1, 3, 11))
