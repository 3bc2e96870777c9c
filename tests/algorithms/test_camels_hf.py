"""Hugging Face causal LMs in CaMeLS: the wrapper's logits, the layer-wise checkpointed
path, and the meta-gradient through a tiny random Llama (no download, float64).

Marked slow where they import ``transformers`` (~8-10 s on this CPU), as the other
transformers-based tests are; run them with ``-m slow``."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.camels import CaMeLS, TokenWeighting
from metaopt.algorithms.camels.hf import HFCausalLM, require_lm
from metaopt.errors import MissingExtraError
from metaopt.models import TinyLM, TinyLMConfig

V = 32


def _llama(seed: int = 0, checkpoint: bool = False) -> HFCausalLM:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).double().eval()
    return HFCausalLM(model, checkpoint=checkpoint)


def _batch(n: int = 2, T: int = 6):
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(0, V, (n, T), generator=g)
    doc_mask = torch.ones_like(doc)
    doc_mask[1, -2:] = 0
    qa = torch.randint(0, V, (n, 2, 5), generator=g)
    answer = torch.zeros_like(qa)
    answer[..., -2:] = 1
    loc = torch.randint(0, V, (n, 1, 5), generator=g)
    return [doc, doc_mask, qa, answer, loc, torch.ones_like(loc)]


@pytest.mark.slow
def test_wrapper_and_checkpointed_path_give_the_models_logits() -> None:
    plain, ckpt = _llama(), _llama(checkpoint=True)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    ref = plain.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(plain(ids, mask), ref, rtol=0, atol=0)
    torch.testing.assert_close(ckpt(ids, mask), ref, rtol=1e-12, atol=1e-12)
    assert plain.hidden_states(ids, mask).shape == (2, 7, 16)


@pytest.mark.slow
def test_checkpointed_llama_meta_gradient_equals_plain() -> None:
    """Layers recomputed with the inner θ passed explicitly: the same dF/dφ to rounding."""
    torch.manual_seed(5)
    weighting = TokenWeighting(TinyLM(TinyLMConfig(vocab_size=V, d_model=8, n_layers=1,
                                                   n_heads=2, max_len=8)), width=8).double()
    torch.nn.init.normal_(weighting.out.weight, std=0.5)
    grads = []
    for checkpoint in (False, True):
        camels = CaMeLS(_llama(checkpoint=checkpoint), weighting, inner_lr=1.0)
        weighting.zero_grad(set_to_none=True)
        camels.meta_loss(*_batch()).backward()
        grads.append({k: p.grad.clone() for k, p in weighting.named_parameters()})
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-8
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-13)


@pytest.mark.slow
def test_hf_backbone_for_the_weighting_model_starts_uniform() -> None:
    weighting = TokenWeighting(_llama(1), normalize=True).double()
    ids = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(weighting(ids, torch.ones_like(ids)),
                               torch.ones(1, 5, dtype=torch.float64))


def test_missing_extra_names_lm() -> None:
    with pytest.raises(MissingExtraError, match=r"metaopt\[lm\]"):
        require_lm("a test", ("no_such_module_for_metaopt",))


def _hf_tokenizer():
    """A fast word-level Hugging Face tokenizer built in memory (no files, no download)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<s>", "</s>", "<unk>", "Mara", "Voss", "lives", "in", "Keld", ".",
             "She", "plays", "the", "violin", "question", ":", "Where", "does", "live", "?",
             "answer", "What", "instrument"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation()])
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                               bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")


@pytest.mark.slow
def test_hf_tokenizer_drives_the_documents_pipeline() -> None:
    """HFTokenizer: the project's encode/offset/span/batch contract over a fast tokenizer,
    so ``encode_documents`` and the QA format run unchanged on a Hugging Face model."""
    from metaopt.algorithms.camels.hf import HFTokenizer
    from tasks.documents import Document, QAPair, encode_documents

    tok = HFTokenizer(_hf_tokenizer())
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.vocab_size) == (0, 1, 2, 2, 23)
    text = "Mara Voss lives in Keld. She plays the violin."
    ids, offsets = tok.encode_with_offsets(text)
    assert [text[a:b] for a, b in offsets] == ["Mara", "Voss", "lives", "in", "Keld", ".",
                                                "She", "plays", "the", "violin", "."]
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    keld = text.index("Keld")
    assert tok.span_mask(text, [(keld, keld + 4)], add_bos=True) == [
        False, False, False, False, False, True] + [False] * 6
    doc = Document(text=text, qa=(QAPair("Where does Mara Voss live?", "Keld"),
                                  QAPair("What instrument does Mara Voss play?", "violin")),
                   answer_spans=((keld, keld + 4), (text.index("violin"), len(text) - 1)),
                   salient_spans=((0, 9),), entity_id="person:mara")
    enc = encode_documents(tok, [doc], max_len=8)
    assert enc.doc_ids.shape == (1, 8) and enc.doc_ids[0, 0] == 1  # cut to max_len
    assert enc.answer_span_mask[0].tolist() == [False] * 5 + [True, False, False]
    assert enc.salient_mask[0].tolist() == [False, True, True] + [False] * 5
    answer = enc.qa_ids[0][enc.qa_answer_mask[0]].tolist()
    assert tok.decode(answer) == "Keld" and answer[-1] == tok.eos_id
    assert enc.prompts[0].tolist() == [tok.bos_id, *tok.encode(
        "question: Where does Mara Voss live? answer:")]
    assert tok.decode(enc.prompts[0].tolist()) == "question : Where does Mara Voss live? answer :"


@pytest.mark.slow
def test_hf_tokenizer_refuses_a_slow_tokenizer_and_missing_ids() -> None:
    from metaopt.algorithms.camels.hf import HFTokenizer

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        HFTokenizer(Slow())
    fast = _hf_tokenizer()
    fast.bos_token = None
    with pytest.raises(ValueError, match="bos_id"):
        HFTokenizer(fast)
    assert HFTokenizer(fast, bos_id=3).bos_id == 3
