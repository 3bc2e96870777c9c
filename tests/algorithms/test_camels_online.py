"""The online adaptation runner: Adam parity with torch.optim, uptake with oracle weights."""

from __future__ import annotations

import copy

import pytest
import torch

from metaopt.algorithms.camels.baselines import span_weights, uniform_weights
from metaopt.algorithms.camels.objective import weighted_lm_loss
from metaopt.algorithms.camels.online import QASet, adapt_online, run_online
from metaopt.models import TinyLM, TinyLMConfig

V, BOS, SEP, EOS = 24, 1, 2, 3


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_len=8))


def _stream(n: int, seed: int = 0):
    """Document i = [bos, key_i, sep, value_i, eos]; its question = the same sequence."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(10, generator=g)[:n] + 4
    values = torch.randint(14, V, (n,), generator=g)
    ids = torch.stack([torch.full((n,), BOS), keys, torch.full((n,), SEP), values,
                       torch.full((n,), EOS)], 1)
    mask = torch.ones_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 3] = True
    qa = QASet(prompts=[row[:3].tolist() for row in ids], golds=[[str(int(v))] for v in values],
               qa_ids=ids, qa_mask=mask, answer_mask=answer)
    return ids, mask, answer, qa


def test_adapt_online_is_torch_adam_on_the_weighted_loss() -> None:
    model = _model().double()  # float64: Adam's m/√v of tiny gradients is rounding-sensitive
    ids, mask, _, _ = _stream(3)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    theta, losses = adapt_online(model, dict(model.named_parameters()), ids, mask, weights,
                                 lr=1e-2, batch_size=2, steps_per_batch=2)
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    ref_losses = []
    for rows in (slice(0, 2), slice(0, 2), slice(2, 3), slice(2, 3)):
        opt.zero_grad()
        loss = weighted_lm_loss(ref(ids[rows], mask[rows]), ids[rows], weights[rows], mask[rows])
        loss.backward()
        opt.step()
        ref_losses.append(float(loss.detach()))
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for k, p in ref.named_parameters():
        torch.testing.assert_close(theta[k], p.detach(), rtol=1e-9, atol=1e-12)


def test_oracle_weights_teach_the_answers_and_lr_zero_changes_nothing() -> None:
    model = _model()
    ids, mask, answer, qa = _stream(6)
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    loc_ids = torch.randint(4, V, (4, 8), generator=torch.Generator().manual_seed(2))
    loc_mask = torch.ones_like(loc_ids)

    def run(weights, lr):
        return run_online(model, theta0, ids, mask, weights, qa, loc_ids, loc_mask,
                          lambda t: " ".join(map(str, t)), lr=lr, eos_id=EOS, batch_size=6,
                          steps_per_batch=30, max_new_tokens=1)

    oracle = run(span_weights(answer, mask), 3e-2)
    # −log(1/V) ≈ 3.18 at random init; 30 Adam steps on the answer tokens alone drive it down.
    assert oracle.answer_nll_before > 2.5
    assert oracle.answer_nll < 0.5 * oracle.answer_nll_before
    assert 0.0 <= oracle.exact_match <= oracle.f1 <= 1.0
    assert len(oracle.inner_losses) == 30 and oracle.inner_losses[-1] < oracle.inner_losses[0]
    assert abs(oracle.forgetting) < float("inf")
    still = run(uniform_weights(mask), 0.0)
    assert still.answer_nll == pytest.approx(still.answer_nll_before)
    assert still.forgetting == pytest.approx(0.0, abs=1e-6)


def test_bad_stream_is_refused() -> None:
    model = _model()
    ids, mask, _, _ = _stream(2)
    theta = dict(model.named_parameters())
    with pytest.raises(ValueError, match="weights shape"):
        adapt_online(model, theta, ids, mask, torch.ones(2, 3), lr=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        adapt_online(model, theta, ids, mask, torch.full(ids.shape, float("nan")), lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        adapt_online(model, theta, ids, mask, torch.ones(ids.shape), lr=-1.0)
