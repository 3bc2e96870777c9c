"""SQuAD answer normalisation, EM / F1, greedy decoding and answer NLL, on cases worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.algorithms.camels.evaluation import (
    answer_nll,
    exact_match,
    f1_score,
    greedy_generate,
    normalize_answer,
)


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear ", "apple pear"),
    ("Theatre", "theatre"),          # an article only as a whole word
    ("1,987.", "1987"),
    ("A", ""),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_gold() -> None:
    assert exact_match("the Blue whale.", ["orca", "blue whale"]) == 1.0
    assert exact_match("blue", "blue whale") == 0.0


def test_f1_by_hand() -> None:
    # pred {red, big, dog}, gold {big, red, cat}: 2 shared, P = R = 2/3, F1 = 2/3.
    assert f1_score("red big dog", "big red cat") == pytest.approx(2 / 3)
    # repeated tokens count as a multiset: pred {a1, a1}, gold {a1}: P = 1/2, R = 1.
    assert f1_score("tom tom", "tom") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("x", ["y", "x"]) == 1.0
    assert f1_score("the", "a") == 1.0   # both normalise to empty
    assert f1_score("", "cat") == 0.0
    with pytest.raises(ValueError, match="golds"):
        f1_score("x", [])


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


def test_answer_nll_is_the_mean_over_answer_tokens() -> None:
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    logits[0, 0, 2] = math.log(3.0)   # p(token 2 | pos 0) = 3 / 6 = 1/2
    logits[0, 1, 1] = math.log(5.0)   # p(token 1 | pos 1) = 5 / 8
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[False, True, True]])
    nll = answer_nll(lambda i, m: logits, ids, torch.ones_like(ids), mask)
    assert nll.item() == pytest.approx((math.log(2) + math.log(8 / 5)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="position 0"):
        answer_nll(lambda i, m: logits, ids, torch.ones_like(ids), torch.ones(1, 3).bool())
