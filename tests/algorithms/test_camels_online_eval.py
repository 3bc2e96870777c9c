"""Scoring an online-adaptation run: EM / F1 of greedy answers, answer NLL, forgetting,
the salient-span weights, and the stream's Adam equal to torch.optim.Adam."""

from __future__ import annotations

import copy

import pytest
import torch

from metaopt.algorithms.camels.objective import weighted_lm_loss
from metaopt.algorithms.camels.online import stream_adapt, uniform_weights
from metaopt.algorithms.camels.online_eval import QASet, run_online, score_answers, span_weights
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.optim import adam
from metaopt.params import functional_call

V, BOS, SEP, EOS = 24, 1, 2, 3


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_len=8))


def _logits_fn(model):
    return lambda th, ids, mask: functional_call(model, th, (ids,), {"attention_mask": mask})


def _stream(n: int, seed: int = 0):
    """Document i = [bos, key_i, sep, value_i, eos]; its question = the same sequence."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(10, generator=g)[:n] + 4
    values = torch.randint(14, V, (n,), generator=g)
    ids = torch.stack([torch.full((n,), BOS), keys, torch.full((n,), SEP), values,
                       torch.full((n,), EOS)], 1)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 3] = True
    qa = QASet(prompts=[row[:3] for row in ids], golds=[[str(int(v))] for v in values],
               qa_ids=ids, answer_mask=answer)
    return ids, torch.ones_like(ids), answer, qa


def test_span_weights() -> None:
    mask = torch.tensor([[1, 1, 1, 0]])
    spans = torch.tensor([[False, True, False, True]])
    assert span_weights(spans, mask).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="span_mask"):
        span_weights(spans[:, :3], mask)


def test_score_answers_em_f1_on_a_known_model() -> None:
    """A 'model' whose next token is (last + 1) mod 8: prompt [3] answers 4 5 6 (eos 7)."""
    words = {4: "the", 5: "red", 6: "fox"}
    fn = lambda th, ids, m: torch.nn.functional.one_hot((ids + 1) % 8, 8).float()  # noqa: E731
    qa = QASet(prompts=[torch.tensor([3]), torch.tensor([5])], golds=[["Red fox"], ["dog"]],
               qa_ids=torch.zeros(1, 2, dtype=torch.long), answer_mask=torch.zeros(1, 2))
    em, f, answers = score_answers(fn, {}, qa, lambda t: " ".join(words[i] for i in t),
                                   max_new_tokens=5, eos_id=7)
    assert answers == ["the red fox", "fox"]   # "the red fox" → "red fox": EM 1; "fox" vs "dog": 0
    assert em == 0.5 and f == pytest.approx(0.5)


def test_stream_adam_is_torch_adam() -> None:
    model = _model().double()  # float64: Adam's m/√v of tiny gradients is rounding-sensitive
    ids, mask, _, _ = _stream(3)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    theta = stream_adapt(_logits_fn(model), dict(model.named_parameters()), ids, mask, weights,
                         adam(1e-2))
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for i in range(3):
        rows = slice(i, i + 1)
        opt.zero_grad()
        weighted_lm_loss(ref(ids[rows], mask[rows]), ids[rows], weights[rows],
                         mask[rows]).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(theta[k], p.detach(), rtol=1e-9, atol=1e-12)


def test_oracle_spans_teach_the_answers_and_lr_zero_changes_nothing() -> None:
    model = _model()
    ids, mask, answer, qa = _stream(6)
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    loc = torch.randint(4, V, (4, 8), generator=torch.Generator().manual_seed(2))
    reps = 8   # the stream, eight times over: 48 Adam steps

    def run(weights, lr):
        return run_online(_logits_fn(model), theta0, ids.repeat(reps, 1), mask.repeat(reps, 1),
                          weights.repeat(reps, 1), qa, loc, torch.ones_like(loc),
                          lambda t: " ".join(map(str, t)), lr=lr, eos_id=EOS,
                          max_new_tokens=1)

    oracle = run(span_weights(answer, mask), 3e-2)
    # −log(1/V) ≈ 3.18 at random init; Adam steps on the answer tokens alone drive it down.
    assert oracle.answer_nll_before > 2.5
    assert oracle.answer_nll < 0.5 * oracle.answer_nll_before
    assert 0.0 <= oracle.exact_match <= oracle.f1 <= 1.0
    still = run(uniform_weights(mask), 0.0)
    assert still.answer_nll == pytest.approx(still.answer_nll_before)
    assert still.forgetting == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        run(torch.full(ids.shape, float("nan")), 1e-3)
