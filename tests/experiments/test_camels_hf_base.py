"""The ``camels`` runner experiment on a Hugging Face base model (``hf_base``).

A tiny random Llama and a byte-level BPE tokenizer trained in memory are saved as a local
``save_pretrained`` directory (no download). Through the same experiment as the tiny-LM
base: the meta-step moves the weighting model along a non-zero meta-gradient, evaluation
streams and scores documents, the runner's interrupted-and-resumed run ends bit-identical
to a straight one, and malformed settings are refused with one-line errors.
"""

from __future__ import annotations

import pytest
import torch

from metaopt.runner.config import parse_run_config
from metaopt.runner.loop import build_experiment
from tests.experiments.resume_check import assert_resumed_run_matches

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local causal LM directory: tiny Llama + fast byte-level BPE tokenizer."""
    from tasks.documents import make_stream, vocabulary_texts

    corpus = list(vocabulary_texts()) + [d.text for d in make_stream("train", 40, seed=1)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=192, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("hf_base")
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def _settings(hf_dir, **extra):
    return {"base_checkpoint": None, "hf_base": str(hf_dir),
            "weighting": {"d_model": 16, "n_layers": 1, "n_heads": 2, "width": 8,
                          "init": "random"},
            "inner_lr": 0.5, "outer_lr": 0.01, "train_docs": 8, "meta_batch": 2,
            "locality": 1, "eval_docs": 2, "eval_max_new_tokens": 2, **extra}


def test_hf_base_meta_step_evaluation_and_exact_resume(hf_dir, tmp_path):
    cfg = parse_run_config({"experiment": "camels", "seed": 3, "steps": 2,
                            "checkpoint_every": 1, "eval_every": 2,
                            "settings": _settings(hf_dir)})
    exp = build_experiment(cfg)
    assert type(exp.base).__name__ == "HFCausalLM"
    assert exp.weighting.backbone.config.vocab_size == exp.tokenizer.vocab_size
    before = {k: v.clone() for k, v in exp.phi.items()}
    m = exp.meta_step(1)
    assert m["grad_norm"] > 0 and m["loss"] > 0
    assert any(not torch.equal(before[k], exp.phi[k]) for k in before)
    ev = exp.evaluate("val")
    assert 0.0 <= ev["f1"] <= 1.0 and ev["answer_nll"] > 0
    # the runner's loop, straight and resumed from the step-1 checkpoint
    assert_resumed_run_matches(cfg, tmp_path)


def test_hf_base_settings_are_checked(hf_dir, tmp_path):
    def build(**extra):
        return build_experiment(parse_run_config(
            {"experiment": "camels", "seed": 0, "steps": 1,
             "settings": _settings(hf_dir, **extra)}))

    with pytest.raises(ValueError, match="weighting.init 'base' needs a TinyLM base"):
        build(weighting={"d_model": 16, "n_layers": 1, "n_heads": 2, "init": "base"})
    with pytest.raises(ValueError, match="base_checkpoint must be null"):
        build(base_checkpoint="results/camels/tiny_lm")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build(hf_base=str(tmp_path))
    with pytest.raises(ValueError, match="apply only with hf_base"):
        build(hf_base=None, hf_pad_id=0)


def test_smollm2_config_parses():
    """configs/camels_smollm2.yaml is a valid camels config (not built: that loads SmolLM2)."""
    from pathlib import Path

    from metaopt.runner.config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "camels_smollm2.yaml",
                          ["settings.hf_cache=/tmp/x"])
    s = cfg.settings
    assert (s.hf_base, s.hf_cache, s.weighting["init"], s.base_checkpoint) == (
        "smollm2", "/tmp/x", "random", None)
