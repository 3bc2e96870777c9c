"""``other_entity_answers``: for every question, the answers of the same question about
another entity (a chance control for closed-book F1), in ``encode_documents`` order."""

from __future__ import annotations

from tasks.documents import make_stream, other_entity_answers


def test_control_answers_are_the_same_question_about_another_entity() -> None:
    docs = make_stream("val", 40, seed=3)
    pairs = [(d, qa) for d in docs for qa in d.qa]
    control = other_entity_answers(docs, seed=0)
    assert len(control) == len(pairs)
    templates: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for d, qa in pairs:
        key = qa.question.replace(d.entity_id.split(":", 1)[-1], "{}")
        templates.setdefault(key, set()).add((d.entity_id, qa.answers))
    partnered = 0
    for (d, qa), answers in zip(pairs, control):
        assert answers != qa.answers
        if answers == ("",):
            continue
        partnered += 1
        key = qa.question.replace(d.entity_id.split(":", 1)[-1], "{}")
        assert any(e != d.entity_id and a == answers for e, a in templates[key])
    assert partnered > 0.9 * len(pairs)
    assert other_entity_answers(docs, seed=0) == control
