"""SQuAD-style answer scoring: normalisation, exact match and token F1.

Normalisation (as in the SQuAD v1.1 evaluation): lower-case, drop punctuation, drop
the articles "a", "an", "the", collapse whitespace. F1 is the harmonic mean of
token precision and recall of the normalised prediction against the normalised
answer (tokens counted with multiplicity); when either side has no tokens, F1 is 1
if both are empty and 0 otherwise. With several gold answers the best score counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["exact_match", "f1", "squad_normalize"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_normalize(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(answers: str | Sequence[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("answers is empty: give at least one gold answer")
    return golds


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(a) for a in _golds(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """The best token F1 of the prediction against the gold answers."""
    pred = squad_normalize(prediction).split()
    return max(_f1(pred, squad_normalize(a).split()) for a in _golds(answers))
