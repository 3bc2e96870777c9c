"""A small deterministic word-level tokenizer for the project's tiny language model.

Text is cut into *pieces* by one regular expression (GPT-2 style): an optional leading
space followed by a run of letters, or by ONE digit, or by one other symbol; any other
whitespace character is a piece of its own. Pieces concatenate back to the text, so
``decode(encode(text)) == text`` exactly.

* Digits are always single tokens (``" 1987"`` → ``" 1" "9" "8" "7"``): every number is
  representable, seen or not.
* A letter run found in the vocabulary is one token. Otherwise it is split greedily,
  longest vocabulary piece first, into pieces; every printable ASCII character (with and
  without a leading space) is in every vocabulary, and any other character falls back to
  its UTF-8 bytes (``<0x..>`` tokens). So :meth:`Tokenizer.encode` never produces
  ``<unk>``: invented names are representable, and passing their syllables as
  ``extra_pieces`` to :meth:`Tokenizer.build` makes them a few tokens long.
* Special tokens (``<pad> <bos> <eos> <unk> <sep>``, ids 0–4) never come from text; they
  are added by the callers that need them (``add_bos``, the QA format).

Saved as JSON (the ordered vocabulary); no pickle.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from metaopt.errors import FormatError
from metaopt.fileio import atomic_write_text

__all__ = ["SPECIAL_TOKENS", "TokenEncoder", "Tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>")
_FORMAT = "metaopt-word-tokenizer"
_VERSION = 1
# letters (any script) | one digit | underscore | one other symbol, each with an optional
# leading space; a whitespace character not taken as a leading space stands alone.
_PIECE = re.compile(r" ?[^\W\d_]+| ?\d| ?_| ?[^\w\s]|\s")
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
_CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c\r")
_BASE = SPECIAL_TOKENS + _BYTES + _CHARS + tuple(" " + c for c in _CHARS if not c.isspace())


class TokenEncoder:
    """What the project's text code needs of a tokenizer, and the batch/span logic on top.

    A subclass provides ``encode``, ``encode_with_offsets``, ``decode``, ``vocab_size``
    and the ids ``pad_id``, ``bos_id``, ``eos_id``, ``sep_id``; batching, padding and
    span → token masks are written once, here, for every tokenizer (the project's own
    :class:`Tokenizer`, and ``metaopt.algorithms.camels.hf.HFTokenizer`` over a
    Hugging Face tokenizer).
    """

    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def batch_encode(self, texts: Sequence[str], max_len: int, pad: bool = True,
                     add_bos: bool = False, add_eos: bool = False) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both ``LongTensor [B, T]``.

        Sequences are cut to ``max_len`` tokens (from the right) and right-padded with
        ``<pad>``; ``T = max_len`` when ``pad``, else the longest sequence.
        """
        return _pad([self.encode(t, add_bos, add_eos)[:_check_len(max_len)] for t in texts],
                    max_len, pad, self.pad_id)

    # ---------------------------------------------------------------- span masks
    def span_mask(self, text: str, spans: Iterable[tuple[int, int]],
                  add_bos: bool = False, add_eos: bool = False) -> list[bool]:
        """Per token of ``encode(text, add_bos, add_eos)``: does it overlap a char span?

        A token covering ``[a, b)`` is marked when some span ``[s, e)`` has
        ``a < e and s < b``; ``<bos>`` / ``<eos>`` are never marked.
        """
        spans = [(int(s), int(e)) for s, e in spans]
        for s, e in spans:
            if not 0 <= s <= e <= len(text):
                raise ValueError(f"span ({s}, {e}) outside a text of {len(text)} characters")
        _, offsets = self.encode_with_offsets(text)
        mask = [any(a < e and s < b for s, e in spans) for a, b in offsets]
        return ([False] if add_bos else []) + mask + ([False] if add_eos else [])

    def batch_span_mask(self, texts: Sequence[str],
                        spans: Sequence[Iterable[tuple[int, int]]], max_len: int,
                        pad: bool = True, add_bos: bool = False,
                        add_eos: bool = False) -> Tensor:
        """``BoolTensor [B, T]`` of :meth:`span_mask` rows, aligned with
        :meth:`batch_encode` called with the same arguments."""
        if len(texts) != len(spans):
            raise ValueError(f"{len(texts)} texts but {len(spans)} span lists")
        rows = [self.span_mask(t, s, add_bos, add_eos)[:_check_len(max_len)]
                for t, s in zip(texts, spans, strict=True)]
        return _pad([[int(m) for m in r] for r in rows], max_len, pad, 0)[0].bool()



class Tokenizer(TokenEncoder):
    """Word + digit + symbol tokenizer over an ordered vocabulary (see the module doc)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if tuple(vocab[:len(_BASE)]) != _BASE:
            raise ValueError("vocab must start with the base tokens (specials, bytes, ASCII "
                             "characters); build it with Tokenizer.build")
        if len(set(vocab)) != len(vocab):
            dup = next(t for t, c in Counter(vocab).items() if c > 1)
            raise ValueError(f"vocab lists token {dup!r} twice")
        self._vocab = vocab
        self._ids = {t: i for i, t in enumerate(vocab)}
        self._byte_id0 = self._ids[_BYTES[0]]
        self._max_piece = max(len(t) for t in vocab[len(SPECIAL_TOKENS) + 256:])
        self._cache: dict[str, tuple[int, ...]] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_words: int | None = None,
              extra_pieces: Iterable[str] = ()) -> Tokenizer:
        """Vocabulary = base tokens + ``extra_pieces`` + the corpus's letter-run pieces.

        Corpus pieces seen at least ``min_count`` times are kept, the ``max_words`` most
        frequent (ties by the piece) if given. Each extra piece is added as given,
        capitalised, and both with a leading space. The result depends only on the inputs.
        """
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(p for p in _PIECE.findall(text) if p.strip()[:1].isalpha())
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_words is not None:
            words = words[:max_words]
        extra = []
        for piece in extra_pieces:
            for p in (piece, piece.capitalize()):
                extra += [p, " " + p]
        vocab, seen = list(_BASE), set(_BASE)
        for token in extra + words:
            if token not in seen:
                seen.add(token)
                vocab.append(token)
        return cls(vocab)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (embedding rows a model needs)."""
        return len(self._vocab)

    @property
    def vocab(self) -> tuple[str, ...]:
        """The ordered vocabulary: ``vocab[id]`` is the token's text."""
        return tuple(self._vocab)

    pad_id, bos_id, eos_id, unk_id, sep_id = range(5)

    # ---------------------------------------------------------------- encoding
    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        out: list[int] = []
        if piece in self._ids:
            out.append(self._ids[piece])
        else:
            i = 0
            while i < len(piece):
                for j in range(min(len(piece), i + self._max_piece), i, -1):
                    token_id = self._ids.get(piece[i:j])
                    if token_id is not None:
                        out.append(token_id)
                        i = j
                        break
                else:  # a character outside the vocabulary: its UTF-8 bytes
                    out += [self._byte_id0 + b for b in piece[i].encode("utf-8")]
                    i += 1
        ids = self._cache[piece] = tuple(out)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (optionally wrapped in ``<bos>`` / ``<eos>``)."""
        ids = [self.bos_id] if add_bos else []
        for piece in _PIECE.findall(text):
            ids += self._encode_piece(piece)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the ``(start, end)`` character span of ``text`` it covers.

        The byte tokens of one character all cover that character.
        """
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for match in _PIECE.finditer(text):
            piece, pos = match.group(), match.start()
            piece_ids = self._encode_piece(piece)
            k = 0
            while k < len(piece_ids):
                token_id = piece_ids[k]
                if self._byte_id0 <= token_id < self._byte_id0 + 256:
                    width, count = 1, len(text[pos].encode("utf-8"))
                else:
                    width, count = len(self._vocab[token_id]), 1
                ids += piece_ids[k:k + count]
                offsets += [(pos, pos + width)] * count
                k += count
                pos += width
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; specials dropped (or written as their names).

        Byte tokens are joined and decoded as UTF-8 (invalid sequences → U+FFFD).
        """
        out: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < len(self._vocab):
                raise ValueError(f"token id {token_id} outside the vocabulary "
                                 f"(size {len(self._vocab)})")
            if self._byte_id0 <= token_id < self._byte_id0 + 256:
                pending.append(token_id - self._byte_id0)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if token_id < len(SPECIAL_TOKENS):
                if not skip_special:
                    out.append(self._vocab[token_id])
                continue
            out.append(self._vocab[token_id])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, object]:
        """JSON-ready description: format tag, version and the ordered added tokens."""
        return {"format": _FORMAT, "version": _VERSION, "tokens": self._vocab[len(_BASE):]}

    @classmethod
    def from_dict(cls, data: object, where: str = "tokenizer") -> Tokenizer:
        """Inverse of :meth:`to_dict`; ``where`` names the source in errors."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise FormatError(f"{where}: not a {_FORMAT} file (field 'format')")
        if data.get("version") != _VERSION:
            raise FormatError(f"{where}: unsupported version {data.get('version')!r} "
                              f"(field 'version'; this reader knows {_VERSION})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise FormatError(f"{where}: field 'tokens' must be a list of non-empty strings")
        try:
            return cls(list(_BASE) + tokens)
        except ValueError as err:
            raise FormatError(f"{where}: field 'tokens': {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise FormatError(f"{path}: cannot read tokenizer ({err})") from None
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        return cls.from_dict(data, str(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._vocab == other._vocab

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _check_len(max_len: int) -> int:
    if int(max_len) < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return int(max_len)


def _pad(rows: list[list[int]], max_len: int, pad: bool, value: int) -> tuple[Tensor, Tensor]:
    width = max_len if pad else max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask
