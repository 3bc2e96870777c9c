"""CaMeLS ``meta_gradient="jvp"``: for one SGD step on one document,

    dF/dw_t = −(α/n) · m_t · ⟨∇f(θ₁), ∇ℓ_t(θ₀)⟩,

computed with one Jacobian-vector product, gives exactly (float64) the second-order
meta-gradient of the unrolled estimator, including padding and the KL term; it
refuses settings where the formula is not exact."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.camels import CaMeLS, TokenWeighting, token_nll, weighted_lm_loss
from metaopt.bilevel import Unrolled
from metaopt.models import TinyLM, TinyLMConfig

V = 13


def _lm(seed: int, d: int = 8) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=2,
                               max_len=12)).double()


def _weighting() -> TokenWeighting:
    w = TokenWeighting(_lm(1), width=16).double()
    torch.manual_seed(3)
    with torch.no_grad():
        w.out.weight.normal_(std=0.5)
        w.out.bias.fill_(0.1)
    return w


def _batch(n: int = 3, T: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, V, (n, T), generator=g)
    doc_mask = torch.ones(n, T, dtype=torch.long)
    doc_mask[0, -3:] = 0
    qa = torch.randint(0, V, (n, 2, 6), generator=g)
    ans = torch.zeros(n, 2, 6, dtype=torch.long)
    ans[..., 3:] = 1
    loc = torch.randint(0, V, (n, 2, 5), generator=g)
    return [doc, doc_mask, qa, ans, loc, torch.ones(n, 2, 5, dtype=torch.long)]


def _grads(camels: CaMeLS, batch: list[torch.Tensor]) -> tuple[float, dict]:
    params = camels.outer_parameters()
    loss = camels.meta_loss(*batch)
    return float(loss.detach()), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("c_kl", [0.0, 0.1])
def test_jvp_meta_gradient_equals_the_second_order_one(c_kl: float) -> None:
    base, weighting, batch = _lm(0), _weighting(), _batch()
    exact = CaMeLS(base, weighting, inner_lr=0.7, c_kl=c_kl, estimator=Unrolled())
    cheap = CaMeLS(base, weighting, inner_lr=0.7, c_kl=c_kl, meta_gradient="jvp")
    loss_a, ga = _grads(exact, batch)
    loss_b, gb = _grads(cheap, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert any(float(g.abs().max()) > 1e-6 for g in ga.values())
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=k)


def test_jvp_token_derivative_is_minus_alpha_over_n_times_the_gradient_dot() -> None:
    """dF/dw_t checked term by term against explicit per-token gradients."""
    base = _lm(0)
    doc, mask = _batch(1)[0][:1], _batch(1)[1][:1]
    mask[0, -2:] = 0
    theta0 = {k: v.detach() for k, v in base.named_parameters()}
    alpha = 0.5
    w = torch.rand(1, doc.shape[1], dtype=torch.float64, requires_grad=True)

    def logits(th):
        return torch.func.functional_call(base, th, (doc,), {"attention_mask": mask})

    th = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    g = torch.autograd.grad(weighted_lm_loss(logits(th), doc, w, mask), list(th.values()),
                            create_graph=True)
    theta1 = {k: v - alpha * gk for (k, v), gk in zip(th.items(), g)}
    f = (logits(theta1)[0, :, 2] ** 2).mean()  # any outer function of theta1
    v = torch.autograd.grad(f, list(theta1.values()), retain_graph=True)
    (dw,) = torch.autograd.grad(f, [w])
    n = float(mask[:, 1:].sum())
    for t in range(1, doc.shape[1]):
        lt = token_nll(logits(th), doc)[0, t - 1]
        gt = torch.autograd.grad(lt, list(th.values()))
        dot = sum((a * b).sum() for a, b in zip(v, gt))
        want = -(alpha / n) * float(mask[0, t]) * float(dot)
        assert float(dw[0, t]) == pytest.approx(want, rel=1e-9, abs=1e-14), t


def test_jvp_mode_refuses_what_it_cannot_do_exactly() -> None:
    base, weighting = _lm(0), _weighting()
    with pytest.raises(ValueError, match="inner_steps=1"):
        CaMeLS(base, weighting, inner_steps=2, meta_gradient="jvp")
    with pytest.raises(ValueError, match="meta_gradient"):
        CaMeLS(base, weighting, meta_gradient="fast")
    batch = _batch()
    batch[0], batch[1] = batch[0][:, None].expand(-1, 2, -1), batch[1][:, None].expand(-1, 2, -1)
    with pytest.raises(ValueError, match="docs_per_step=1 document"):
        CaMeLS(base, weighting, meta_gradient="jvp").meta_loss(*batch)


def test_adapt_freezes_the_other_parameters_and_jvp_stays_exact() -> None:
    """``adapt_params=["blocks."]``: θ₁ − θ₀ is 0 on embeddings/head, and the JVP meta-gradient
    (α masked: ⟨α⊙∇f(θ₁), ∇ℓ_t(θ₀)⟩) still equals the second-order one."""
    base, weighting, batch = _lm(0), _weighting(), _batch()
    exact = CaMeLS(base, weighting, inner_lr=0.7, estimator=Unrolled(), adapt_params=["blocks."])
    cheap = CaMeLS(base, weighting, inner_lr=0.7, meta_gradient="jvp", adapt_params=["blocks."])
    all_params = CaMeLS(base, weighting, inner_lr=0.7, estimator=Unrolled())
    _, ga = _grads(exact, batch)
    _, gb = _grads(cheap, batch)
    _, g_all = _grads(all_params, batch)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=k)
    assert any(float((ga[k] - g_all[k]).abs().max()) > 1e-6 for k in ga)
    theta0 = exact.base_parameters()
    theta1 = exact.adapt(batch[0], batch[1])
    for k in theta0:
        moved = float((theta1[k] - theta0[k]).abs().max())
        assert (moved > 0) == k.startswith("blocks."), k


def test_adapted_lr_masks_by_prefix_and_refuses_unknown_prefixes() -> None:
    from metaopt.algorithms.camels import adapted_lr

    names = ["tok.weight", "blocks.0.fc1.weight", "head.weight"]
    assert adapted_lr(names, 0.1, None) == 0.1
    assert adapted_lr(names, 0.1, []) == 0.1
    assert adapted_lr(names, 0.1, ["blocks."]) == {"tok.weight": 0.0,
                                                   "blocks.0.fc1.weight": 0.1,
                                                   "head.weight": 0.0}
    with pytest.raises(ValueError, match="adapt: prefix 'layers.'"):
        adapted_lr(names, 0.1, ["layers."])


def test_jvp_on_a_group_of_documents_equals_the_second_order_one() -> None:
    """docs_per_step=D: one SGD step on D documents together; the JVP formula holds
    with n the token count of the whole group."""
    base, weighting, batch = _lm(0), _weighting(), _batch()
    one_task = [batch[0][None], batch[1][None], batch[2].reshape(1, -1, 6),
                batch[3].reshape(1, -1, 6), batch[4].reshape(1, -1, 5),
                batch[5].reshape(1, -1, 5)]
    exact = CaMeLS(base, weighting, inner_lr=0.7, docs_per_step=3, estimator=Unrolled())
    cheap = CaMeLS(base, weighting, inner_lr=0.7, docs_per_step=3, meta_gradient="jvp")
    loss_a, ga = _grads(exact, one_task)
    loss_b, gb = _grads(cheap, one_task)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=k)
