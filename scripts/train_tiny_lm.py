"""Train the CaMeLS base model: a TinyLM pretrained on documents and QA-tuned.

1. Tokenizer: ``Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)``.
2. Pretraining: next-token loss on a corpus of train-split documents only:
   ``make_stream("train", --docs)`` plus, for each of the ``--qa-docs`` entities of
   ``make_qa_tuning_set``, ``--rewrites`` documents about it (``entity_documents``: the
   same facts in fresh phrasings, so they are learnt), mixed with ``locality_corpus``
   text (one locality text per ``--locality-every`` documents in a batch).
3. QA-tuning (the paper's base models are QA-tuned): the answer-token loss of closed-book
   questions ``<bos> question: Q answer: A <eos>`` about the QA-tuning entities (facts
   the model has read in pretraining, never in a QA context), mixed with the pretraining
   loss: the model learns to answer about what it read. Val/test entities are never seen.

AdamW (:mod:`metaopt.optim`) with linear warm-up and cosine decay, seeded; one thread.
Writes ``--out/tokenizer.json`` and ``--out/checkpoint/step_<n>/`` through
:func:`metaopt.runner.base_lm.save_base_lm` (the runner's checkpoint format). With the
defaults: 1000 steps, 582 s on one shared CPU core (the shipped results/camels/tiny_lm)::

    PYTHONPATH=. nice -n 10 python scripts/train_tiny_lm.py --out results/camels/tiny_lm
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import Tensor

from metaopt.algorithms.camels import answer_nll, weighted_lm_loss
from metaopt.algorithms.camels.online_eval import QASet, score_answers
from metaopt.fileio import atomic_write_text
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.optim import adamw, apply_updates
from metaopt.params import Params, functional_call
from metaopt.runner.base_lm import save_base_lm
from metaopt.text import Tokenizer
from tasks.documents import (
    NAME_SYLLABLES,
    encode_documents,
    entity_documents,
    locality_corpus,
    make_qa_tuning_set,
    make_stream,
    vocabulary_texts,
)

MAX_LEN = 160


def lm_loss(model: TinyLM, theta: Params, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token NLL over real tokens."""
    logits = functional_call(model, theta, (ids,), {"attention_mask": mask})
    return weighted_lm_loss(logits, ids, mask.to(logits.dtype), mask)


def qa_loss(model: TinyLM, theta: Params, qa_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Mean NLL of the answer tokens of closed-book QA sequences."""
    logits = functional_call(model, theta, (qa_ids,), {"attention_mask": (qa_ids != 0).long()})
    return answer_nll(logits, qa_ids, answer_mask)


def _trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)
    cfg = TinyLMConfig(vocab_size=tok.vocab_size, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, max_len=MAX_LEN)
    model = TinyLM(cfg)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    entities = make_qa_tuning_set(args.qa_docs, seed=args.seed)
    rewrites = [r for d in entities for r in entity_documents(d.entity_id, args.rewrites,
                                                              seed=args.seed)]
    corpus = make_stream("train", args.docs, seed=args.seed) + entities + rewrites
    docs = encode_documents(tok, corpus, MAX_LEN)
    loc_ids, loc_mask = tok.batch_encode(locality_corpus(args.docs // 4, seed=args.seed),
                                         MAX_LEN, pad=False, add_bos=True, add_eos=True)
    # the QA-tuning questions: every question of every document about the tuning entities
    tuning = encode_documents(tok, entities + rewrites, MAX_LEN)
    total = args.pretrain_steps + args.qa_steps
    opt_state = adamw(args.lr, weight_decay=0.01).init(theta)
    log = []
    t0 = time.perf_counter()
    n_loc = max(1, args.batch // args.locality_every)
    for step in range(1, total + 1):
        pick = [rng.randrange(docs.doc_ids.shape[0]) for _ in range(args.batch - n_loc)]
        ids, mask = _trim(docs.doc_ids[pick], docs.doc_mask[pick])
        lpick = [rng.randrange(loc_ids.shape[0]) for _ in range(n_loc)]
        lids, lmask = _trim(loc_ids[lpick], loc_mask[lpick])
        qa_phase = step > args.pretrain_steps
        th = {k: v.requires_grad_() for k, v in theta.items()}
        loss = lm_loss(model, th, ids, mask) + 0.25 * lm_loss(model, th, lids, lmask)
        parts = {"lm": float(loss.detach())}
        if qa_phase:
            qp = [rng.randrange(tuning.qa_ids.shape[0]) for _ in range(args.batch)]
            qids, qmask = tuning.qa_ids[qp], tuning.qa_answer_mask[qp]
            width = int((qids != 0).sum(1).max())
            qa = qa_loss(model, th, qids[:, :width], qmask[:, :width])
            loss = loss + qa
            parts.update(qa=float(qa.detach()))
        grads = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
        if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            raise FloatingPointError(f"train_tiny_lm: non-finite gradient at step {step}")
        lr = _lr(step, total, args.lr, args.warmup)
        updates, opt_state = adamw(lr, weight_decay=0.01).update(grads, opt_state, th)
        theta = {k: v.detach() for k, v in apply_updates(th, updates).items()}
        if step % 50 == 0 or step == total:
            log.append({"step": step, "lr": lr, **parts,
                        "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.load_state_dict(theta, strict=True)
    return {"model": model, "tokenizer": tok, "log": log,
            "seconds": time.perf_counter() - t0, "tuning": tuning}


@torch.no_grad()
def report(model: TinyLM, tok: Tokenizer, tuning, seed: int) -> dict:
    """Closed-book answer NLL / F1 on QA-tuning questions (seen) and val questions (unseen)."""
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def logits_fn(th: Params, ids: Tensor, mask: Tensor | None) -> Tensor:
        return functional_call(model, th, (ids,), {"attention_mask": mask})

    out = {}
    val = encode_documents(tok, make_stream("val", 60, seed=seed + 1000), MAX_LEN)
    for name, enc in (("qa_tuning", tuning), ("val", val)):
        n = min(200, enc.qa_ids.shape[0])
        qa = QASet(prompts=enc.prompts[:n], golds=enc.golds[:n], qa_ids=enc.qa_ids[:n],
                   answer_mask=enc.qa_answer_mask[:n])
        em, f, _ = score_answers(logits_fn, theta, qa, tok.decode, max_new_tokens=8,
                                 eos_id=tok.eos_id)
        nll = float(answer_nll(logits_fn(theta, qa.qa_ids, None), qa.qa_ids, qa.answer_mask))
        out[name] = {"exact_match": em, "f1": f, "answer_nll": nll, "questions": n}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/camels/tiny_lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--docs", type=int, default=3000, help="pretraining stream documents")
    p.add_argument("--qa-docs", type=int, default=500, help="QA-tuning entities")
    p.add_argument("--rewrites", type=int, default=4,
                   help="extra pretraining documents per QA-tuning entity")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--qa-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--locality-every", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = train(args)
    metrics = report(result["model"], result["tokenizer"], result["tuning"], args.seed)
    training = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    training.update(seconds=round(result["seconds"], 1), final=result["log"][-1],
                    closed_book=metrics)
    path = save_base_lm(args.out, result["model"], result["tokenizer"],
                        step=args.pretrain_steps + args.qa_steps, training=training)
    print(json.dumps({"checkpoint": str(path), "closed_book": metrics,
                      "seconds": round(result["seconds"], 1)}, indent=1))
    atomic_write_text(Path(args.out, "training_log.json"), json.dumps(result["log"], indent=1))


if __name__ == "__main__":
    main()
