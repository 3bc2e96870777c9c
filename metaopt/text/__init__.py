"""Text for the project's language-model tasks: a small word-level tokenizer and the one
question-answering prompt format.

* :class:`TokenEncoder` — the interface (encode, offsets, decode, special ids) with the
  batching and span-mask logic written once.
* :class:`Tokenizer` — letter runs as words, digits one by one, greedy piece fallback and
  UTF-8 bytes for anything unseen (never ``<unk>``); JSON save/load; span → token masks.
* :func:`qa_prompt_ids`, :func:`encode_qa`, :func:`batch_encode_qa` —
  ``<bos> [context <sep>] question: Q answer: A <eos>`` with a mask over the answer.

Imports only torch and the standard library.
"""

from metaopt.text.qa_prompt import QA_ANSWER, QA_QUESTION, batch_encode_qa, encode_qa, qa_prompt_ids
from metaopt.text.tokenizer import SPECIAL_TOKENS, TokenEncoder, Tokenizer

__all__ = [
    "QA_ANSWER",
    "QA_QUESTION",
    "SPECIAL_TOKENS",
    "TokenEncoder",
    "Tokenizer",
    "batch_encode_qa",
    "encode_qa",
    "qa_prompt_ids",
]
