"""Online adaptation: stream documents through a base model with token weights, then test it.

The stream is N padded documents ``doc_ids, doc_mask (N, T)`` with weights
``(N, T)`` from any weighting (CaMeLS's :class:`TokenWeighting`, or
:mod:`~metaopt.algorithms.camels.baselines`: uniform, salient spans, TF-IDF,
oracle answer spans). The documents are taken in order, ``batch_size`` at a time;
each batch gets ``steps_per_batch`` Adam steps on the weighted LM loss

    L(θ) = Σ_t w_t m_t ℓ_t(θ) / Σ_t m_t          (:func:`weighted_lm_loss`)

through the project's one inner loop (:func:`metaopt.bilevel.inner_loop.unroll`,
not differentiated: step k uses batch ``k // steps_per_batch``). Afterwards
(:func:`evaluate_adapted`): EM / F1 of greedy answers, the answers' mean NLL, and
forgetting = the change in mean token NLL on unrelated locality text
(after − before; positive means the model got worse on it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metaopt.algorithms.camels.evaluation import logits_with, score_answers
from metaopt.algorithms.camels.objective import answer_nll, weighted_lm_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.optim import adam
from metaopt.params import Params

__all__ = ["OnlineResult", "QASet", "adapt_online", "evaluate_adapted", "locality_nll",
           "run_online"]


@dataclass(frozen=True)
class QASet:
    """Questions about the streamed documents.

    Attributes:
        prompts: token ids of each question prompt, up to the answer (for greedy answers).
        golds: the gold answers of each prompt (EM / F1 take the best).
        qa_ids, qa_mask, answer_mask: ``(M, Tq)`` question+answer sequences and the
            mask of their answer tokens (for the answer NLL).
    """

    prompts: Sequence[Sequence[int]]
    golds: Sequence[Sequence[str]]
    qa_ids: Tensor
    qa_mask: Tensor
    answer_mask: Tensor


@dataclass(frozen=True)
class OnlineResult:
    """What a stream taught the model (all plain floats; NLLs in nats per token)."""

    exact_match: float
    f1: float
    answer_nll: float
    answer_nll_before: float
    locality_nll: float
    forgetting: float
    inner_losses: list[float]
    answers: list[str]


def _check_stream(doc_ids: Tensor, doc_mask: Tensor, weights: Tensor) -> None:
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (documents, time), got shape {tuple(doc_ids.shape)}")
    for name, t in (("doc_mask", doc_mask), ("weights", weights)):
        if t.shape != doc_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != doc_ids shape "
                             f"{tuple(doc_ids.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights holds NaN or inf")


def adapt_online(model: nn.Module, theta: Mapping[str, Tensor], doc_ids: Tensor,
                 doc_mask: Tensor, weights: Tensor, *, lr: float, batch_size: int = 1,
                 steps_per_batch: int = 1) -> tuple[Params, list[float]]:
    """θ after streaming the documents with Adam(lr), and the inner losses per step."""
    _check_stream(doc_ids, doc_mask, weights)
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if batch_size < 1 or steps_per_batch < 1:
        raise ValueError(f"batch_size and steps_per_batch must be >= 1, got "
                         f"{batch_size}, {steps_per_batch}")
    n = doc_ids.shape[0]
    n_batches = -(-n // batch_size)
    weights = weights.detach()

    def loss(th: Params, step: int) -> Tensor:
        b = step // steps_per_batch
        rows = slice(b * batch_size, min(n, (b + 1) * batch_size))
        ids, mask = doc_ids[rows], doc_mask[rows]
        return weighted_lm_loss(logits_with(model, th)(ids, mask), ids, weights[rows], mask)

    theta0 = {k: v.detach() for k, v in theta.items()}
    with torch.no_grad():
        trace = unroll(loss, adam(lr), theta0, n_batches * steps_per_batch)
    return ({k: v.detach() for k, v in trace.theta.items()},
            [float(x) for x in trace.losses])


@torch.no_grad()
def locality_nll(model: nn.Module, theta: Mapping[str, Tensor], loc_ids: Tensor,
                 loc_mask: Tensor) -> float:
    """Mean next-token NLL over the real tokens of locality text ``(L, T)``."""
    logits = logits_with(model, theta)(loc_ids, loc_mask)
    return float(weighted_lm_loss(logits, loc_ids, loc_mask.to(logits.dtype), loc_mask))


@torch.no_grad()
def evaluate_adapted(model: nn.Module, theta: Mapping[str, Tensor], qa: QASet,
                     decode: Callable[[list[int]], str], *, eos_id: int,
                     max_new_tokens: int = 8, max_len: int | None = None
                     ) -> tuple[float, float, float, list[str]]:
    """EM, F1, mean answer NLL and the greedy answers of θ on the QA set."""
    fn = logits_with(model, theta)
    em, f, answers = score_answers(fn, qa.prompts, qa.golds, decode, eos_id=eos_id,
                                   max_new_tokens=max_new_tokens, max_len=max_len)
    nll = float(answer_nll(fn(qa.qa_ids, qa.qa_mask), qa.qa_ids, qa.answer_mask))
    return em, f, nll, answers


def run_online(model: nn.Module, theta0: Mapping[str, Tensor], doc_ids: Tensor,
               doc_mask: Tensor, weights: Tensor, qa: QASet, loc_ids: Tensor,
               loc_mask: Tensor, decode: Callable[[list[int]], str], *, lr: float,
               eos_id: int, batch_size: int = 1, steps_per_batch: int = 1,
               max_new_tokens: int = 8, max_len: int | None = None) -> OnlineResult:
    """Stream the documents from θ₀ (:func:`adapt_online`) and evaluate the result."""
    with torch.no_grad():
        before = float(answer_nll(logits_with(model, theta0)(qa.qa_ids, qa.qa_mask),
                                  qa.qa_ids, qa.answer_mask))
    loc_before = locality_nll(model, theta0, loc_ids, loc_mask)
    theta, losses = adapt_online(model, theta0, doc_ids, doc_mask, weights, lr=lr,
                                 batch_size=batch_size, steps_per_batch=steps_per_batch)
    em, f, nll, answers = evaluate_adapted(model, theta, qa, decode, eos_id=eos_id,
                                           max_new_tokens=max_new_tokens, max_len=max_len)
    loc_after = locality_nll(model, theta, loc_ids, loc_mask)
    return OnlineResult(exact_match=em, f1=f, answer_nll=nll, answer_nll_before=before,
                        locality_nll=loc_after, forgetting=loc_after - loc_before,
                        inner_losses=losses, answers=answers)
