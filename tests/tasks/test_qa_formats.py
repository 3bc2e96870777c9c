"""Loaders of users' QA data (tasks.qa_formats): each layout written to tmp_path, read into
the same Document objects; malformed input refused with one line naming file, place and
field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from metaopt.errors import FormatError
from tasks.documents import Document, QAPair
from tasks.qa_formats import load_documents, load_jsonl, load_squad, load_streaming_csv

TEXT_A = "Kalo Venra was born in 1950. She lives in Brisel and plays the harp."
TEXT_B = "Mira Labs makes rope. It employs 320 people."


def _squad(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _squad_data() -> dict:
    return {"version": "v2.0", "data": [{"title": "Kalo", "paragraphs": [
        {"context": TEXT_A, "qas": [
            {"id": "1", "question": "When was Kalo Venra born?",
             "answers": [{"text": "1950", "answer_start": TEXT_A.index("1950")},
                         {"text": "1950"}, {"text": "in 1950"}]},
            {"id": "2", "question": "What does she own?", "answers": [],
             "is_impossible": True},
            {"id": "3", "question": "Where does she live?",
             "answers": [{"text": "brisel"}]}]},
        {"context": TEXT_B, "qas": [
            {"question": "How many people work at Mira Labs?",
             "answers": [{"text": "320", "answer_start": TEXT_B.index("320")}]}]}]}]}


def _check_documents(docs: list[Document]) -> None:
    """The two documents every layout below describes."""
    assert [d.text for d in docs] == [TEXT_A, TEXT_B]
    a, b = docs
    assert a.qa[0] == QAPair("When was Kalo Venra born?", "1950", ("in 1950",))
    assert a.qa[-1].question == "Where does she live?"
    assert b.qa == (QAPair("How many people work at Mira Labs?", "320"),)
    # answer spans point at the answers in the text (case-insensitive find)
    assert {TEXT_A[s:e] for s, e in a.answer_spans} >= {"1950", "Brisel"}
    assert [TEXT_B[s:e] for s, e in b.answer_spans] == ["320"]
    for doc in docs:
        assert set(doc.answer_spans) <= set(doc.salient_spans)
        assert "Kalo Venra" in {TEXT_A[s:e] for s, e in a.salient_spans}
        assert len({d.entity_id for d in docs}) == 2


def test_squad_json(tmp_path: Path) -> None:
    docs = load_squad(_squad(tmp_path, _squad_data()))
    _check_documents(docs)
    assert len(docs[0].qa) == 2  # the impossible question is skipped
    assert docs[0].entity_id == "Kalo/0"
    assert load_documents(tmp_path / "squad.json") == docs


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_streaming_csv_json_and_bar_answers(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "stream.csv", [
        ["document", "question", "answers"],
        [TEXT_A, "When was Kalo Venra born?", json.dumps(["1950", "in 1950"])],
        [TEXT_B, "How many people work at Mira Labs?", "320"],
        [TEXT_A, "Where does she live?", "Brisel|the town of Brisel"],
    ])
    docs = load_streaming_csv(path)
    _check_documents(docs)
    assert docs[0].qa[1].answers == ("Brisel", "the town of Brisel")
    assert load_documents(path) == docs
    # the singular column name is accepted too
    path2 = _write_csv(tmp_path / "one.csv", [["document", "question", "answer"],
                                              [TEXT_B, "What does Mira Labs make?", "rope"]])
    assert load_streaming_csv(path2)[0].qa[0].answer == "rope"


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        {"document": TEXT_A, "id": "kalo", "qa": [
            {"question": "When was Kalo Venra born?", "answer": ["1950", "in 1950"]},
            {"question": "Where does she live?", "answer": "Brisel"}]},
        {"document": TEXT_B, "qa": [
            {"question": "How many people work at Mira Labs?", "answer": "320"}]},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n",
                    encoding="utf-8")
    docs = load_jsonl(path)
    _check_documents(docs)
    assert docs[0].entity_id == "kalo" and docs[1].entity_id == "docs/3"
    assert load_documents(path) == docs


def test_loaders_are_deterministic(tmp_path: Path) -> None:
    path = _squad(tmp_path, _squad_data())
    assert load_squad(path) == load_squad(path)


# ---------------------------------------------------------------------- malformed input
def _error(fn, path: Path) -> str:
    with pytest.raises(FormatError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_squad_errors_name_the_json_path(tmp_path: Path) -> None:
    data = _squad_data()
    data["data"][0]["paragraphs"][1]["qas"][0]["question"] = 7
    assert "data[0].paragraphs[1].qas[0]: field 'question'" in _error(
        load_squad, _squad(tmp_path, data))
    data = _squad_data()
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][1] = {"txt": "1950"}
    assert "data[0].paragraphs[0].qas[0].answers[1]: field 'text'" in _error(
        load_squad, _squad(tmp_path, data))
    data = _squad_data()
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 10_000
    assert "field 'answer_start'" in _error(load_squad, _squad(tmp_path, data))
    data = _squad_data()
    del data["data"][0]["paragraphs"][0]["context"]
    assert "paragraphs[0]: field 'context'" in _error(load_squad, _squad(tmp_path, data))
    assert "field 'data'" in _error(load_squad, _squad(tmp_path, [1, 2]))
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}')
    assert "broken.json:2: invalid JSON" in _error(load_squad, path)


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "a.csv", [["document", "question"], [TEXT_A, "Q?"]])
    assert "a.csv:1: header lacks column(s) answers" in _error(load_streaming_csv, path)
    path = _write_csv(tmp_path / "b.csv", [["document", "question", "answers"],
                                           [TEXT_A, "Q?", "x"], [TEXT_A, "", "x"]])
    assert "b.csv:3: field 'question'" in _error(load_streaming_csv, path)
    path = _write_csv(tmp_path / "c.csv", [["document", "question", "answers"],
                                           [TEXT_A, "Q?", '["x", 3]']])
    assert "c.csv:2: field 'answers[1]'" in _error(load_streaming_csv, path)
    path = _write_csv(tmp_path / "d.csv", [["document", "question", "answers"],
                                           [TEXT_A, "Q?", '["x"']])
    assert "d.csv:2: field 'answers' is not a valid JSON list" in _error(
        load_streaming_csv, path)
    path = _write_csv(tmp_path / "e.csv", [["document", "question", "answers"],
                                           [TEXT_A, "Q?", "x", "extra"]])
    assert "e.csv:2: more cells" in _error(load_streaming_csv, path)
    path = _write_csv(tmp_path / "f.csv", [["document", "question", "answers"],
                                           [TEXT_A, "Q?", " "]])
    assert "f.csv:2: field 'answers' is empty" in _error(load_streaming_csv, path)


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps({"document": TEXT_B, "qa": []})
    cases = {
        '{"document": "x", "qa": [}': "bad.jsonl:2: invalid JSON",
        '[1, 2]': "bad.jsonl:2: must be a JSON object",
        '{"qa": []}': "bad.jsonl:2: field 'document'",
        '{"document": "x", "qa": {}}': "bad.jsonl:2: field 'qa' must be a list",
        '{"document": "x", "qa": [{"question": "q?"}]}': "bad.jsonl:2: field 'qa[0].answer'",
        '{"document": "x", "qa": [{"answer": "a"}]}': "bad.jsonl:2: field 'qa[0].question'",
        '{"document": "x", "qa": [], "id": 5}': "bad.jsonl:2: field 'id'",
    }
    path = tmp_path / "bad.jsonl"
    for line, expected in cases.items():
        path.write_text(good + "\n" + line + "\n", encoding="utf-8")
        assert expected in _error(load_jsonl, path)


def test_unreadable_files(tmp_path: Path) -> None:
    assert "unknown QA data suffix '.txt'" in _error(load_documents, tmp_path / "x.txt")
    assert "cannot open" in _error(load_jsonl, tmp_path / "missing.jsonl")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"document": "caf\xe9"}\n')
    assert "latin.jsonl:1: not UTF-8" in _error(load_jsonl, path)


def test_loaded_documents_feed_the_tokenizer(tmp_path: Path) -> None:
    """User documents go through the same span → token-mask path as generated ones."""
    from metaopt.text import Tokenizer
    from tasks.documents import span_token_masks

    docs = load_squad(_squad(tmp_path, _squad_data()))
    tok = Tokenizer.build([d.text for d in docs])
    ids, att = tok.batch_encode([d.text for d in docs], max_len=64, pad=False)
    mask = span_token_masks(tok, docs, max_len=64, spans="answer", pad=False)
    assert mask.shape == att.shape and not (mask & (att == 0)).any()
    assert tok.decode(ids[1][mask[1]].tolist()) == " 320"
    # every gold answer has a span, alternatives too ("in 1950" covers "1950")
    assert tok.decode(ids[0][mask[0]].tolist()) == " in 1950 Brisel"
