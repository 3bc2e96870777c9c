"""Online adaptation: stream documents through a base LM with given token weights.

The evaluation setting of CaMeLS: the base model takes one optimizer step (Adam in the
reference, learning rate chosen on validation streams) per document of a stream, each
step on the document's weighted LM loss
(:func:`~metaopt.algorithms.camels.objective.weighted_lm_loss`); afterwards it
answers questions about all the documents. The weights may come from
the CaMeLS weighting model or from a baseline:

* :func:`uniform_weights`: every real token weighs 1 (plain fine-tuning);
* :func:`idf_weights`: each token weighs its inverse document frequency over a corpus
  (:func:`inverse_document_frequency`), the TF-IDF baseline;
* :func:`oracle_weights`: 1 on document tokens that occur in the answers, 0 elsewhere.

The stream runs through :func:`~metaopt.bilevel.inner_loop.unroll` (the project's one
inner loop) without a graph. :func:`greedy_answer` decodes answers token by token for
EM / F1 (:mod:`metaopt.algorithms.camels.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metaopt.algorithms.camels.objective import answer_nll, weighted_lm_loss
from metaopt.bilevel.inner_loop import unroll
from metaopt.optim import GradientTransformation
from metaopt.params import Params

__all__ = [
    "greedy_answer",
    "idf_weights",
    "inverse_document_frequency",
    "oracle_weights",
    "stream_adapt",
    "stream_answer_nll",
    "uniform_weights",
]

#: ``logits_fn(theta, input_ids, attention_mask) -> logits (B, T, V)``.
LogitsFn = Callable[[Params, Tensor, Tensor | None], Tensor]


def uniform_weights(doc_mask: Tensor) -> Tensor:
    """Weight 1 on every real token."""
    return doc_mask.to(torch.get_default_dtype())


def inverse_document_frequency(doc_ids: Tensor, doc_mask: Tensor, vocab_size: int) -> Tensor:
    """idf(v) = log(N / (1 + n_v)) + 1 over N documents, n_v = documents containing v."""
    n_docs = doc_ids.shape[0]
    present = torch.zeros(n_docs, vocab_size, dtype=torch.bool)
    present[torch.arange(n_docs)[:, None].expand_as(doc_ids)[doc_mask.bool()],
            doc_ids[doc_mask.bool()]] = True
    counts = present.sum(0).to(torch.get_default_dtype())
    return torch.log(n_docs / (1.0 + counts)) + 1.0


def idf_weights(doc_ids: Tensor, doc_mask: Tensor, idf: Tensor) -> Tensor:
    """Each real token weighs its idf (:func:`inverse_document_frequency`)."""
    return idf[doc_ids] * doc_mask.to(idf.dtype)


def oracle_weights(doc_ids: Tensor, doc_mask: Tensor, answer_ids: list[Tensor]) -> Tensor:
    """1 on the real tokens of document i that occur in ``answer_ids[i]``, else 0."""
    if len(answer_ids) != doc_ids.shape[0]:
        raise ValueError(f"answer_ids has {len(answer_ids)} entries for "
                         f"{doc_ids.shape[0]} documents")
    hits = torch.stack([torch.isin(doc, ans) for doc, ans in zip(doc_ids, answer_ids)])
    return (hits & doc_mask.bool()).to(torch.get_default_dtype())


def stream_adapt(logits_fn: LogitsFn, theta: Params, doc_ids: Tensor, doc_mask: Tensor,
                 weights: Tensor, optimizer: GradientTransformation) -> Params:
    """θ after one ``optimizer`` step per document, in order (detached).

    ``doc_ids, doc_mask, weights``: ``(D, T)``; step k uses document k's weighted LM loss.
    """
    if not (doc_ids.shape == doc_mask.shape == weights.shape):
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)}, doc_mask {tuple(doc_mask.shape)} "
                         f"and weights {tuple(weights.shape)} must have one shape")
    weights = weights.detach()

    def loss(th: Params, step: int) -> Tensor:
        ids, mask = doc_ids[step:step + 1], doc_mask[step:step + 1]
        return weighted_lm_loss(logits_fn(th, ids, mask), ids, weights[step:step + 1], mask)

    with torch.no_grad():
        trace = unroll(loss, optimizer, {k: v.detach() for k, v in theta.items()},
                       doc_ids.shape[0], stop_gradient=True)
    return {k: v.detach() for k, v in trace.theta.items()}


def stream_answer_nll(logits_fn: LogitsFn, theta: Params, qa_ids: Tensor,
                      answer_mask: Tensor) -> Tensor:
    """Mean answer-token NLL of θ on question+answer sequences ``(B, Tq)``."""
    with torch.no_grad():
        return answer_nll(logits_fn(theta, qa_ids, None), qa_ids, answer_mask)


def greedy_answer(logits_fn: LogitsFn, theta: Params, prompt_ids: Tensor,
                  max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding after ``prompt_ids`` ``(T,)``: the generated ids (no eos)."""
    ids = prompt_ids[None]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(logits_fn(theta, ids, None)[0, -1].argmax())
            if eos_id is not None and nxt == eos_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out
