"""The one question-answering format of the language-model tasks.

A QA example is the token sequence::

    <bos> [context <sep>] "question: {question} answer:" " {answer}" <eos>

QA-tuning trains the model on the answer part (``" {answer}" <eos>``, the answer mask);
evaluation feeds :func:`qa_prompt_ids` and generates until ``<eos>``. The context is
optional: CaMeLS asks questions *without* the document, after the model has been updated
on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metaopt.text.tokenizer import TokenEncoder

__all__ = ["QA_ANSWER", "QA_QUESTION", "batch_encode_qa", "encode_qa", "qa_prompt_ids"]

QA_QUESTION = "question: "
QA_ANSWER = " answer:"


def qa_prompt_ids(tokenizer: TokenEncoder, question: str, context: str | None = None) -> list[int]:
    """``<bos> [context <sep>] question: {question} answer:`` as ids (a generation prompt)."""
    ids = [tokenizer.bos_id]
    if context is not None:
        ids += [*tokenizer.encode(context), tokenizer.sep_id]
    return ids + tokenizer.encode(QA_QUESTION + question + QA_ANSWER)


def encode_qa(tokenizer: TokenEncoder, question: str, answer: str,
              context: str | None = None) -> tuple[list[int], list[bool]]:
    """Ids of the full QA example and the mask of its answer tokens (``" {answer}" <eos>``)."""
    prompt = qa_prompt_ids(tokenizer, question, context)
    target = [*tokenizer.encode(" " + answer), tokenizer.eos_id]
    return prompt + target, [False] * len(prompt) + [True] * len(target)


def batch_encode_qa(tokenizer: TokenEncoder, questions: Sequence[str], answers: Sequence[str],
                    max_len: int, contexts: Sequence[str | None] | None = None,
                    pad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, answer_mask)`` of shape ``[B, T]`` (Long, Long, Bool).

    Right-padded with ``<pad>``; ``T = max_len`` when ``pad``, else the longest row. A
    context too long to fit loses its *first* tokens; a question + answer that alone do
    not fit in ``max_len`` is refused.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if contexts is not None and len(contexts) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    rows: list[tuple[list[int], list[bool]]] = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        ids, mask = encode_qa(tokenizer, q, a)
        context = None if contexts is None else contexts[i]
        need = len(ids) + (context is not None)  # + <sep>
        if need > max_len:
            raise ValueError(f"QA example {i}: question + answer take {need} tokens, "
                             f"more than max_len={max_len}")
        if context is not None:
            ctx = tokenizer.encode(context)
            ctx = ctx[max(0, len(ctx) - (max_len - need)):]
            ids = ids[:1] + ctx + [tokenizer.sep_id] + ids[1:]
            mask = [False] * (len(ctx) + 1) + mask
        rows.append((ids, mask))
    width = max_len if pad else max((len(r[0]) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, :len(ids)] = 1
        answer_mask[i, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, attention, answer_mask
