"""Answering questions with an adapted model: greedy decoding and EM / F1 over a QA set.

The model is any ``logits_fn(input_ids, attention_mask) -> logits`` (``(B, T, V)``);
:func:`logits_with` builds one from a module (the project's
:class:`~metaopt.models.TinyLM`, or a Hugging Face causal LM returning ``.logits``)
and a parameter dict. Scores use the SQuAD normalisation of
:mod:`metaopt.algorithms.camels.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from metaopt.algorithms.camels.metrics import exact_match, f1
from metaopt.params import functional_call

__all__ = ["LogitsFn", "greedy_generate", "logits_with", "score_answers"]

#: ``(input_ids (B, T) int64, attention_mask (B, T) or None) -> logits (B, T, V)``.
LogitsFn = Callable[[Tensor, Tensor | None], Tensor]


def logits_with(model: nn.Module, params: Mapping[str, Tensor]) -> LogitsFn:
    """``logits_fn`` calling ``model(input_ids, attention_mask=...)`` with ``params``."""

    def logits_fn(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        out = functional_call(model, params, (input_ids,), {"attention_mask": attention_mask})
        return out if isinstance(out, Tensor) else out.logits

    return logits_fn


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                    eos_id: int, max_len: int | None = None) -> list[int]:
    """The greedy (argmax) continuation of one prompt, without the prompt.

    Stops after ``eos_id`` (not included), after ``max_new_tokens`` tokens, or when the
    sequence reaches ``max_len`` positions. One forward pass per new token (no cache):
    meant for short answers.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = [int(i) for i in prompt_ids]
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


def score_answers(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]],
                  golds: Sequence[Sequence[str]], decode: Callable[[list[int]], str], *,
                  eos_id: int, max_new_tokens: int = 8,
                  max_len: int | None = None) -> tuple[float, float, list[str]]:
    """Mean exact match and F1 of greedy answers to ``prompts``, and the answers.

    ``golds[i]`` are the gold answers of prompt i; ``decode`` turns generated token
    ids into text.
    """
    if len(prompts) != len(golds):
        raise ValueError(f"prompts has {len(prompts)} entries, golds has {len(golds)}")
    if not prompts:
        raise ValueError("prompts is empty")
    answers = [decode(greedy_generate(logits_fn, p, max_new_tokens=max_new_tokens,
                                      eos_id=eos_id, max_len=max_len)) for p in prompts]
    em = sum(exact_match(a, g) for a, g in zip(answers, golds)) / len(answers)
    f = sum(f1(a, g) for a, g in zip(answers, golds)) / len(answers)
    return em, f, answers
