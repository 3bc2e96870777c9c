"""Scoring an online-adaptation run: EM / F1, answer NLL and forgetting, plus salient spans.

:func:`run_online` streams documents through the base model with any token weights
(:func:`~metaopt.algorithms.camels.online.stream_adapt`, Adam at a given learning
rate, one step per document) and then measures, on the stream's questions:
exact match and F1 of greedy answers (SQuAD normalisation,
:mod:`~metaopt.algorithms.camels.metrics`) and the answers' mean NLL; and, on
unrelated locality text, forgetting = mean token NLL after − before (positive: the
model got worse on it).

:func:`span_weights` is the salient-span baseline (1 on tokens inside entity names,
numbers and attribute values, 0 elsewhere); given the character spans where the
answers are stated, it is the span oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.algorithms.camels.metrics import exact_match, f1
from metaopt.algorithms.camels.objective import adapted_lr, weighted_lm_loss
from metaopt.algorithms.camels.online import (
    LogitsFn,
    greedy_answer,
    stream_adapt,
    stream_answer_nll,
)
from metaopt.optim import adam
from metaopt.params import Params

__all__ = ["OnlineResult", "QASet", "locality_nll", "run_online", "score_answers",
           "span_weights"]


def span_weights(span_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Weight 1 on real tokens inside the spans (``span_mask`` True), 0 elsewhere."""
    if span_mask.shape != attention_mask.shape:
        raise ValueError(f"span_mask shape {tuple(span_mask.shape)} != attention_mask shape "
                         f"{tuple(attention_mask.shape)}")
    return (span_mask.bool() & attention_mask.bool()).to(torch.get_default_dtype())


@dataclass(frozen=True)
class QASet:
    """Questions about the streamed documents.

    Attributes:
        prompts: token ids ``(T,)`` of each question prompt, up to the answer.
        golds: the gold answers of each prompt (EM / F1 take the best).
        qa_ids, answer_mask: ``(M, Tq)`` question+answer sequences and the mask of
            their answer tokens (for the answer NLL).
    """

    prompts: Sequence[Tensor]
    golds: Sequence[Sequence[str]]
    qa_ids: Tensor
    answer_mask: Tensor


@dataclass(frozen=True)
class OnlineResult:
    """What a stream taught the model (NLLs in nats per token)."""

    exact_match: float
    f1: float
    answer_nll: float
    answer_nll_before: float
    locality_nll: float
    forgetting: float
    answers: list[str]


def score_answers(logits_fn: LogitsFn, theta: Params, qa: QASet,
                  decode: Callable[[list[int]], str], *, max_new_tokens: int,
                  eos_id: int | None) -> tuple[float, float, list[str]]:
    """Mean exact match and F1 of θ's greedy answers, and the answers."""
    if len(qa.prompts) != len(qa.golds) or not qa.prompts:
        raise ValueError(f"qa: {len(qa.prompts)} prompts and {len(qa.golds)} gold lists; "
                         f"need as many, at least one")
    answers = [decode(greedy_answer(logits_fn, theta, p, max_new_tokens, eos_id))
               for p in qa.prompts]
    n = len(answers)
    return (sum(exact_match(a, g) for a, g in zip(answers, qa.golds)) / n,
            sum(f1(a, g) for a, g in zip(answers, qa.golds)) / n, answers)


@torch.no_grad()
def locality_nll(logits_fn: LogitsFn, theta: Params, loc_ids: Tensor, loc_mask: Tensor) -> float:
    """Mean next-token NLL over the real tokens of locality text ``(L, T)``."""
    logits = logits_fn(theta, loc_ids, loc_mask)
    return float(weighted_lm_loss(logits, loc_ids, loc_mask.to(logits.dtype), loc_mask))


def run_online(logits_fn: LogitsFn, theta0: Params, doc_ids: Tensor, doc_mask: Tensor,
               weights: Tensor, qa: QASet, loc_ids: Tensor, loc_mask: Tensor,
               decode: Callable[[list[int]], str], *, lr: float, eos_id: int | None,
               max_new_tokens: int = 8, adapt: Sequence[str] | None = None) -> OnlineResult:
    """Stream the documents from θ₀ with Adam(lr), one step each, and score the result.

    ``logits_fn(theta, input_ids, attention_mask) -> logits`` (``CaMeLS.logits``);
    ``adapt``: name prefixes of the parameters Adam updates, the others frozen
    (:func:`~metaopt.algorithms.camels.objective.adapted_lr`; None: all).
    """
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights holds NaN or inf")
    before = float(stream_answer_nll(logits_fn, theta0, qa.qa_ids, qa.answer_mask))
    loc_before = locality_nll(logits_fn, theta0, loc_ids, loc_mask)
    theta = stream_adapt(logits_fn, theta0, doc_ids, doc_mask, weights,
                         adam(adapted_lr(list(theta0), lr, adapt)))
    em, f, answers = score_answers(logits_fn, theta, qa, decode, max_new_tokens=max_new_tokens,
                                   eos_id=eos_id)
    nll = float(stream_answer_nll(logits_fn, theta, qa.qa_ids, qa.answer_mask))
    loc_after = locality_nll(logits_fn, theta, loc_ids, loc_mask)
    return OnlineResult(exact_match=em, f1=f, answer_nll=nll, answer_nll_before=before,
                        locality_nll=loc_after, forgetting=loc_after - loc_before,
                        answers=answers)
