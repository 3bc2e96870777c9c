"""Users' own question-answering data as :class:`tasks.documents.Document` streams.

Three layouts, each read into the same ``Document(text, qa, entity_id, salient_spans,
answer_spans)`` objects as the generated streams:

* :func:`load_squad` — SQuAD-style JSON: ``{"data": [{"title"?, "paragraphs": [{"context",
  "qas": [{"question", "answers": [{"text", "answer_start"?}], "is_impossible"?}]}]}]}``;
  one document per paragraph; unanswerable questions (``is_impossible`` or no answers) are
  skipped.
* :func:`load_streaming_csv` — StreamingQA-style CSV with a header and columns
  ``document``, ``question``, ``answers`` (``answer`` also accepted); ``answers`` is a JSON
  list of strings or ``a|b|c``; rows with the same document text form one document.
* :func:`load_jsonl` — one JSON object a line: ``{"document": str, "qa": [{"question": str,
  "answer": str | [str, ...]}], "id"?: str}``; blank lines are skipped.

:func:`load_documents` picks the reader by suffix (``.json``, ``.csv``, ``.jsonl``).

``answer_spans`` are the first occurrence of each gold answer in the text (case-
insensitive; SQuAD's ``answer_start`` when it points at the answer), so an answer the
document does not state verbatim simply has no span. ``salient_spans`` come from
:func:`tasks.documents.heuristic_salient_spans` plus the answer spans.

Malformed input raises :class:`metaopt.errors.FormatError` with one line naming the file,
the line (CSV, JSONL) or JSON path (SQuAD) and the field. Standard library only.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from metaopt.errors import FormatError
from metaopt.fileio import read_regular_file
from tasks.documents import Document, QAPair, Span, heuristic_salient_spans

__all__ = ["MAX_FILE_BYTES", "load_documents", "load_jsonl", "load_squad",
           "load_streaming_csv"]

MAX_FILE_BYTES = 1 << 30  # refuse files over 1 GiB rather than read them into memory


def _read_text(path: Path) -> str:
    data = read_regular_file(path, max_bytes=MAX_FILE_BYTES, what="QA data file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise FormatError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None


def _string(value: object, where: str, field: str) -> str:
    """``value`` if it is a non-empty string, else a FormatError naming ``where`` and
    ``field``."""
    if not isinstance(value, str) or not value.strip():
        raise FormatError(f"{where}: field '{field}' must be a non-empty string, "
                          f"got {_show(value)}")
    return value


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "nothing"
    return text if len(text) <= 40 else text[:37] + "..."


def _answer_list(value: object, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FormatError(f"{where}: field '{field}' must be a string or a non-empty list "
                          f"of strings, got {_show(value)}")
    return [_string(v, where, f"{field}[{i}]") for i, v in enumerate(value)]


def _qa_pair(question: str, answers: list[str]) -> QAPair:
    unique = list(dict.fromkeys(a.strip() for a in answers))
    return QAPair(question.strip(), unique[0], tuple(unique[1:]))


def _find(text: str, answer: str, start: int | None = None) -> Span | None:
    if start is not None and text[start:start + len(answer)] == answer:
        return (start, start + len(answer))
    at = text.lower().find(answer.lower())
    return None if at < 0 else (at, at + len(answer))


def _document(text: str, qa: list[QAPair], entity_id: str,
              starts: list[int | None] | None = None) -> Document:
    answer_spans: set[Span] = set()
    for i, pair in enumerate(qa):
        for answer in pair.answers:
            span = _find(text, answer, starts[i] if starts and answer == pair.answer else None)
            if span is not None:
                answer_spans.add(span)
    salient = set(heuristic_salient_spans(text)) | answer_spans
    return Document(text=text, qa=tuple(qa), entity_id=entity_id,
                    salient_spans=tuple(sorted(salient)),
                    answer_spans=tuple(sorted(answer_spans)))


# ---------------------------------------------------------------------- SQuAD JSON
def load_squad(path: str | os.PathLike) -> list[Document]:
    """Documents of a SQuAD-style JSON file (one per paragraph; see the module doc)."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise FormatError(f"{path}: field 'data' must be a list of articles")
    docs: list[Document] = []
    for i, article in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise FormatError(f"{where}: field 'paragraphs' must be a list")
        title = article.get("title")
        for j, paragraph in enumerate(article["paragraphs"]):
            at = f"{where}.paragraphs[{j}]"
            if not isinstance(paragraph, dict):
                raise FormatError(f"{at}: must be an object with 'context' and 'qas'")
            context = _string(paragraph.get("context"), at, "context")
            qas = paragraph.get("qas", [])
            if not isinstance(qas, list):
                raise FormatError(f"{at}: field 'qas' must be a list")
            pairs: list[QAPair] = []
            starts: list[int | None] = []
            for k, item in enumerate(qas):
                q_at = f"{at}.qas[{k}]"
                if not isinstance(item, dict):
                    raise FormatError(f"{q_at}: must be an object with 'question' and 'answers'")
                question = _string(item.get("question"), q_at, "question")
                answers = item.get("answers", [])
                if not isinstance(answers, list):
                    raise FormatError(f"{q_at}: field 'answers' must be a list")
                if item.get("is_impossible") is True or not answers:
                    continue
                texts: list[str] = []
                first_start: int | None = None
                for m, answer in enumerate(answers):
                    if not isinstance(answer, dict):
                        raise FormatError(f"{q_at}.answers[{m}]: must be an object with 'text'")
                    texts.append(_string(answer.get("text"), f"{q_at}.answers[{m}]", "text"))
                    start = answer.get("answer_start")
                    if start is not None and (not isinstance(start, int)
                                              or isinstance(start, bool)
                                              or not 0 <= start <= len(context)):
                        raise FormatError(f"{q_at}.answers[{m}]: field 'answer_start' must be "
                                          f"an integer in [0, {len(context)}], got "
                                          f"{_show(start)}")
                    if m == 0:
                        first_start = start
                pairs.append(_qa_pair(question, texts))
                starts.append(first_start)
            name = title if isinstance(title, str) and title else f"data[{i}]"
            docs.append(_document(context, pairs, f"{name}/{j}", starts))
    return docs


# ---------------------------------------------------------------------- StreamingQA CSV
def _csv_answers(cell: str, where: str, field: str) -> list[str]:
    cell = cell.strip()
    if not cell:
        raise FormatError(f"{where}: field '{field}' is empty")
    if cell.startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: field '{field}' is not a valid JSON list "
                              f"({err.msg})") from None
        return _answer_list(value, where, field)
    return _answer_list([a for a in cell.split("|") if a.strip()] or [cell], where, field)


def load_streaming_csv(path: str | os.PathLike) -> list[Document]:
    """Documents of a StreamingQA-style CSV (rows grouped by document; see the module doc)."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    columns = reader.fieldnames or []
    answer_col = "answers" if "answers" in columns else "answer"
    missing = [c for c in ("document", "question") if c not in columns]
    if answer_col not in columns:
        missing.append("answers (or answer)")
    if missing:
        raise FormatError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                          f"(has {', '.join(columns) or 'none'})")
    grouped: dict[str, list[QAPair]] = {}
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise FormatError(f"{where}: more cells than the header's {len(columns)} "
                                  "columns")
            document = _string(row["document"], where, "document")
            question = _string(row["question"], where, "question")
            answers = _csv_answers(row[answer_col] or "", where, answer_col)
            grouped.setdefault(document, []).append(_qa_pair(question, answers))
    except csv.Error as err:
        raise FormatError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return [_document(text, qa, f"{path.stem}/{n}")
            for n, (text, qa) in enumerate(grouped.items())]


# ---------------------------------------------------------------------- JSONL
def load_jsonl(path: str | os.PathLike) -> list[Document]:
    """Documents of a JSONL file, one object a line (see the module doc)."""
    path = Path(path)
    docs: list[Document] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(item, dict):
            raise FormatError(f"{where}: must be a JSON object with 'document' and 'qa'")
        text = _string(item.get("document"), where, "document")
        qa = item.get("qa")
        if not isinstance(qa, list):
            raise FormatError(f"{where}: field 'qa' must be a list, got {_show(qa)}")
        pairs = []
        for k, pair in enumerate(qa):
            if not isinstance(pair, dict):
                raise FormatError(f"{where}: field 'qa[{k}]' must be an object with "
                                  "'question' and 'answer'")
            question = _string(pair.get("question"), where, f"qa[{k}].question")
            pairs.append(_qa_pair(question, _answer_list(pair.get("answer"), where,
                                                         f"qa[{k}].answer")))
        entity_id = item.get("id", f"{path.stem}/{lineno}")
        docs.append(_document(text, pairs, _string(entity_id, where, "id")))
    return docs


_LOADERS = {".json": load_squad, ".csv": load_streaming_csv, ".jsonl": load_jsonl}


def load_documents(path: str | os.PathLike) -> list[Document]:
    """Read ``path`` with the loader its suffix names (``.json``, ``.csv``, ``.jsonl``)."""
    path = Path(path)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise FormatError(f"{path}: unknown QA data suffix '{path.suffix}'; use one of "
                          f"{', '.join(_LOADERS)}")
    return loader(path)
