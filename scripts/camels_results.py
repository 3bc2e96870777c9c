"""CaMeLS against uniform, TF-IDF, salient-span and oracle token weights on held-out entities.

Needs the base model (``scripts/train_tiny_lm.py --out results/camels/tiny_lm``).

1. Meta-train the CaMeLS weighting model through the runner (``configs/camels.yaml``,
   ``metaopt.runner.loop.train``) once per meta-training seed, into
   ``--out/runs/seed<k>`` (an existing finished run is reused, not retrained).
2. For every weighting, sweep the Adam learning rate of online adaptation on
   validation streams (val-split entities) and keep the best by F1 (ties: answer NLL).
3. On ``--test-streams`` test streams (entity-disjoint test split, ``--test-docs``
   documents each, a different seed each; stream k is paired with CaMeLS seed
   ``k % len(seeds)``), stream every weighting at its lr and measure EM / F1 of greedy
   closed-book answers to all questions of the stream, answer NLL before/after, and
   forgetting (locality-text NLL after − before); also the F1 of the same answers
   against another entity's answer to the same question (``f1_other_entity``,
   :func:`tasks.documents.other_entity_answers`: what is answered whatever the entity),
   the entity-specific F1 (F1 − that), and F1 − uniform's F1 on the same stream
   (paired). Steps 2–3 run twice: on ``--test-docs``-document streams (the issue's
   "hundreds of documents") and on ``--short-docs``-document streams (a diagnostic:
   there the tiny base model still retains what it read; its lr swept on short val
   streams).
4. Write ``--out/results.json``, ``--out/results.md`` (mean ± std over test streams) and
   ``--out/token_weights.png`` (CaMeLS weights over a few test documents).

Weightings (per real token of a document): ``none`` 0 (no adaptation: the base model's
own answers, the reference row); ``uniform`` 1; ``tfidf`` the token's
inverse document frequency over the meta-training pool; ``salient`` 1 on entity
names, numbers and attribute values (the generator's salient spans), else 0;
``oracle`` 1 on the tokens of the answers' spans only, else 0; ``camels`` the
meta-learned weights. One thread, deterministic::

    PYTHONPATH=. nice -n 10 python scripts/camels_results.py --out results/camels
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from metaopt.algorithms.camels import idf_weights, inverse_document_frequency, uniform_weights
from metaopt.algorithms.camels.online_eval import span_weights
from metaopt.fileio import atomic_write_text
from metaopt.runner.checkpoint import latest_checkpoint, read_checkpoint
from metaopt.runner.config import load_run_config
from metaopt.runner.experiments.camels import MAX_LEN, CamelsExperiment, online_metrics
from metaopt.runner.loop import build_experiment, load_into, train
from metaopt.runner.rundir import create_run_dir
from tasks.documents import (
    EncodedDocuments,
    encode_documents,
    locality_corpus,
    make_stream,
    other_entity_answers,
)

METHODS = ("uniform", "tfidf", "salient", "oracle", "camels")
#: The reference row: the base model without streaming (zero weights: Adam's update is 0).
NO_ADAPTATION = "none"
#: Seeds of the streams this script draws (apart from the experiment's own).
VAL_SEED, TEST_SEED, LOC_SEED = 20_000, 30_000, 40_000
#: Offset of the short streams' seeds (disjoint from the long streams').
SHORT = 5_000

WeightFn = Callable[[EncodedDocuments], Tensor]


def meta_train(config: str, out: Path, seed: int, steps: int) -> CamelsExperiment:
    """The CaMeLS experiment of ``seed`` after ``steps`` outer steps (trained if needed)."""
    cfg = load_run_config(config, [f"seed={seed}", f"steps={steps}"])
    run = out / "runs" / f"seed{seed}"
    ckpt = latest_checkpoint(run / "checkpoints") if run.exists() else None
    if ckpt is None or read_checkpoint(ckpt).step != steps:
        if not run.exists():
            create_run_dir(run, cfg, ["scripts/camels_results.py"])
        t0 = time.perf_counter()
        train(cfg, run, resume=ckpt, progress=True)
        print(f"meta-trained seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
        ckpt = latest_checkpoint(run / "checkpoints")
    exp = build_experiment(cfg)
    load_into(exp, cfg, ckpt)
    return exp


def weight_fns(exp: CamelsExperiment) -> dict[str, WeightFn]:
    """The five weightings; TF-IDF's idf comes from the meta-training pool."""
    V = exp.base.config.vocab_size
    idf = inverse_document_frequency(exp.pool.doc_ids, exp.pool.doc_mask, V)
    weighting = exp.trained_weighting()

    @torch.no_grad()
    def camels(enc: EncodedDocuments) -> Tensor:
        return weighting(enc.doc_ids, enc.doc_mask)

    return {
        "uniform": lambda enc: uniform_weights(enc.doc_mask),
        "tfidf": lambda enc: idf_weights(enc.doc_ids, enc.doc_mask, idf),
        "salient": lambda enc: span_weights(enc.salient_mask, enc.doc_mask),
        "oracle": lambda enc: span_weights(enc.answer_span_mask, enc.doc_mask),
        "camels": camels,
    }


def stream(exp: CamelsExperiment, split: str, docs: int, seed: int) -> tuple:
    """A stream's encoded documents, locality text and other-entity control answers."""
    tok = exp.tokenizer
    documents = make_stream(split, docs, seed=seed)
    enc = encode_documents(tok, documents, MAX_LEN)
    lids, lmask = tok.batch_encode(locality_corpus(32, seed=LOC_SEED + seed), MAX_LEN,
                                   pad=False, add_bos=True, add_eos=True)
    return enc, lids, lmask, other_entity_answers(documents, seed=seed)


def score(exp: CamelsExperiment, fn: WeightFn, data: tuple, lr: float) -> dict[str, float]:
    enc, lids, lmask, control = data
    m = online_metrics(exp.camels, exp.tokenizer, enc, fn(enc), lids, lmask, lr=lr,
                       control_golds=control)
    m["f1_entity_specific"] = m["f1"] - m["f1_other_entity"]
    return m


def sweep(exp: CamelsExperiment, fns: dict[str, WeightFn], lrs: list[float], docs: int,
          streams: int, offset: int = 0) -> dict[str, dict]:
    """Best lr per weighting on ``streams`` validation streams (mean F1, then NLL)."""
    vals = [stream(exp, "val", docs, VAL_SEED + offset + i) for i in range(streams)]
    out = {}
    for name, fn in fns.items():
        rows = []
        for lr in lrs:
            ms = [score(exp, fn, v, lr) for v in vals]
            rows.append({"lr": lr, "f1": statistics.mean(m["f1"] for m in ms),
                         "answer_nll": statistics.mean(m["answer_nll"] for m in ms)})
            print(f"  val {name:8s} lr={lr:g}  f1={rows[-1]['f1']:.4f}  "
                  f"nll={rows[-1]['answer_nll']:.3f}", flush=True)
        best = max(rows, key=lambda r: (round(r["f1"], 6), -r["answer_nll"]))
        out[name] = {"best_lr": best["lr"], "grid": rows}
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plot_weights(exp: CamelsExperiment, path: Path, n_docs: int = 4) -> None:
    """Tokens of a few test documents coloured by their CaMeLS weight (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    tok = exp.tokenizer
    enc = encode_documents(tok, make_stream("test", n_docs, seed=TEST_SEED + 99), MAX_LEN)
    with torch.no_grad():
        w = exp.trained_weighting()(enc.doc_ids, enc.doc_mask)
    top = float(w.max())
    cmap = colormaps["viridis"]
    per_line, char_w, line_h = 150, 5.45 / (0.98 * 12 * 72), 0.055
    lines: list[list[tuple[str, float]]] = []
    for i in range(n_docs):
        row: list[tuple[str, float]] = []
        used = 0
        n = int(enc.doc_mask[i].sum())
        for j in range(1, n - 1):  # skip <bos>, <eos>
            piece = tok.decode([int(enc.doc_ids[i, j])])
            if used + len(piece) > per_line:
                lines.append(row)
                row, used = [], 0
                piece = piece.lstrip()
            row.append((piece, float(w[i, j])))
            used += len(piece)
        lines.append(row)
        lines.append([])
    fig = plt.figure(figsize=(12, 0.32 * len(lines) + 0.8))
    ax = fig.add_axes((0.01, 0.16, 0.98, 0.82))
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(-len(lines) * line_h, line_h)
    for r, row in enumerate(lines):
        x = 0.0
        for piece, weight in row:
            ax.text(x, -r * line_h, piece.replace(" ", "\u00a0"), family="monospace",
                    fontsize=9, va="center", ha="left",
                    bbox={"boxstyle": "square,pad=0.05", "lw": 0,
                          "fc": cmap(weight / top)},
                    color="white" if weight / top < 0.55 else "black")
            x += char_w * len(piece)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    cax = fig.add_axes((0.3, 0.09, 0.4, 0.025))
    fig.colorbar(sm, cax=cax, orientation="horizontal", label="CaMeLS token weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weight_summary(exp: CamelsExperiment, docs: int = 100) -> dict[str, float]:
    """Mean CaMeLS weight on answer-span, other salient, and remaining tokens (test docs)."""
    enc = encode_documents(exp.tokenizer, make_stream("test", docs, seed=TEST_SEED + 98),
                           MAX_LEN)
    with torch.no_grad():
        w = exp.trained_weighting()(enc.doc_ids, enc.doc_mask)
    real = enc.doc_mask.bool()
    answer = enc.answer_span_mask & real
    salient = enc.salient_mask & real & ~answer
    rest = real & ~enc.salient_mask
    return {"answer_tokens": float(w[answer].mean()), "other_salient_tokens":
            float(w[salient].mean()), "other_tokens": float(w[rest].mean())}


COLUMNS = ("exact_match", "f1", "f1_other_entity", "f1_entity_specific", "answer_nll",
           "forgetting")


def compare(exps: dict[int, CamelsExperiment], fns: dict[int, dict[str, WeightFn]],
            lrs: list[float], val_docs: int, val_streams: int, test_docs: int,
            test_streams: int, offset: int) -> dict:
    """Sweep every weighting's lr on val streams, then score all on the test streams.

    Baselines are swept with the first seed's experiment (they do not depend on the
    CaMeLS seed), CaMeLS per seed; test stream k is paired with CaMeLS seed k % #seeds.
    ``paired``: mean ± std over test streams of F1(method) − F1(uniform) on the same
    stream (the streams' own difficulty cancels).
    """
    seeds = list(exps)
    first = seeds[0]
    sweeps = {s: sweep(exps[s], {k: v for k, v in fns[s].items() if k == "camels" or s == first},
                       lrs, val_docs, val_streams, offset) for s in seeds}
    best = {name: sweeps[first][name]["best_lr"] for name in METHODS if name != "camels"}
    camels_lr = {s: sweeps[s]["camels"]["best_lr"] for s in seeds}
    test: dict[str, list[dict]] = {name: [] for name in (NO_ADAPTATION, *METHODS)}
    questions = []
    for k in range(test_streams):
        s = seeds[k % len(seeds)]
        data = stream(exps[s], "test", test_docs, TEST_SEED + offset + k)
        questions.append(len(data[0].golds))
        none = score(exps[s], lambda enc: torch.zeros_like(uniform_weights(enc.doc_mask)),
                     data, 1e-3)
        test[NO_ADAPTATION].append(none)
        for name in METHODS:
            lr = camels_lr[s] if name == "camels" else best[name]
            test[name].append(score(exps[s], fns[s][name], data, lr))
        print(f"test stream {k} ({test_docs} docs, camels seed {s}) F1 " + " ".join(
            f"{n}={test[n][-1]['f1']:.4f}" for n in test), flush=True)
    return {
        "docs_per_test_stream": test_docs, "questions_per_stream": questions,
        "sweep": {**{name: sweeps[first][name] for name in best},
                  "camels": {"best_lr": [camels_lr[s] for s in seeds],
                             "grid": {str(s): sweeps[s]["camels"]["grid"] for s in seeds}}},
        "test": {name: {key: _mean_std([m[key] for m in rows]) for key in rows[0]}
                 for name, rows in test.items()},
        "paired_f1_vs_uniform": {name: _mean_std([a["f1"] - b["f1"] for a, b in
                                                  zip(test[name], test["uniform"])])
                                 for name in test},
        "test_runs": test,
    }


def markdown(section: dict) -> str:
    """The section's table: mean ± std over its test streams."""
    lines = ["| weighting | Adam lr (val) | EM | F1 | F1 other entity | entity-specific F1 | "
             "answer NLL | forgetting | F1 − uniform (paired) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in (NO_ADAPTATION, *METHODS):
        r = section["test"][name]
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in COLUMNS]
        d = section["paired_f1_vs_uniform"][name]
        cells.append(f"{d['mean']:+.4f} ± {d['std']:.4f}")
        if name == NO_ADAPTATION:
            label, lr = "none (base model, no streaming)", "–"
        else:
            label, lr = name, section["sweep"][name]["best_lr"]
            lr = (f"{lr:g}" if isinstance(lr, (int, float))
                  else "/".join(f"{x:g}" for x in lr))
        lines.append(f"| {label} | {lr} | " + " | ".join(cells) + " |")
    before = section["test"]["uniform"]["answer_nll_before"]
    lines.append("")
    lines.append(f"{len(section['questions_per_stream'])} test streams of "
                 f"{section['docs_per_test_stream']} documents "
                 f"({sum(section['questions_per_stream'])} questions in all); answer NLL "
                 f"before streaming {before['mean']:.3f} ± {before['std']:.3f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/camels")
    p.add_argument("--config", default="configs/camels.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="meta-training seeds of CaMeLS")
    p.add_argument("--meta-steps", type=int, default=300)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--val-docs", type=int, default=300,
                   help="documents per validation stream (as long as the test streams)")
    p.add_argument("--val-streams", type=int, default=2)
    p.add_argument("--test-docs", type=int, default=300)
    p.add_argument("--test-streams", type=int, default=6)
    p.add_argument("--short-docs", type=int, default=20,
                   help="documents per stream of the short-stream comparison (0: skip it)")
    p.add_argument("--short-val-streams", type=int, default=4)
    p.add_argument("--short-test-streams", type=int, default=12)
    p.add_argument("--tag", default="", help="prefix of the result file names")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    t0 = time.perf_counter()
    exps = {s: meta_train(args.config, out, s, args.meta_steps) for s in args.seeds}
    fns = {s: weight_fns(e) for s, e in exps.items()}
    results = {
        "setup": {**vars(args), "methods": list(METHODS),
                  "test_entities": "test split (entity-disjoint from train/val)",
                  "adapt_params": list(exps[args.seeds[0]].camels.adapt_params or [])},
        "long": compare(exps, fns, args.lrs, args.val_docs, args.val_streams, args.test_docs,
                        args.test_streams, offset=0),
    }
    if args.short_docs:
        results["short"] = compare(exps, fns, args.lrs, args.short_docs,
                                   args.short_val_streams, args.short_docs,
                                   args.short_test_streams, offset=SHORT)
    results["camels_weights"] = {str(s): weight_summary(e) for s, e in exps.items()}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = "## Streams of hundreds of documents (the issue's setting)\n\n" + markdown(
        results["long"])
    if "short" in results:
        text += (f"\n## Short streams ({args.short_docs} documents; a diagnostic)\n\n"
                 + markdown(results["short"]))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{args.tag}results.json", json.dumps(results, indent=1))
    atomic_write_text(out / f"{args.tag}results.md", text)
    plot_weights(exps[args.seeds[0]], out / f"{args.tag}token_weights.png")
    print(text)
    print(json.dumps(results["camels_weights"], indent=1))


if __name__ == "__main__":
    main()
