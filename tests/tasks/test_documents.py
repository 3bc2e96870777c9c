"""The fictional-entity document streams (tasks.documents) and the word tokenizer
(metaopt.text) they are read with."""

from __future__ import annotations

import json
import re

import pytest
import torch

from metaopt.errors import FormatError
from metaopt.text import SPECIAL_TOKENS, Tokenizer, batch_encode_qa, encode_qa, qa_prompt_ids
from tasks.documents import (
    NAME_SYLLABLES,
    SPLITS,
    entity_split,
    heuristic_salient_spans,
    locality_corpus,
    make_qa_tuning_set,
    make_stream,
    qa_tuning_examples,
    span_token_masks,
    vocabulary_texts,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)


@pytest.fixture(scope="module")
def streams() -> dict[str, list]:
    return {s: make_stream(s, 300, seed=0) for s in SPLITS}


# ---------------------------------------------------------------------- tokenizer
def test_special_ids_and_round_trip(tok: Tokenizer, streams: dict[str, list]) -> None:
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.sep_id] == [0, 1, 2, 3, 4]
    assert tok.vocab[:5] == SPECIAL_TOKENS
    texts = [d.text for d in streams["test"][:50]] + locality_corpus(20, seed=3)
    texts += ["Über 1987 naïve 日本, tabs\tand\nnewlines!  Two  spaces.", ""]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.unk_id not in ids


def test_words_digits_and_unknown_names(tok: Tokenizer) -> None:
    ids = tok.encode(" the 1987")
    assert [tok.vocab[i] for i in ids] == [" the", " 1", "9", "8", "7"]
    # an unseen word falls back to pieces/characters, never <unk>, and decodes back
    ids = tok.encode(" Zyxwq")
    assert tok.unk_id not in ids and tok.decode(ids) == " Zyxwq" and len(ids) > 1
    # a syllable name is a few pieces
    assert len(tok.encode(" Kalomi")) <= 3


def test_offsets_cover_the_text(tok: Tokenizer) -> None:
    text = "Kalomi Venra was born in 1950, in Übertown."
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert "".join(text[a:b] for k, (a, b) in enumerate(offsets)
                   if k == 0 or offsets[k - 1] != (a, b)) == text


def test_batch_encode_pads_and_truncates(tok: Tokenizer) -> None:
    texts = ["a b c d e f", "one"]
    ids, mask = tok.batch_encode(texts, max_len=4)
    assert ids.shape == mask.shape == (2, 4) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == tok.encode(texts[0])[:4]
    n = len(tok.encode("one"))
    assert mask[1].tolist() == [1] * n + [0] * (4 - n)
    assert (ids[1, n:] == tok.pad_id).all()
    ids, mask = tok.batch_encode(texts, max_len=50, pad=False, add_bos=True, add_eos=True)
    assert ids.shape[1] == len(tok.encode(texts[0])) + 2
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id


def test_save_load_json(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "metaopt-word-tokenizer"
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.encode("Kalomi 12 x") == tok.encode("Kalomi 12 x")
    path.write_text(json.dumps({"format": "metaopt-word-tokenizer", "version": 1,
                                "tokens": [3]}))
    with pytest.raises(FormatError, match=r"tok\.json.*'tokens'"):
        Tokenizer.load(path)
    path.write_text("{oops")
    with pytest.raises(FormatError, match=r"tok\.json:1: invalid JSON"):
        Tokenizer.load(path)


def test_build_is_deterministic() -> None:
    corpus = ["bee ant ant cat", "cat cat ant"]
    assert Tokenizer.build(corpus) == Tokenizer.build(list(corpus))
    # added pieces: most frequent first, ties by text (" ant" and " cat" are seen 3 times)
    added = Tokenizer.build(corpus).vocab[len(Tokenizer.build([]).vocab):]
    assert added == (" ant", " cat", "bee", "cat")
    assert Tokenizer.build(corpus, min_count=2).vocab[-2:] == (" ant", " cat")


def test_qa_format_masks_exactly_the_answer(tok: Tokenizer) -> None:
    ids, mask = encode_qa(tok, "Who founded Kalo Labs?", "Mira Venda")
    prompt = qa_prompt_ids(tok, "Who founded Kalo Labs?")
    assert ids[:len(prompt)] == prompt and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "question: Who founded Kalo Labs? answer: Mira Venda"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Mira Venda"
    ids_t, att, ans = batch_encode_qa(tok, ["Q one?", "Q?"], ["a", "bb cc"], max_len=24,
                                      contexts=["some long context " * 10, None])
    assert ids_t.shape == (2, 24) and ans.dtype == torch.bool
    assert (ids_t[0] == tok.sep_id).sum() == 1 and att[0].all()   # context cut to fit
    assert tok.decode(ids_t[1][ans[1]].tolist()) == " bb cc"


# ---------------------------------------------------------------------- documents
def test_streams_are_deterministic_and_seeded() -> None:
    a, b = make_stream("train", 40, seed=5), make_stream("train", 40, seed=5)
    assert a == b
    assert make_stream("train", 40, seed=6) != a
    assert make_stream("train", 10, seed=5) == a[:10]  # a prefix of the longer stream


def test_splits_are_entity_disjoint(streams: dict[str, list]) -> None:
    ids = {s: {d.entity_id for d in docs} for s, docs in streams.items()}
    assert all(len(v) == 300 for v in ids.values())  # distinct entities within a stream
    other_seed = {d.entity_id for d in make_stream("test", 300, seed=9)}
    assert not ids["train"] & (ids["val"] | ids["test"] | other_seed)
    assert not ids["val"] & (ids["test"] | other_seed)
    for split, docs in streams.items():
        assert all(entity_split(d.entity_id) == split for d in docs)
    # first names (the split key) do not cross splits either
    firsts = {s: {e.partition(":")[2].split(" ")[0] for e in v} for s, v in ids.items()}
    assert not firsts["train"] & firsts["val"] and not firsts["val"] & firsts["test"]
    assert not {d.entity_id for d in make_qa_tuning_set(200)} & (ids["val"] | ids["test"])


def test_answers_are_stated_in_the_document(streams: dict[str, list]) -> None:
    for docs in streams.values():
        for doc in docs:
            assert len(doc.qa) >= 3 and len(doc.answer_spans) >= len(doc.qa)
            stated = {doc.text[s:e] for s, e in doc.answer_spans}
            assert {qa.answer for qa in doc.qa} == stated
            salient = {doc.text[s:e] for s, e in doc.salient_spans}
            assert stated <= salient
            name = doc.entity_id.partition(":")[2]
            assert name in salient and all(name in qa.question for qa in doc.qa)
            assert list(doc.salient_spans) == sorted(doc.salient_spans)


def test_same_entity_same_facts() -> None:
    """An entity's facts are a function of its id: the QA-tuning set and the train stream
    agree wherever they share an entity and a question's attribute."""
    facts: dict[tuple[str, str], str] = {}
    stream = make_stream("train", 1500, seed=0)
    tuning = make_qa_tuning_set(1500, seed=0)
    for doc in stream + tuning:
        for qa in doc.qa:
            key = (doc.entity_id, qa.question)
            assert facts.setdefault(key, qa.answer) == qa.answer
    assert {d.entity_id for d in stream} & {d.entity_id for d in tuning}  # the check bites


def test_documents_vary_and_have_distractors(streams: dict[str, list]) -> None:
    docs = streams["train"]
    kinds = {d.entity_id.split(":")[0] for d in docs}
    assert kinds == {"person", "company", "town", "invention"}
    # several phrasings: first sentences with the name masked are many
    shapes = {re.sub(r"\d+", "#", d.text.replace(d.entity_id.partition(":")[2], "N"))
              for d in docs}
    assert len(shapes) > 250
    covered = [sum(e - s for s, e in d.salient_spans) / len(d.text) for d in docs]
    assert max(covered) < 0.6  # there is non-salient text (templates, distractors)


def test_locality_and_qa_tuning_texts() -> None:
    texts = locality_corpus(50, seed=1)
    assert texts == locality_corpus(50, seed=1) and len(texts) == 50
    assert not any(syl.capitalize() in t for t in texts for syl in ("Kalo", "Venra"))
    examples = qa_tuning_examples(25, seed=0)
    assert len(examples) == 25 and examples == qa_tuning_examples(25, seed=0)
    assert all(re.fullmatch(r"question: .+\? answer: .+", e) for e in examples)


def test_span_token_masks(tok: Tokenizer, streams: dict[str, list]) -> None:
    docs = streams["val"][:8]
    ids, att = tok.batch_encode([d.text for d in docs], max_len=96)
    mask = span_token_masks(tok, docs, max_len=96, spans="answer")
    assert mask.shape == ids.shape and mask.dtype == torch.bool
    assert not (mask & (att == 0)).any()
    for row, doc in enumerate(docs):
        n = int(att[row].sum())
        marked = tok.decode(ids[row, :n][mask[row, :n]].tolist())
        # the marked tokens spell out the answers (those within max_len), in text order
        expect = "".join(" " + doc.text[s:e] if s > 0 and doc.text[s - 1] == " "
                         else doc.text[s:e] for s, e in doc.answer_spans)
        assert expect.startswith(marked) and marked
    salient = span_token_masks(tok, docs, max_len=96)
    assert (salient | mask).equal(salient)  # answers are salient
    with pytest.raises(ValueError, match="spans must be"):
        span_token_masks(tok, docs, 8, spans="names")


def test_heuristic_salient_spans() -> None:
    text = "Yesterday, Kalo Venra paid 1,200 coins. The market in Brisel closed."
    found = [text[s:e] for s, e in heuristic_salient_spans(text)]
    assert found == ["Kalo Venra", "1,200", "Brisel"]


def test_speed_thousands_of_documents_per_second() -> None:
    import time

    start = time.perf_counter()
    docs = make_stream("test", 2000, seed=11)
    assert len(docs) == 2000
    assert time.perf_counter() - start < 8.0  # ~1 s on one free core; shared CI margin


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_stream("dev", 3)
    with pytest.raises(ValueError, match="n_documents"):
        make_stream("train", -1)
