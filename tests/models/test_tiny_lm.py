"""TinyLM: causality, grad-of-grad through an SGD step, functional_call, checkpointing."""

from __future__ import annotations

import pytest
import torch

from metaopt.models import TinyLM, TinyLMConfig
from metaopt.params import functional_call

CFG = TinyLMConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, max_len=12)


def _model(dtype=torch.float64, **kw) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(CFG, **kw).to(dtype)


def test_logits_shape_and_causality() -> None:
    """Changing token t changes no logit at positions < t."""
    model = _model()
    ids = torch.randint(0, 13, (2, 10))
    out = model(ids)
    assert out.shape == (2, 10, 13)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 13
    out2 = model(changed)
    torch.testing.assert_close(out2[:, :6], out[:, :6], rtol=0, atol=0)
    assert (out2[:, 6:] - out[:, 6:]).abs().max() > 1e-6


def test_masked_keys_are_ignored() -> None:
    """A key with mask 0 does not influence any other position."""
    model = _model()
    ids = torch.randint(0, 13, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 2] = 0
    other = ids.clone()
    other[0, 2] = (other[0, 2] + 5) % 13
    a, b = model(ids, mask), model(other, mask)
    keep = [i for i in range(8) if i != 2]
    torch.testing.assert_close(a[:, keep], b[:, keep], rtol=0, atol=1e-12)


def test_bad_inputs_name_the_field() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))
    with pytest.raises(ValueError, match="n_heads"):
        TinyLMConfig(vocab_size=5, d_model=6, n_heads=4)


def _one_step_outer(model: TinyLM, lr: torch.Tensor, ids: torch.Tensor,
                     query: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """f(θ − lr ∇g(θ)) with g, f next-token cross-entropies, by functional_call."""
    params = dict(model.named_parameters()) if params is None else params

    def lm_loss(p, x):
        logits = functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13),
                                                 x[:, 1:].reshape(-1))

    g = torch.autograd.grad(lm_loss(params, ids), list(params.values()), create_graph=True)
    new = {k: v - lr * gk for (k, v), gk in zip(params.items(), g)}
    return lm_loss(new, query)



@pytest.mark.parametrize("checkpoint", [False, True])
def test_grad_of_grad_through_sgd_step_matches_finite_differences(checkpoint: bool) -> None:
    """d/d(lr) f(θ − lr ∇g(θ)) by autograd (second order) equals a central difference."""
    model = _model(checkpoint=checkpoint)
    ids, query = torch.randint(0, 13, (2, 8)), torch.randint(0, 13, (2, 8))
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (dlr,) = torch.autograd.grad(_one_step_outer(model, lr, ids, query), lr)
    eps = 1e-5
    up = _one_step_outer(model, lr.detach() + eps, ids, query).detach()
    down = _one_step_outer(model, lr.detach() - eps, ids, query).detach()
    torch.testing.assert_close(dlr, (up - down) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_functional_call_parity() -> None:
    """functional_call with the module's own tensors equals a plain call; with other
    tensors it equals a module that holds them."""
    model = _model()
    ids = torch.randint(0, 13, (3, 9))
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (ids,)), model(ids),
                               rtol=0, atol=0)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.testing.assert_close(functional_call(model, dict(other.named_parameters()), (ids,)),
                               other(ids), rtol=0, atol=0)


def test_checkpointed_equals_plain_under_functional_call() -> None:
    """Second-order gradients with checkpointing equal those without, under functional_call
    with tensors that are NOT the module's own (the recomputation must use them)."""
    plain, ckpt = _model(), _model(checkpoint=True)
    torch.manual_seed(1)
    theta = {k: (v.detach() + 0.2 * torch.randn_like(v)).requires_grad_()
             for k, v in plain.named_parameters()}
    ids, query = torch.randint(0, 13, (2, 8)), torch.randint(0, 13, (2, 8))
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    grads = []
    for model in (plain, ckpt):
        outer = _one_step_outer(model, lr, ids, query, theta)
        grads.append(torch.autograd.grad(outer, [lr, *theta.values()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
