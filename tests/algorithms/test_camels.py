"""CaMeLS: weighting model, losses, meta-gradient (finite differences and closed form),
first order refused, SQuAD metrics, and a few meta-steps that learn."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metaopt.algorithms.camels import (
    CaMeLS,
    TokenWeighting,
    exact_match,
    f1,
    locality_kl,
    squad_normalize,
    token_nll,
    weighted_lm_loss,
)
from metaopt.bilevel import FirstOrder, Unrolled
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.tree import tree_dot

V = 11


def _lm(seed: int, dtype=torch.float64, d: int = 8, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=2, max_len=12),
                  **kw).to(dtype)


def _batch(n: int = 2, T: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, V, (n, T), generator=g)
    doc_mask = torch.ones(n, T, dtype=torch.long)
    doc_mask[0, -2:] = 0  # padding
    qa = torch.randint(0, V, (n, 2, 6), generator=g)
    ans = torch.zeros(n, 2, 6, dtype=torch.long)
    ans[..., 4:] = 1
    loc = torch.randint(0, V, (n, 1, 5), generator=g)
    loc_mask = torch.ones(n, 1, 5, dtype=torch.long)
    return [doc, doc_mask, qa, ans, loc, loc_mask]


def _randomise_head(weighting: TokenWeighting, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        weighting.out.weight.normal_(std=0.5)
        weighting.out.bias.fill_(0.1)


def test_zero_init_gives_uniform_weights() -> None:
    """Last layer zero ⇒ w_t = softplus_3(0)·m_t = (log 2 / 3)·m_t; normalised ⇒ mean 1."""
    ids = torch.randint(0, V, (3, 7))
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    w = TokenWeighting(_lm(0), width=16).double()(ids, mask)
    torch.testing.assert_close(w, math.log(2) / 3 * mask.double(), rtol=1e-12, atol=0)
    wn = TokenWeighting(_lm(0), width=16, normalize=True).double()(ids, mask)
    torch.testing.assert_close(wn, mask.double(), rtol=1e-12, atol=1e-12)
    weighting = TokenWeighting(_lm(0), width=16, normalize=True).double()
    _randomise_head(weighting)
    wn = weighting(ids, mask)
    assert (wn[mask == 0] == 0).all()
    torch.testing.assert_close((wn * mask).sum(-1) / mask.sum(-1),
                               torch.ones(3, dtype=torch.float64))


def test_weighted_lm_loss_by_hand() -> None:
    """Σ_{t≥1} w_t m_t (−log p(x_t|x_<t)) / Σ_{t≥1} m_t."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 5))
    w = torch.rand(2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    logp = logits.log_softmax(-1)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                total += -w[b, t] * logp[b, t - 1, ids[b, t]]
                count += 1
    torch.testing.assert_close(weighted_lm_loss(logits, ids, w, mask), total / count)
    assert token_nll(logits, ids).shape == (2, 4)


def test_locality_kl_is_zero_for_equal_models_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, V, dtype=torch.float64), torch.randn(2, 4, V, dtype=torch.float64)
    mask = torch.ones(2, 4)
    assert locality_kl(a, a, mask).abs() < 1e-14
    assert locality_kl(a, b, mask) > 0


def _camels(lr: float = 1.0, **kw) -> CaMeLS:
    weighting = TokenWeighting(_lm(1), width=8).double()
    _randomise_head(weighting)
    return CaMeLS(_lm(0), weighting, inner_lr=lr, **kw)


def _grads(camels: CaMeLS, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    camels.weighting.zero_grad(set_to_none=True)
    camels.meta_loss(*batch).backward()
    return {k: p.grad.clone() for k, p in camels.weighting.named_parameters()}


def _assert_matches_central_differences(camels: CaMeLS, batch: list[torch.Tensor],
                                        grads: dict[str, torch.Tensor]) -> None:
    """⟨dF/dφ, v⟩ = (F(φ+εv) − F(φ−εv)) / 2ε + O(ε²) in float64, v random over all of φ."""
    torch.manual_seed(5)
    v = {k: torch.randn_like(g) for k, g in grads.items()}
    params = dict(camels.weighting.named_parameters())
    eps, values = 1e-5, []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for k, p in params.items():
                p.add_(sign * eps * v[k])
            values.append(camels.meta_loss(*batch).item())
            for k, p in params.items():
                p.sub_(sign * eps * v[k])
    analytic = tree_dot(grads, v).item()
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-6, abs=1e-10)


def test_meta_gradient_matches_central_finite_differences() -> None:
    camels = _camels()
    batch = _batch()
    _assert_matches_central_differences(camels, batch, _grads(camels, batch))


def test_documents_in_sequence() -> None:
    """(N, 1, T) documents equal (N, T); (N, 2, T) takes one step per document in order
    and its meta-gradient matches central finite differences."""
    camels = _camels(lr=0.5)
    batch = _batch()
    one = _grads(camels, batch)
    seq1 = _grads(camels, [batch[0][:, None], batch[1][:, None], *batch[2:]])
    for k in one:
        torch.testing.assert_close(seq1[k], one[k], rtol=1e-12, atol=1e-15)
    second = _batch(seed=1)
    docs = [torch.stack([batch[0], second[0]], 1), torch.stack([batch[1], second[1]], 1),
            *batch[2:]]
    problem = camels.problem(*[t[0] for t in docs])
    assert problem.inner_steps == 2 and [problem.inner_batch(k) for k in (0, 1)] == [0, 1]
    grads = _grads(camels, docs)
    assert any((grads[k] - one[k]).abs().max() > 1e-6 for k in one)
    _assert_matches_central_differences(camels, docs, grads)


def test_documents_per_step_is_one_minibatch_step() -> None:
    """docs_per_step=D: the task's D documents in ONE step on their token-mean weighted
    loss — F equals the outer loss after :meth:`CaMeLS.adapt` on the (D, T) batch (the
    online runner's step), the problem has one inner step, and the meta-gradient
    matches central finite differences; a group size that does not divide D is refused."""
    camels = _camels(lr=0.5, docs_per_step=2)
    first, second = _batch(), _batch(seed=1)
    docs = [torch.stack([first[0], second[0]], 1), torch.stack([first[1], second[1]], 1),
            *first[2:]]
    problem = camels.problem(*[t[0] for t in docs])
    assert problem.inner_steps == 1
    theta1 = camels.adapt(docs[0][0], docs[1][0])
    with torch.no_grad():
        expected = problem.outer_loss(theta1, camels.outer_parameters())
        assert camels.meta_loss(*[t[:1] for t in docs]).item() == pytest.approx(
            expected.item(), rel=1e-12)
    _assert_matches_central_differences(camels, docs, _grads(camels, docs))
    three = [torch.stack([first[0]] * 3, 1), torch.stack([first[1]] * 3, 1), *first[2:]]
    with pytest.raises(ValueError, match="docs_per_step=2 does not divide"):
        camels.meta_loss(*three)
    with pytest.raises(ValueError, match="docs_per_step"):
        _camels(docs_per_step=0)


class _FreeWeights(nn.Module):
    """A 'weighting model' whose weights are its parameter: w = p · m."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, T, dtype=torch.float64) + 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.w.expand_as(input_ids) * attention_mask


def test_one_step_meta_gradient_equals_closed_form() -> None:
    """One SGD step θ₁ = θ₀ − α Σ_t w_t m_t ∇ℓ_t(θ₀)/n gives
    dF/dw_t = −(α/n) m_t ⟨∇f(θ₁), ∇ℓ_t(θ₀)⟩ (n = Σ_{t≥1} m_t; ℓ_0 has no target)."""
    T, alpha = 8, 0.7
    camels = CaMeLS(_lm(0), _FreeWeights(T), inner_lr=alpha, c_kl=0.1)
    batch = [t[:1] for t in _batch(1, T)]
    batch[1][0, -2:] = 0
    grad = _grads(camels, batch)["w"][0]
    doc, mask = batch[0], batch[1]
    theta0 = {k: v.detach().requires_grad_() for k, v in camels.base_parameters().items()}
    w = camels.weighting.w.detach()
    problem = camels.problem(*[t[0] for t in batch])
    inner = problem.inner_value(theta0, {"w": w}, problem.inner_batch(0))
    g_inner = torch.autograd.grad(inner, list(theta0.values()))
    theta1 = {k: (v - alpha * g).detach().requires_grad_()
              for (k, v), g in zip(theta0.items(), g_inner)}
    df = torch.autograd.grad(problem.outer_value(theta1, {}), list(theta1.values()))
    nll = token_nll(camels.logits(theta0, doc, mask), doc)[0]
    n = mask[0, 1:].sum()
    expected = torch.zeros(T, dtype=torch.float64)
    for t in range(1, T):
        g_t = torch.autograd.grad(nll[t - 1], list(theta0.values()), retain_graph=True)
        expected[t] = -alpha / n * mask[0, t] * sum((a * b).sum() for a, b in zip(df, g_t))
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)


def test_first_order_is_refused_because_its_meta_gradient_is_zero() -> None:
    """θ₀ does not depend on φ: with the inner gradient a constant, F does not depend on φ."""
    with pytest.raises(ValueError, match="first-order"):
        _camels(estimator=FirstOrder())
    with pytest.raises(ValueError, match="first-order"):
        _camels(estimator=Unrolled(first_order=True))
    camels = _camels()
    problem = camels.problem(*[t[0] for t in _batch()])
    hg = FirstOrder()(problem, camels.outer_parameters(), camels.base_parameters())
    assert all((g == 0).all() for g in hg.grad.values())
    exact = Unrolled()(problem, camels.outer_parameters(), camels.base_parameters())
    assert max(g.abs().max().item() for g in exact.grad.values()) > 1e-6


def test_checkpointed_base_model_gives_the_same_meta_gradient() -> None:
    """TinyLM(checkpoint=True) recomputes blocks with the inner θ passed explicitly."""
    plain = _camels()
    ckpt = CaMeLS(_lm(0, checkpoint=True), plain.weighting, inner_lr=1.0)
    batch = _batch()
    a, b = _grads(plain, batch), _grads(ckpt, batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-13)


def test_adapt_is_one_weighted_sgd_step() -> None:
    """adapt(): θ₁ = θ₀ − α ∇_θ g(θ₀) with the given weights (and the model's by default)."""
    camels = _camels(lr=0.3)
    doc, mask = _batch()[:2]
    w = torch.rand(doc.shape, dtype=torch.float64)
    theta0 = {k: v.detach().requires_grad_() for k, v in camels.base_parameters().items()}
    loss = weighted_lm_loss(camels.logits(theta0, doc, mask), doc, w, mask)
    grads = torch.autograd.grad(loss, list(theta0.values()))
    adapted = camels.adapt(doc, mask, weights=w)
    for (k, v), g in zip(theta0.items(), grads):
        torch.testing.assert_close(adapted[k], v.detach() - 0.3 * g, rtol=1e-12, atol=1e-15)
    own = camels.adapt(doc, mask)
    with torch.no_grad():
        w_model = camels.weighting(doc, mask)
    torch.testing.assert_close(own["head.weight"],
                               camels.adapt(doc, mask, weights=w_model)["head.weight"])


def test_bad_inputs_name_the_field() -> None:
    camels = _camels()
    batch = _batch()
    with pytest.raises(ValueError, match="loc_mask"):
        camels.meta_loss(*batch[:5], batch[5][:1])
    bad = [t.clone() for t in batch]
    bad[3].zero_()
    with pytest.raises(ValueError, match="answer_mask"):
        camels.meta_loss(*bad)
    with pytest.raises(ValueError, match="qa_ids"):
        camels.meta_loss(batch[0], batch[1], batch[2].double(), *batch[3:])
    with pytest.raises(ValueError, match="inner_lr"):
        CaMeLS(_lm(0), TokenWeighting(_lm(1)), inner_lr=0.0)


@pytest.mark.parametrize("pred,gold,em,f", [
    ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
    ("an apple", ["A pear", "apple"], 1.0, 1.0),
    ("blue whale", "the blue", 0.0, 2 / 3),
    ("red red car", "red car", 0.0, 0.8),
    ("", "", 1.0, 1.0),
    ("the", "paris", 0.0, 0.0),
    ("42 years", "forty two", 0.0, 0.0),
])
def test_exact_match_and_f1(pred: str, gold, em: float, f: float) -> None:
    assert exact_match(pred, gold) == em
    assert f1(pred, gold) == pytest.approx(f)


def test_squad_normalize() -> None:
    assert squad_normalize("  The  Quick, brown-fox.  ") == "quick brownfox"
    with pytest.raises(ValueError, match="answers"):
        f1("x", [])


def test_a_few_meta_steps_lower_the_outer_loss() -> None:
    """Answers inside the document: learning where to put the weight lowers the QA NLL."""
    torch.manual_seed(0)
    n, T = 4, 10
    doc = torch.randint(0, V, (n, T))
    answers = doc[:, 6:8]                      # the answer tokens occur in the document
    qa = torch.cat([doc[:, :3], answers], dim=1)[:, None]
    ans = torch.zeros_like(qa)
    ans[..., 3:] = 1
    loc = torch.randint(0, V, (n, 1, 6))
    batch = [doc, torch.ones_like(doc), qa, ans, loc, torch.ones_like(loc)]
    base = _lm(0, dtype=torch.float32, d=16)
    weighting = TokenWeighting(_lm(1, dtype=torch.float32, d=16), width=16)
    camels = CaMeLS(base, weighting, inner_lr=3.0, c_kl=0.1)
    opt = torch.optim.Adam(weighting.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = camels.meta_loss(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = camels.meta_loss(*batch).item()
    assert final < losses[0] - 0.05, [*losses, final]


@pytest.mark.slow  # importing transformers alone takes ~10 s of CPU
def test_hugging_face_models_as_base_and_backbone_match_finite_differences() -> None:
    """A tiny GPT-2 built from a config (nothing downloaded), eager attention, float64.

    (GPT-2, not Llama: Llama's RMSNorm computes in float32 even for float64 inputs,
    which limits a finite-difference check to about 1e-4.)
    """
    transformers = pytest.importorskip("transformers")

    def tiny(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg).double()

    weighting = TokenWeighting(tiny(1).transformer, width=8).double()
    _randomise_head(weighting)
    camels = CaMeLS(tiny(0), weighting, inner_lr=1.0)
    batch = _batch()
    grads = _grads(camels, batch)
    torch.manual_seed(5)
    v = {k: torch.randn_like(g) for k, g in grads.items()}
    params = dict(weighting.named_parameters())
    eps = 1e-6
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for k, p in params.items():
                p.add_(sign * eps * v[k])
            values.append(camels.meta_loss(*batch).item())
            for k, p in params.items():
                p.sub_(sign * eps * v[k])
    fd = (values[0] - values[1]) / (2 * eps)
    analytic = tree_dot(grads, v).item()
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-10)
