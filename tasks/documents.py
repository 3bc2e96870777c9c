"""Streams of short documents about fictional entities, with questions about their facts
(the offline data of CaMeLS-style online adaptation).

The world
    An entity is a person, a company, a town or an invention with a name built from
    syllables (:data:`NAME_SYLLABLES`). Its attribute values (birth year, home city,
    founder, number of employees, ...) are drawn from pools by a generator seeded with the
    entity's id, so an entity has the same facts in every stream that mentions it.

Splits
    An entity belongs to ``train``, ``val`` or ``test`` by a stable hash (CRC-32) of the
    first word of its name: 80 / 10 / 10 % of first words. Streams of different splits
    never share an entity (nor a first name), whatever the seeds; names are drawn directly
    among the split's first words.

Documents
    :func:`make_stream` writes one document per distinct entity: 3 or more of its
    attributes, each in one of several phrasings, in random order, mixed with 1–3
    distractor sentences that state nothing. Each stated attribute gets one question whose
    answer is the value's exact text in the document. ``salient_spans`` are the character
    spans of every entity name and value; ``answer_spans`` those of the answers (an
    "oracle" weighting puts weight only there).

Other texts
    :func:`make_qa_tuning_set` — train-split documents from a stream of their own (for
    teaching a base model the QA format) and :func:`qa_tuning_examples`, their questions
    as ``"question: ... answer: ..."`` texts; :func:`locality_corpus` — generic sentences
    about nothing in the world, for a locality (KL) term; :func:`vocabulary_texts` — every
    word the generator can write except names, for building a tokenizer.

Deterministic in its arguments; standard library only (``random.Random`` seeded with
strings); :func:`span_token_masks` (torch) turns spans into token masks. About two
thousand documents a second on one CPU core.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from metaopt.text import QA_ANSWER, QA_QUESTION, TokenEncoder, batch_encode_qa, qa_prompt_ids

__all__ = [
    "NAME_SYLLABLES",
    "SPLITS",
    "Document",
    "EncodedDocuments",
    "QAPair",
    "Span",
    "encode_documents",
    "entity_documents",
    "entity_split",
    "heuristic_salient_spans",
    "locality_corpus",
    "make_qa_tuning_set",
    "make_stream",
    "other_entity_answers",
    "qa_tuning_examples",
    "span_token_masks",
    "vocabulary_texts",
]

Span = tuple[int, int]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class QAPair:
    """A question with its answer; ``alternatives`` are further accepted answers."""

    question: str
    answer: str
    alternatives: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """Every gold answer, the main one first."""
        return (self.answer, *self.alternatives)


@dataclass(frozen=True)
class Document:
    """A document, the questions it answers and where its important words are.

    ``salient_spans`` / ``answer_spans`` are ``(start, end)`` character spans of ``text``
    (end exclusive), sorted; ``Tokenizer.span_mask`` turns them into token masks.
    """

    text: str
    qa: tuple[QAPair, ...]
    entity_id: str
    salient_spans: tuple[Span, ...] = ()
    answer_spans: tuple[Span, ...] = ()


# ---------------------------------------------------------------------- the pools
NAME_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sel", "da", "bri", "no", "quo", "zan", "fel",
    "mar", "ith", "ul", "gor", "pe", "sha", "ten", "vi", "ro", "lin", "ber", "dro", "cas",
    "el", "jo", "wen", "ny", "tha", "mor", "kel", "ar", "is", "ov", "hal", "dun", "fi", "sa",
)
_TOWN_ENDINGS = ("ford", "ton", "dale", "mere", "wick", "by", "stead")
_COMPANY_ENDINGS = ("Industries", "Labs", "Works", "Foods", "Motors", "Textiles", "Systems")
_DEVICES = ("engine", "loom", "lantern", "compass", "press", "pump", "clock", "kite")
_CITIES = tuple(f"{a.capitalize()}{b}{c}" for a, b, c in (
    ("ka", "ro", "ford"), ("mi", "lin", "ton"), ("ven", "da", "mere"), ("bri", "sel", "by"),
    ("zan", "ith", "dale"), ("fel", "no", "wick"), ("mar", "pe", "stead"), ("gor", "ul", "ton"),
    ("sha", "ten", "ford"), ("ro", "vi", "by"), ("cas", "el", "mere"), ("jo", "wen", "dale"),
    ("tha", "mor", "wick"), ("kel", "ar", "ton"), ("hal", "dun", "ford"), ("sa", "fi", "by"),
    ("lo", "ber", "stead"), ("dro", "is", "ton"), ("ny", "ov", "mere"), ("quo", "ra", "dale"),
))
_RIVERS = tuple(f"{s.capitalize()}{t} River" for s, t in (
    ("ar", "no"), ("vi", "sel"), ("dun", "ra"), ("mor", "ith"), ("el", "ven"), ("ka", "lin"),
    ("tor", "is"), ("sha", "ber"), ("fel", "da"), ("ro", "wen"),
))
_OCCUPATIONS = (
    "baker", "carpenter", "astronomer", "violinist", "chemist", "gardener", "pilot",
    "librarian", "architect", "engineer", "nurse", "painter", "fisherman", "teacher",
    "tailor", "surveyor", "jeweller", "potter", "mapmaker", "beekeeper", "clockmaker",
    "translator", "veterinarian", "shipbuilder",
)
_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "silver", "gold", "white",
            "black", "brown", "grey", "pink", "teal")
_INSTRUMENTS = ("piano", "violin", "cello", "flute", "trumpet", "harp", "guitar", "drums",
                "clarinet", "accordion", "oboe", "banjo")
_PRODUCTS = ("bicycles", "umbrellas", "solar panels", "garden tools", "paper lanterns",
             "wooden toys", "rope", "glass bottles", "printed maps", "wool blankets",
             "kitchen knives", "telescopes", "canned soup", "leather boots", "radios",
             "sailing boats", "chocolate", "pencils", "tea", "water pumps")
_KNOWN_FOR = ("its cheese market", "a stone bridge", "an old lighthouse", "its apple orchards",
              "a summer music festival", "a glass museum", "its salt mines",
              "a clock tower", "its horse races", "a botanical garden", "its painted doors",
              "an annual kite contest")
_MATERIALS = ("brass", "copper", "oak", "glass", "iron", "bamboo", "steel", "walnut",
              "tin", "bronze", "cork", "clay")
_PURPOSES = ("grinding grain", "measuring rainfall", "sorting letters", "lifting water",
             "weaving carpets", "signalling ships", "drying fruit", "counting coins",
             "cooling rooms", "mixing paint", "pressing olives", "keeping time at sea")


def _name(rng: random.Random, low: int, high: int) -> str:
    k = low + int(rng.random() * (high - low + 1))
    n = len(NAME_SYLLABLES)
    return "".join(NAME_SYLLABLES[int(rng.random() * n)] for _ in range(k)).capitalize()


def _bucket(word: str) -> str:
    """The split of a name's first word: CRC-32 mod 10 → 0–7 train, 8 val, 9 test."""
    bucket = zlib.crc32(word.encode("utf-8")) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def _first_word(kind: str, split: str, rng: random.Random) -> str:
    """A name's first word whose split is ``split`` (uniform among those, by rejection)."""
    while True:
        if kind == "town":
            word = _name(rng, 2, 2) + rng.choice(_TOWN_ENDINGS)
            if word in _CITIES:
                continue
        else:
            word = _name(rng, 2, 2 if kind == "person" else 3)
        if _bucket(word) == split:
            return word


def _entity_name(kind: str, split: str, rng: random.Random) -> str:
    first = _first_word(kind, split, rng)
    if kind == "person":
        return f"{first} {_name(rng, 2, 3)}"
    if kind == "company":
        return f"{first} {rng.choice(_COMPANY_ENDINGS)}"
    if kind == "invention":
        return f"{first} {rng.choice(_DEVICES)}"
    return first


# A fact is a function of a 64-bit hash of the entity id: the same entity has the
# same facts in every stream, and drawing them needs no generator.
def _hashes(key: str, count: int) -> list[int]:
    """``count`` (<= 8) independent 64-bit integers from one BLAKE2b digest of ``key``."""
    digest = hashlib.blake2b(key.encode("utf-8")).digest()
    return [int.from_bytes(digest[8 * i:8 * i + 8], "big") for i in range(count)]


def _hashed_name(h: int, parts: int) -> str:
    n = len(NAME_SYLLABLES)
    out = []
    for _ in range(parts):
        out.append(NAME_SYLLABLES[h % n])
        h //= n
    return "".join(out).capitalize()


def _person(h: int) -> str:
    return f"{_hashed_name(h, 2)} {_hashed_name(h >> 20, 2 + (h >> 63))}"


# attribute -> (value sampler, statement templates, question templates).
# {n} = the entity name, {v} = the value, {a} = "a"/"an" before the value.
_Attr = tuple[Callable[[int], str], tuple[str, ...], tuple[str, ...]]


def _number(low: int, high: int) -> Callable[[int], str]:
    return lambda h: str(low + h % (high - low + 1))


def _pool(values: Sequence[str]) -> Callable[[int], str]:
    return lambda h: values[h % len(values)]


_ATTRIBUTES: dict[str, dict[str, _Attr]] = {
    "person": {
        "birth_year": (_number(1901, 2005), (
            "{n} was born in {v}.", "Born in {v}, {n} grew up far from the coast.",
            "The records show that {n} was born in the year {v}.", "{n}'s birth year is {v}."),
            ("In what year was {n} born?", "When was {n} born?")),
        "home_city": (_pool(_CITIES), (
            "{n} lives in {v}.", "{n} has made a home in {v}.",
            "These days {n} lives in the city of {v}.", "The home of {n} is in {v}."),
            ("In which city does {n} live?", "Where does {n} live?")),
        "occupation": (_pool(_OCCUPATIONS), (
            "{n} works as {a} {v}.", "By profession, {n} is {a} {v}.",
            "{n} earns a living as {a} {v}."),
            ("What is {n}'s occupation?", "What does {n} do for a living?")),
        "colour": (_pool(_COLOURS), (
            "{n}'s favourite colour is {v}.", "{n} likes the colour {v} more than any other.",
            "Asked about colours, {n} always names {v}."),
            ("What is {n}'s favourite colour?", "Which colour does {n} like best?")),
        "instrument": (_pool(_INSTRUMENTS), (
            "{n} plays the {v}.", "In the evenings {n} practises the {v}.",
            "{n} has played the {v} since childhood."),
            ("Which instrument does {n} play?", "What instrument does {n} play?")),
    },
    "company": {
        "founded": (_number(1850, 2020), (
            "{n} was founded in {v}.", "Since {v}, {n} has been in business.",
            "{n} opened its doors in {v}."),
            ("When was {n} founded?", "In what year was {n} founded?")),
        "founder": (_person, (
            "{n} was founded by {v}.", "{v} started {n}.", "The founder of {n} is {v}."),
            ("Who founded {n}?", "Who is the founder of {n}?")),
        "headquarters": (_pool(_CITIES), (
            "{n} is based in {v}.", "The headquarters of {n} are in {v}.",
            "{n} runs its business from offices in {v}."),
            ("Where is {n} based?", "In which city are the headquarters of {n}?")),
        "employees": (_number(12, 48000), (
            "{n} employs {v} people.", "There are {v} people working at {n}.",
            "The staff of {n} numbers {v}."),
            ("How many people does {n} employ?", "How many employees does {n} have?")),
        "product": (_pool(_PRODUCTS), (
            "{n} makes {v}.", "{n} is best known for its {v}.",
            "The main product of {n} is {v}."),
            ("What does {n} make?", "What is the main product of {n}?")),
    },
    "town": {
        "population": (_number(300, 900000), (
            "{n} has a population of {v}.", "About {v} people live in {n}.",
            "The population of {n} is {v}."),
            ("What is the population of {n}?", "How many people live in {n}?")),
        "river": (_pool(_RIVERS), (
            "{n} lies on the {v}.", "The {v} flows through {n}.",
            "{n} was built on the banks of the {v}."),
            ("Which river flows through {n}?", "On which river does {n} lie?")),
        "founded": (_number(1100, 1950), (
            "{n} was founded in {v}.", "The first houses of {n} were built in {v}.",
            "{n} dates back to {v}."),
            ("When was {n} founded?", "In what year was {n} founded?")),
        "mayor": (_person, (
            "The mayor of {n} is {v}.", "{v} serves as the mayor of {n}.",
            "{n} is governed by its mayor, {v}."),
            ("Who is the mayor of {n}?", "Who serves as the mayor of {n}?")),
        "known_for": (_pool(_KNOWN_FOR), (
            "{n} is famous for {v}.", "Visitors come to {n} for {v}.",
            "{n} is known across the region for {v}."),
            ("What is {n} famous for?", "What is {n} known for?")),
    },
    "invention": {
        "inventor": (_person, (
            "The {n} was invented by {v}.", "{v} invented the {n}.",
            "The inventor of the {n} was {v}."),
            ("Who invented the {n}?", "Who was the inventor of the {n}?")),
        "year": (_number(1700, 2015), (
            "The {n} was first built in {v}.", "The first {n} appeared in {v}.",
            "In {v}, the {n} was built for the first time."),
            ("When was the {n} first built?", "In what year was the {n} first built?")),
        "material": (_pool(_MATERIALS), (
            "The {n} is made of {v}.", "Most of the {n} is built from {v}.",
            "Its makers build the {n} out of {v}."),
            ("What is the {n} made of?", "Which material is the {n} made of?")),
        "colour": (_pool(_COLOURS), (
            "The {n} is usually painted {v}.", "Most examples of the {n} are {v}.",
            "The {n} comes in {v}."),
            ("What colour is the {n}?", "What colour is the {n} usually painted?")),
        "purpose": (_pool(_PURPOSES), (
            "The {n} is used for {v}.", "People use the {n} for {v}.",
            "The {n} was designed for {v}."),
            ("What is the {n} used for?", "What was the {n} designed for?")),
    },
}
_KINDS = tuple(_ATTRIBUTES)
_MIN_FACTS = 3

_DISTRACTORS = (
    "Little else is written about {t}{n}.", "Some of the old letters about {t}{n} have been lost.",
    "Many stories are told about {t}{n}, and not all of them are true.",
    "The weather that year was unusually mild.", "Local newspapers covered the story at length.",
    "A small museum keeps several photographs from that time.",
    "Nobody is quite sure how the story began.", "The next page of the record is missing.",
    "Several neighbours remember those days well.", "People still talk about {t}{n} now and then.",
)

# Locality text: generic sentences about nothing in the world of entities.
_LOCALITY = (
    "The {thing} on the {place} was {adj} after the rain.",
    "{People} often {act} before breakfast.", "Most {people} prefer {food} in the {season}.",
    "A {adj} {thing} stood near the {place}.", "In the {season} the {place} is {adj}.",
    "{People} rarely {act} when it is {weather}.",
    "It was {weather} all day, so the {people} stayed near the {place}.",
    "The {people} ate {food} and talked about the {thing}.",
)
_LOCALITY_WORDS = {
    "thing": ("chair", "bucket", "ladder", "basket", "lamp", "fence", "bench", "window"),
    "place": ("hill", "porch", "market", "harbour", "meadow", "road", "square", "shore"),
    "adj": ("wet", "quiet", "bright", "crowded", "empty", "old", "cold", "warm"),
    "people": ("children", "farmers", "travellers", "students", "sailors", "cooks"),
    "act": ("sing", "walk", "read", "sweep the floor", "write letters", "feed the birds"),
    "food": ("soup", "bread", "apples", "rice", "porridge", "fish"),
    "season": ("spring", "summer", "autumn", "winter"),
    "weather": ("windy", "foggy", "raining", "very hot", "snowing"),
}

_SLOT = re.compile(r"\{(\w+)\}")


@cache
def _parts(template: str) -> tuple[str, ...]:
    """``"a {n} b"`` → ``("a ", "n", " b")``: literals at even, slot names at odd places."""
    return tuple(_SLOT.split(template))


def _fill(template: str, slots: dict[str, str], offset: int,
          spans: dict[str, list[Span]]) -> str:
    """Fill ``template``; append the spans (shifted by ``offset``) of slots named in
    ``spans`` to their lists."""
    out: list[str] = []
    pos = offset
    for i, part in enumerate(_parts(template)):
        text = slots[part] if i % 2 else part
        if i % 2 and part in spans:
            spans[part].append((pos, pos + len(text)))
        out.append(text)
        pos += len(text)
    return "".join(out)


def _capitalise_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------- entities and splits
def entity_split(entity_id: str) -> str:
    """The split of an entity ``"kind:Name ..."``: a stable hash (CRC-32) of the first word
    of its name, mod 10 → 0–7 train, 8 val, 9 test."""
    return _bucket(entity_id.partition(":")[2].split(" ")[0])


def _entity_facts(kind: str, entity_id: str) -> dict[str, str]:
    attrs = _ATTRIBUTES[kind]
    return {attr: sampler(h) for (attr, (sampler, _, _)), h
            in zip(attrs.items(), _hashes(f"facts/{entity_id}", len(attrs)), strict=True)}


def _document(kind: str, name: str, entity_id: str, rng: random.Random) -> Document:
    facts = _entity_facts(kind, entity_id)
    attrs = list(facts)
    rng.shuffle(attrs)
    stated = attrs[:rng.randint(_MIN_FACTS, len(attrs))]
    sentences: list[tuple[str, str | None]] = [
        (rng.choice(_ATTRIBUTES[kind][a][1]), a) for a in stated]
    for distractor in rng.sample(_DISTRACTORS, rng.randint(1, 3)):
        sentences.insert(rng.randint(0, len(sentences)), (distractor, None))
    pieces: list[str] = []
    salient: list[Span] = []
    answers: list[Span] = []
    pos = 0
    for template, attr in sentences:
        value = facts[attr] if attr is not None else ""
        slots = {"n": name, "v": value, "a": "an" if value[:1] in "aeiou" else "a",
                 "t": "the " if kind == "invention" else ""}
        spans: dict[str, list[Span]] = {"n": [], "v": []}
        pieces.append(_fill(template, slots, pos, spans))
        pos += len(pieces[-1]) + 1  # the joining space
        salient += spans["n"] + spans["v"]
        answers += spans["v"]
    qa = tuple(QAPair(_fill(rng.choice(_ATTRIBUTES[kind][a][2]), {"n": name}, 0, {}),
                      facts[a]) for a in stated)
    return Document(text=" ".join(pieces), qa=qa, entity_id=entity_id,
                    salient_spans=tuple(sorted(salient)), answer_spans=tuple(sorted(answers)))


def _stream(purpose: str, split: str, n_documents: int, seed: int) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    rng = random.Random(f"{purpose}/{split}/{int(seed)}")
    seen: set[str] = set()
    docs: list[Document] = []
    while len(docs) < n_documents:
        kind = rng.choice(_KINDS)
        name = _entity_name(kind, split, rng)
        entity_id = f"{kind}:{name}"
        if entity_id in seen:
            continue
        seen.add(entity_id)
        docs.append(_document(kind, name, entity_id, rng))
    return docs


def make_stream(split: str, n_documents: int, seed: int = 0) -> list[Document]:
    """``n_documents`` documents about distinct entities of ``split`` (see the module doc)."""
    return _stream("stream", split, n_documents, seed)


def entity_documents(entity_id: str, n_documents: int, seed: int = 0) -> list[Document]:
    """``n_documents`` further documents about one entity ``"kind:Name"`` (any split).

    The facts are the entity's own (the same in every stream); each document states a
    fresh random subset of them in fresh phrasings, with fresh distractors — the
    rewrites a pretraining corpus needs for facts to be learnt, not one sentence.
    """
    kind, _, name = entity_id.partition(":")
    if kind not in _ATTRIBUTES or not name:
        raise ValueError(f"entity_id must be 'kind:Name' with kind in {_KINDS}, got "
                         f"{entity_id!r}")
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    return [_document(kind, name, entity_id, random.Random(f"rewrite/{entity_id}/{seed}/{i}"))
            for i in range(n_documents)]


def make_qa_tuning_set(n_documents: int, seed: int = 0) -> list[Document]:
    """Train-split documents for teaching a base model the QA format.

    Drawn from a stream of their own, so they are not the documents of
    ``make_stream("train", ..., seed)`` (an entity may appear in both, with the same facts).
    """
    return _stream("qa_tuning", "train", n_documents, seed)


def qa_tuning_examples(n_examples: int, seed: int = 0) -> list[str]:
    """``n_examples`` texts ``"question: {q} answer: {a}"`` about train-split entities.

    Questions of :func:`make_qa_tuning_set` documents, in order; the same format as
    :func:`metaopt.text.encode_qa` writes (without the special tokens).
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    out: list[str] = []
    n_docs = max(1, n_examples // _MIN_FACTS + 1)
    while len(out) < n_examples:
        out = [QA_QUESTION + qa.question + QA_ANSWER + " " + qa.answer
               for doc in make_qa_tuning_set(n_docs, seed) for qa in doc.qa]
        n_docs *= 2
    return out[:n_examples]


def span_token_masks(tokenizer: TokenEncoder, documents: Sequence[Document], max_len: int,
                     spans: str = "salient", pad: bool = True, add_bos: bool = False,
                     add_eos: bool = False) -> Tensor:
    """``BoolTensor [B, T]``: tokens of each document's text overlapping its ``salient`` or
    ``answer`` spans, aligned with ``tokenizer.batch_encode`` of the texts (same args)."""
    if spans not in ("salient", "answer"):
        raise ValueError(f"spans must be 'salient' or 'answer', got {spans!r}")
    return tokenizer.batch_span_mask([d.text for d in documents],
                                     [getattr(d, f"{spans}_spans") for d in documents],
                                     max_len, pad=pad, add_bos=add_bos, add_eos=add_eos)


@dataclass(frozen=True)
class EncodedDocuments:
    """Documents and their questions as token tensors (see :func:`encode_documents`).

    Attributes:
        doc_ids, doc_mask: ``(D, T)`` ``<bos> text <eos>``, right-padded; ``doc_mask`` 1 on
            real tokens.
        salient_mask, answer_span_mask: ``(D, T)`` bool, tokens overlapping the documents'
            salient spans (names, values) / answer spans.
        qa_ids, qa_answer_mask: ``(M, Tq)`` closed-book ``<bos> question: Q answer: A
            <eos>`` sequences of all M questions and the mask of their answer tokens.
        qa_doc: ``(M,)`` the document each question is about.
        prompts: the M generation prompts ``<bos> question: Q answer:`` (1-D long).
        golds: the M gold answer lists.
    """

    doc_ids: Tensor
    doc_mask: Tensor
    salient_mask: Tensor
    answer_span_mask: Tensor
    qa_ids: Tensor
    qa_answer_mask: Tensor
    qa_doc: Tensor
    prompts: tuple[Tensor, ...]
    golds: tuple[tuple[str, ...], ...]


def encode_documents(tokenizer: TokenEncoder, documents: Sequence[Document], max_len: int,
                     qa_max_len: int = 40) -> EncodedDocuments:
    """Token tensors of ``documents`` and of their questions (closed book, no context).

    Documents are ``<bos> text <eos>`` cut to ``max_len`` tokens; a question whose answer
    span was cut off is still included (the model must then know it otherwise).
    """
    if not documents:
        raise ValueError("documents is empty")
    texts = [d.text for d in documents]
    doc_ids, doc_mask = tokenizer.batch_encode(texts, max_len, pad=False, add_bos=True,
                                               add_eos=True)
    masks = [span_token_masks(tokenizer, documents, max_len, spans=kind, pad=False,
                              add_bos=True, add_eos=True) for kind in ("salient", "answer")]
    pairs = [(i, qa) for i, d in enumerate(documents) for qa in d.qa]
    qa_ids, _, qa_answer_mask = batch_encode_qa(tokenizer, [qa.question for _, qa in pairs],
                                                [qa.answer for _, qa in pairs], qa_max_len,
                                                pad=False)
    prompts = tuple(torch.tensor(qa_prompt_ids(tokenizer, qa.question), dtype=torch.long)
                    for _, qa in pairs)
    return EncodedDocuments(doc_ids=doc_ids, doc_mask=doc_mask, salient_mask=masks[0],
                            answer_span_mask=masks[1], qa_ids=qa_ids,
                            qa_answer_mask=qa_answer_mask,
                            qa_doc=torch.tensor([i for i, _ in pairs], dtype=torch.long),
                            prompts=prompts, golds=tuple(qa.answers for _, qa in pairs))


def other_entity_answers(documents: Sequence[Document], seed: int = 0
                         ) -> tuple[tuple[str, ...], ...]:
    """For every question (in :func:`encode_documents` order), the answers of the same
    question asked about another entity of ``documents`` whose answer differs: a chance
    control. F1 against these measures what a model answers regardless of the entity
    (the stream's common values); F1 against the true answers minus it is the recall
    specific to the entity. A question with no such partner gets ``("",)`` (F1 0).
    """
    pairs = [(d, qa) for d in documents for qa in d.qa]

    def template(d: Document, qa: QAPair) -> str:
        return qa.question.replace(d.entity_id.split(":", 1)[-1], "{}")

    by_template: dict[str, list[int]] = {}
    for i, (d, qa) in enumerate(pairs):
        by_template.setdefault(template(d, qa), []).append(i)
    rng = random.Random(seed)
    out = []
    for d, qa in pairs:
        partners = [j for j in by_template[template(d, qa)]
                    if pairs[j][0].entity_id != d.entity_id
                    and pairs[j][1].answers != qa.answers]
        out.append(pairs[rng.choice(partners)][1].answers if partners else ("",))
    return tuple(out)


def locality_corpus(n_texts: int, seed: int = 0, sentences: tuple[int, int] = (3, 6)
                    ) -> list[str]:
    """``n_texts`` short texts of generic sentences that mention no entity or fact.

    Each text has between ``sentences[0]`` and ``sentences[1]`` sentences.
    """
    low, high = sentences
    if n_texts < 0 or not 1 <= low <= high:
        raise ValueError(f"need n_texts >= 0 and 1 <= sentences[0] <= sentences[1]; got "
                         f"n_texts={n_texts}, sentences={sentences}")
    rng = random.Random(f"locality/{int(seed)}")
    texts = []
    for _ in range(n_texts):
        out = []
        for _ in range(rng.randint(low, high)):
            template = rng.choice(_LOCALITY)
            slots = {k.lower(): rng.choice(v) for k, v in _LOCALITY_WORDS.items()}
            slots.update({k.capitalize(): v.capitalize() for k, v in slots.items()})
            out.append(_capitalise_first(_fill(template, slots, 0, {})))
        texts.append(" ".join(out))
    return texts


def vocabulary_texts() -> list[str]:
    """Every template, value and generic word the generator writes (names excepted), plus
    the QA prompt words: a corpus for ``Tokenizer.build`` (with
    ``extra_pieces=NAME_SYLLABLES`` for the names)."""
    texts = [QA_QUESTION + QA_ANSWER, " ".join(_TOWN_ENDINGS + _COMPANY_ENDINGS + _DEVICES)]
    for attrs in _ATTRIBUTES.values():
        for _, statements, questions in attrs.values():
            texts += [_SLOT.sub("", t) for t in statements + questions]
    texts += [_SLOT.sub("", t) for t in _DISTRACTORS + _LOCALITY]
    # inside a document a sentence-initial word follows a space (" Born", " Visitors"),
    # and a value may open a sentence or a text with or without one
    texts += [" " + t for t in texts]
    for pool in (_CITIES, _RIVERS, _OCCUPATIONS, _COLOURS, _INSTRUMENTS, _PRODUCTS, _KNOWN_FOR,
                 _MATERIALS, _PURPOSES, *_LOCALITY_WORDS.values()):
        texts += [w for v in pool for w in (v, " " + v, v.capitalize(), " " + v.capitalize())]
    texts += [" an a The An A"]
    return texts


# ---------------------------------------------------------------------- user data
_CAP_RUN = re.compile(r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*")
_NUMBER = re.compile(r"\d(?:[\d,.]*\d)?")


def heuristic_salient_spans(text: str) -> tuple[Span, ...]:
    """Spans of numbers and of runs of Capitalised words — a cheap stand-in for a named-
    entity tagger, for documents that come without salient spans.

    A single capitalised word at the start of a sentence is skipped (it is usually just
    capitalised); a run of two or more there is kept.
    """
    spans = [m.span() for m in _NUMBER.finditer(text)]
    for m in _CAP_RUN.finditer(text):
        if m.start() > 0 and text[m.start() - 1].isalnum():
            continue  # inside a word
        before = text[max(0, m.start() - 16):m.start()].rstrip(" \t\"'(")
        sentence_start = m.start() == 0 or (before[-1:] or ".") in ".!?\n"
        if sentence_start and " " not in m.group():
            continue
        spans.append(m.span())
    return tuple(sorted(spans))
