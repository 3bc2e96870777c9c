"""``vocabulary_texts()`` gives the tokenizer every word the generator writes outside
names as ONE token, wherever it stands: sentence-initial inside a document (after a
space: ``" Born"``, ``" Visitors"``), capitalised, or at the very start of a text."""

from __future__ import annotations

import re

import pytest

from metaopt.text import Tokenizer
from tasks.documents import NAME_SYLLABLES, locality_corpus, make_stream, vocabulary_texts

WORD = re.compile(r" ?[^\W\d_]+")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)


def _outside(spans: tuple[tuple[int, int], ...], start: int, end: int) -> bool:
    # a word (with its leading space) inside a name or value span is allowed to split
    return not any(a <= start + 1 and end <= b for a, b in spans)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_non_name_word_of_a_document_is_one_token(tok: Tokenizer, split: str) -> None:
    split_words = []
    for d in make_stream(split, 150, seed=5):
        for m in WORD.finditer(d.text):
            if _outside(d.salient_spans, m.start(), m.end()):
                assert len(tok.encode(m.group())) == 1, (m.group(), d.text)
                split_words.append(m.group())
    # the case the fix is about: a capitalised template word after a sentence break
    assert any(w.startswith(" ") and w[1].isupper() for w in split_words)


def test_locality_text_is_one_token_per_word_or_symbol(tok: Tokenizer) -> None:
    for text in locality_corpus(60, seed=3):
        assert len(tok.encode(text)) == len(re.findall(r" ?[^\W\d_]+| ?[^\w\s]", text)), text


def test_pool_values_open_a_text_as_one_token(tok: Tokenizer) -> None:
    # a value such as a colour or instrument may be the first word of a text
    for word in ("red", "Red", " Red", "piano", " Piano", "Teal"):
        assert len(tok.encode(word)) == 1, word
