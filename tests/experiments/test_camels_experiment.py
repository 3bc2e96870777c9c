"""The ``camels`` runner experiment: meta-steps change the token weights along the
CaMeLS meta-gradient, evaluation streams documents and scores them, an interrupted and
resumed run is bit-identical to an uninterrupted one, and the base-model files are
verified (checksums, tokenizer identity) when loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metaopt.errors import CheckpointError
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.runner.base_lm import load_base_lm, save_base_lm
from metaopt.runner.checkpoint import write_checkpoint
from metaopt.runner.config import load_run_config, parse_run_config, to_dict
from metaopt.runner.loop import build_experiment, checkpoint_state, load_into
from metaopt.text import Tokenizer
from tests.experiments.resume_check import assert_resumed_run_matches

ROOT = Path(__file__).resolve().parents[2]
TINY = {"base_checkpoint": None, "base_model": {"d_model": 16, "n_layers": 1, "n_heads": 2},
        "weighting": {"d_model": 16, "n_layers": 1, "n_heads": 2, "width": 8, "init": "base"},
        "inner_lr": 0.5, "outer_lr": 0.01, "train_docs": 16, "meta_batch": 2, "locality": 1,
        "eval_docs": 3, "eval_max_new_tokens": 3}


def cfg_for(settings: dict, seed: int = 1, steps: int = 4):
    return parse_run_config({"experiment": "camels", "seed": seed, "steps": steps,
                             "settings": settings})


def test_meta_steps_move_phi_and_evaluation_scores_the_stream():
    exp = build_experiment(cfg_for(TINY))
    before = {k: v.clone() for k, v in exp.phi.items()}
    m = exp.meta_step(1)
    assert m["grad_norm"] > 0 and m["loss"] > 0
    # the head's last layer starts at zero: every real token weighs softplus_3(0) = ln2/3
    assert m["mean_weight"] == pytest.approx(torch.log(torch.tensor(2.0)).item() / 3, rel=0.05)
    changed = [k for k in before if not torch.equal(before[k], exp.phi[k])]
    assert "out.weight" in changed and "out.bias" in changed
    ev = exp.evaluate("val")
    assert set(ev) == {"exact_match", "f1", "answer_nll", "answer_nll_before", "forgetting"}
    assert 0.0 <= ev["f1"] <= 1.0 and ev["answer_nll"] > 0


def test_docs_per_step_makes_the_meta_batch_one_minibatch_step():
    """docs_per_step = meta_batch: one task whose inner step is on all the documents;
    its meta-loss is the CaMeLS meta-loss of that grouped batch, and a group size that
    does not divide the meta-batch is refused naming the field."""
    from metaopt.algorithms.camels import group_documents

    grouped = build_experiment(cfg_for({**TINY, "docs_per_step": 2}))
    assert grouped.camels.docs_per_step == 2
    m = grouped.meta_step(1)
    assert m["grad_norm"] > 0 and m["loss"] > 0
    batch = tuple(torch.randint(0, 5, shape) for shape in
                  ((4, 7), (4, 7), (4, 3, 6), (4, 3, 6), (4, 2, 5), (4, 2, 5)))
    out = group_documents(batch, 2)
    assert [tuple(t.shape) for t in out] == [(2, 2, 7), (2, 2, 7), (2, 6, 6), (2, 6, 6),
                                             (2, 4, 5), (2, 4, 5)]
    assert torch.equal(out[2][1, 3:], batch[2][3]) and torch.equal(out[0][1, 0], batch[0][2])
    with pytest.raises(Exception, match="docs_per_step"):
        cfg_for({**TINY, "docs_per_step": 3})


def test_docs_per_task_adapts_on_the_documents_in_sequence():
    """docs_per_task = 2 (docs_per_step 1): one task whose inner loop takes one step per
    document in turn and whose questions cover both documents; its meta-loss is the
    CaMeLS meta-loss of that task, which is not the one-minibatch-step meta-loss of the
    same documents. Sizes that do not fit, and the one-step JVP, are refused by name."""
    from metaopt.algorithms.camels import CaMeLS

    seen = []
    seq = build_experiment(cfg_for({**TINY, "docs_per_task": 2}))
    assert seq.config.task_docs == 2 and seq.camels.docs_per_step == 1
    record = seq.camels.meta_loss

    def recording(*args):  # a test spy: keeps the arguments, computes the real loss
        seen.append([a.clone() for a in args])
        return record(*args)

    seq.camels.meta_loss = recording
    loss = seq.meta_step(1)["loss"]
    args = seen[0]
    assert [tuple(a.shape[:2]) for a in args[:2]] == [(1, 2), (1, 2)]
    assert args[2].shape[:2] == (1, 2 * 3)  # both documents' 3 questions
    assert seq.camels.problem(*(a[0] for a in args)).inner_steps == 2
    sequential = float(record(*args))
    assert loss == pytest.approx(sequential, rel=1e-6)
    minibatch = CaMeLS(seq.base, seq.weighting, inner_lr=TINY["inner_lr"], docs_per_step=2)
    assert float(minibatch.meta_loss(*args)) != pytest.approx(sequential, rel=1e-4)
    for bad in ({"docs_per_task": 3}, {"docs_per_step": 2, "docs_per_task": 1},
                {"docs_per_task": 2, "meta_gradient": "jvp"}):
        with pytest.raises(Exception, match="docs_per_task"):
            cfg_for({**TINY, **bad})


@pytest.mark.parametrize("meta_gradient", ["estimator", "jvp"])
def test_interrupt_and_resume_is_bit_identical(tmp_path, meta_gradient):
    cfg = cfg_for({**TINY, "meta_gradient": meta_gradient})
    straight = build_experiment(cfg)
    losses = [straight.meta_step(s)["loss"] for s in (1, 2, 3)]
    first = build_experiment(cfg)
    first.meta_step(1)
    path = write_checkpoint(tmp_path, step=1, experiment=cfg.experiment, config=to_dict(cfg),
                            state=checkpoint_state(first, 0.0))
    resumed = build_experiment(cfg)
    torch.manual_seed(12345)  # a disturbed global RNG must not matter
    resumed.generator.manual_seed(999)  # nor the sampler's state before loading
    load_into(resumed, cfg, path)
    assert [resumed.meta_step(s)["loss"] for s in (2, 3)] == losses[1:]
    for k in straight.phi:
        assert torch.equal(straight.phi[k], resumed.phi[k]), k
    assert straight.evaluate("val") == resumed.evaluate("val")


def test_runner_train_resumed_from_a_middle_checkpoint_ends_where_a_straight_run_does(
        tmp_path):
    cfg = parse_run_config({"experiment": "camels", "seed": 2, "steps": 3,
                            "checkpoint_every": 1, "eval_every": 3, "settings": TINY})
    result = assert_resumed_run_matches(cfg, tmp_path)
    assert result.status == "finished" and result.step == 3 and "f1" in result.eval_metrics


def test_base_model_files_round_trip_and_are_verified(tmp_path):
    tok = Tokenizer.build(["alpha beta gamma"])
    model = TinyLM(TinyLMConfig(vocab_size=tok.vocab_size, d_model=8, n_layers=1, n_heads=2,
                                max_len=16))
    save_base_lm(tmp_path, model, tok, step=5, training={"steps": 5})
    loaded, tok2, config = load_base_lm(tmp_path)
    assert tok2 == tok and config["training"] == {"steps": 5}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    other = Tokenizer.build(["alpha beta gamma delta"])
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_base_lm(tmp_path)
    with pytest.raises(CheckpointError, match="no base-model checkpoint"):
        load_base_lm(tmp_path / "missing")


def test_shipped_config_parses_and_bad_settings_name_the_field():
    cfg = load_run_config(ROOT / "configs" / "camels.yaml")
    assert cfg.experiment == "camels" and cfg.settings.c_kl == 0.1
    with pytest.raises(Exception, match="inner_lr"):
        cfg_for({**TINY, "inner_lr": -1.0})
    with pytest.raises(Exception, match="weighting.init"):
        cfg_for({**TINY, "weighting": {"init": "pretrained"}})


@pytest.mark.parametrize("name,d_model,layers", [("camels.yaml", 64, 2),
                                                  ("camels_d128.yaml", 128, 4),
                                                  ("camels_seq4.yaml", 64, 2)])
def test_shipped_configs_start_the_weighting_at_their_committed_base_model(name, d_model,
                                                                          layers):
    cfg = load_run_config(ROOT / "configs" / name)
    exp = build_experiment(cfg)  # verifies the base model's checksums and tokenizer
    assert exp.base.config.d_model == d_model and exp.base.config.n_layers == layers
    base = dict(exp.base.named_parameters())
    backbone = {k.removeprefix("backbone."): v for k, v in exp.phi.items()
                if k.startswith("backbone.")}
    assert backbone.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in backbone.items())


def test_stream_batch_trims_questions_by_their_answers_whatever_the_pad_id():
    """QA rows are cut one past their last answer token: the same batch when the padding
    id is 0 (the project's tokenizer) or any other id (Hugging Face tokenizers)."""
    from dataclasses import replace

    from metaopt.runner.experiments.camels import encode_stream_batch
    from tasks.documents import NAME_SYLLABLES, encode_documents, make_stream, vocabulary_texts

    tok = Tokenizer.build(vocabulary_texts(), extra_pieces=NAME_SYLLABLES)
    enc = encode_documents(tok, make_stream("train", 4, seed=0), 160)
    loc_ids, loc_mask = tok.batch_encode(["one text", "another one"], 16, pad=False,
                                         add_bos=True, add_eos=True)
    questions = [torch.nonzero(enc.qa_doc == d).flatten()[:2].tolist() for d in range(3)]
    args = ([0, 1, 2], questions, loc_ids, loc_mask, [[0], [1], [0]])
    ref = encode_stream_batch(enc, *args)
    real = (enc.qa_ids != tok.pad_id)
    repadded = replace(enc, qa_ids=torch.where(real, enc.qa_ids, torch.full_like(enc.qa_ids, 7)))
    out = encode_stream_batch(repadded, *args)
    rows = enc.qa_ids[torch.tensor(questions)]
    width = int((rows != tok.pad_id).sum(-1).max())      # the longest chosen row
    assert ref[2].shape[-1] == out[2].shape[-1] == width
    assert torch.equal(out[3], ref[3])
    assert torch.equal(torch.where(out[2] == 7, 0, out[2]), ref[2])
