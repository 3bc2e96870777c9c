"""checkpoint_layers: the same CaMeLS meta-gradient as no checkpointing, less saved memory."""

from __future__ import annotations

import copy

import pytest
import torch

from metaopt.algorithms.camels import CaMeLS, TokenWeighting
from metaopt.bilevel.task_batch import saved_tensor_bytes
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.models.checkpointing import CheckpointedLayer, checkpoint_layers
from metaopt.params import functional_call

V = 11


def _gpt2(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).double()


def _batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, V, (2, 8), generator=g)
    qa = torch.randint(0, V, (2, 1, 6), generator=g)
    ans = torch.zeros_like(qa)
    ans[..., 4:] = 1
    loc = torch.randint(0, V, (2, 1, 5), generator=g)
    return [doc, torch.ones_like(doc), qa, ans, loc, torch.ones_like(loc)]


@pytest.mark.slow  # importing transformers alone takes ~10 s of CPU
def test_checkpointed_hugging_face_layers_give_the_plain_meta_gradient() -> None:
    """Layers recomputed in backward with the inner θ passed explicitly: dF/dφ unchanged
    (transformers' gradient_checkpointing_enable() recomputes with the module's own
    weights under functional_call and gets it wrong)."""
    plain = _gpt2(0)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt.transformer.h)
    assert all(isinstance(layer, CheckpointedLayer) for layer in ckpt.transformer.h)
    torch.manual_seed(1)
    weighting = TokenWeighting(TinyLM(TinyLMConfig(vocab_size=V, d_model=8, n_layers=1,
                                                   n_heads=2, max_len=16)), width=8).double()
    with torch.no_grad():
        weighting.out.weight.normal_(std=0.5)
    batch = _batch()
    grads = []
    for base in (plain, ckpt):
        weighting.zero_grad(set_to_none=True)
        CaMeLS(base, weighting, inner_lr=1.0).meta_loss(*batch).backward()
        grads.append({k: p.grad.clone() for k, p in weighting.named_parameters()})
    assert max(g.abs().max() for g in grads[0].values()) > 1e-3
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-12, atol=1e-15)


@pytest.mark.slow  # importing transformers alone takes ~10 s of CPU
def test_checkpointed_layers_save_less_for_backward() -> None:
    plain = _gpt2(0)
    ckpt = checkpoint_layers(copy.deepcopy(plain).transformer.h)
    model = copy.deepcopy(plain)
    model.transformer.h = ckpt
    ids = torch.randint(0, V, (2, 12))
    _, plain_bytes = saved_tensor_bytes(lambda: plain(ids).logits.sum())
    _, ckpt_bytes = saved_tensor_bytes(lambda: model(ids).logits.sum())
    assert ckpt_bytes < plain_bytes
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


class _Stack(torch.nn.Module):
    """Residual tanh layers in a ModuleList (the shape of a decoder stack)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def _meta_grad(model: torch.nn.Module, lr: torch.Tensor, x, y) -> list[torch.Tensor]:
    """d/d(lr, θ₀) of f(θ₀ − lr ∇g(θ₀)) through functional_call (second order)."""
    theta = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}

    def loss(p):
        return (functional_call(model, p, (x,)) - y).square().mean()

    g = torch.autograd.grad(loss(theta), list(theta.values()), create_graph=True)
    new = {k: v - lr * gk for (k, v), gk in zip(theta.items(), g)}
    return list(torch.autograd.grad(loss(new), [lr, *theta.values()]))


def test_checkpointed_layers_give_the_same_second_order_gradient() -> None:
    torch.manual_seed(0)
    plain = _Stack().double()
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt.layers)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    a, b = _meta_grad(plain, lr, x, y), _meta_grad(ckpt, lr, x, y)
    assert a[0].abs() > 1e-4
    for ga, gb in zip(a, b):
        torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-15)
    _, plain_bytes = saved_tensor_bytes(lambda: plain(x).sum())
    _, ckpt_bytes = saved_tensor_bytes(lambda: ckpt(x).sum())
    assert ckpt_bytes < plain_bytes


def test_checkpoint_layers_needs_a_module_list() -> None:
    with pytest.raises(TypeError, match="ModuleList"):
        checkpoint_layers(torch.nn.Linear(2, 2))
