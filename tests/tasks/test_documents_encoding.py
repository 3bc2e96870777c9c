"""``encode_documents``: documents as ``<bos> text <eos>`` tensors with aligned span masks,
and every question closed-book with its answer mask, tied to its document."""

from __future__ import annotations

from metaopt.text import Tokenizer
from tasks.documents import (
    NAME_SYLLABLES,
    encode_documents,
    entity_documents,
    make_stream,
    vocabulary_texts,
)


def test_documents_questions_and_masks_line_up() -> None:
    tok = Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)
    docs = make_stream("test", 12, seed=4)
    enc = encode_documents(tok, docs, max_len=160)
    assert enc.doc_ids.shape == enc.doc_mask.shape == enc.salient_mask.shape
    assert len(enc.prompts) == len(enc.golds) == enc.qa_ids.shape[0] == sum(len(d.qa) for d in docs)
    for i, d in enumerate(docs):
        n = int(enc.doc_mask[i].sum())
        assert enc.doc_ids[i, 0] == tok.bos_id and enc.doc_ids[i, n - 1] == tok.eos_id
        assert tok.decode(enc.doc_ids[i, :n].tolist()) == d.text
        # the answer-span tokens spell the answers (in document order), inside the salient ones
        assert not bool((enc.answer_span_mask[i] & ~enc.salient_mask[i]).any())
        spelled = tok.decode(enc.doc_ids[i][enc.answer_span_mask[i]].tolist())
        assert all(qa.answer in spelled for qa in d.qa)
    for j, gold in enumerate(enc.golds):
        d = docs[int(enc.qa_doc[j])]
        assert gold[0] in {qa.answer for qa in d.qa}
        answer = tok.decode(enc.qa_ids[j][enc.qa_answer_mask[j]].tolist())
        assert answer == " " + gold[0]
        assert enc.qa_ids[j, :len(enc.prompts[j])].tolist() == enc.prompts[j].tolist()


def test_entity_documents_rewrite_the_same_facts() -> None:
    doc = make_stream("train", 3, seed=1)[2]
    rewrites = entity_documents(doc.entity_id, 6, seed=0)
    assert entity_documents(doc.entity_id, 6, seed=0) == rewrites  # deterministic
    assert len({r.text for r in rewrites}) == 6  # different texts
    facts = {qa.question: qa.answer for qa in doc.qa}
    for r in rewrites:
        assert r.entity_id == doc.entity_id
        for qa in r.qa:
            assert qa.answer in r.text
            if qa.question in facts:  # the same question has the same answer everywhere
                assert facts[qa.question] == qa.answer
