"""Question-answering evaluation for online adaptation: EM / F1, greedy answers, answer NLL.

Answers are compared after SQuAD's normalisation (lowercase, punctuation removed,
the articles "a", "an", "the" removed, whitespace collapsed). Exact match is
1 if the normalised prediction equals a normalised gold answer; F1 is the harmonic
mean of token precision and recall of the normalised prediction against a gold
answer (tokens counted as a multiset). Both take the best over the gold answers.

The model is any ``logits_fn(input_ids, attention_mask) -> logits`` (``(B, T, V)``);
:func:`model_logits` builds one from a module and a parameter dict.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.params import functional_call

__all__ = [
    "LogitsFn",
    "answer_nll",
    "exact_match",
    "f1_score",
    "greedy_generate",
    "model_logits",
    "normalize_answer",
]

#: ``(input_ids (B, T) int64, attention_mask (B, T) or None) -> logits (B, T, V)``.
LogitsFn = Callable[[Tensor, Tensor | None], Tensor]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    out = [golds] if isinstance(golds, str) else list(golds)
    if not out:
        raise ValueError("golds must hold at least one gold answer")
    return out


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # an empty side scores only against empty
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 of the normalised prediction, the best over the gold answers."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _golds(golds))


def model_logits(model: nn.Module, params: Mapping[str, Tensor]) -> LogitsFn:
    """``logits_fn`` calling ``model(input_ids, attention_mask)`` with ``params``."""

    def logits_fn(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return functional_call(model, params, (input_ids,), {"attention_mask": attention_mask})

    return logits_fn


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                    eos_id: int, max_len: int | None = None) -> list[int]:
    """The greedy (argmax) continuation of one prompt, without the prompt.

    Stops after ``eos_id`` (not included), after ``max_new_tokens`` tokens, or when the
    sequence reaches ``max_len`` positions. One forward pass per new token (no cache):
    meant for short answers from small models.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if max_len is not None and len(ids) >= max_len:
            break
        x = torch.tensor([ids], dtype=torch.long)
        nxt = int(logits_fn(x, torch.ones_like(x))[0, -1].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def answer_nll(logits_fn: LogitsFn, input_ids: Tensor, attention_mask: Tensor,
               answer_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of the answer tokens, one value per sequence ``(B,)``.

    ``answer_mask[b, t]`` marks token ``t`` as part of the answer; it is predicted from
    the logits at position ``t − 1``, so position 0 cannot be an answer token.
    """
    if answer_mask.shape != input_ids.shape:
        raise ValueError(f"answer_mask shape {tuple(answer_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if bool(answer_mask[:, 0].any()):
        raise ValueError("answer_mask marks position 0, which no logit predicts")
    mask = answer_mask[:, 1:].to(torch.float32)
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("answer_mask has a sequence without answer tokens")
    logits = logits_fn(input_ids, attention_mask)[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (nll * mask.to(nll.dtype)).sum(1) / counts.to(nll.dtype)
