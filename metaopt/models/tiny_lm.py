"""A small causal transformer language model, written for differentiating through.

Pre-LayerNorm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with learned absolute
positions and a GELU MLP, then a final LayerNorm and an untied output projection.
The attention is explicit math (``softmax(QKᵀ/√d_h + mask) V``), not
``scaled_dot_product_attention``, so grad-of-grad works on CPU (PyTorch's CPU flash
attention has no double backward).

Every block runs as the pure function :func:`block_forward` of its input and its
weight tensors, which are read from the module *at call time*: under
``torch.func.functional_call`` they are the substituted tensors. That is what makes
``checkpoint=True`` correct: :func:`torch.utils.checkpoint.checkpoint` receives the
weights as explicit arguments (``use_reentrant=False``), so the recomputation in
backward uses the same tensors as the forward pass, not the module's own weights
(which ``functional_call`` has restored by then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

__all__ = ["TinyLM", "TinyLMConfig", "block_forward"]


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of a :class:`TinyLM`.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream (the hidden size).
        n_layers: number of transformer blocks.
        n_heads: attention heads (must divide ``d_model``).
        max_len: the longest sequence (learned positions).
        mlp_ratio: MLP width = ``mlp_ratio * d_model``.
    """

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 128
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyLMConfig.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyLMConfig.n_heads={self.n_heads} must divide "
                             f"d_model={self.d_model}")


class _Block(nn.Module):
    """The weights of one pre-LN block (the math is :func:`block_forward`)."""

    def __init__(self, d: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d)

    def weights(self) -> tuple[Tensor, ...]:
        """The block's tensors in :func:`block_forward`'s order (read now)."""
        return (self.ln1.weight, self.ln1.bias, self.qkv.weight, self.qkv.bias,
                self.proj.weight, self.proj.bias, self.ln2.weight, self.ln2.bias,
                self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def block_forward(x: Tensor, allowed: Tensor, n_heads: int, ln1_w: Tensor, ln1_b: Tensor,
                  qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor, proj_b: Tensor,
                  ln2_w: Tensor, ln2_b: Tensor, fc1_w: Tensor, fc1_b: Tensor,
                  fc2_w: Tensor, fc2_b: Tensor) -> Tensor:
    """One pre-LN transformer block as a pure function of its input and weights.

    ``x``: ``(B, T, d)``; ``allowed``: boolean ``(B, 1, T, T)``, True where query
    position i may attend to key position j. Masked scores are set to the dtype's
    most negative finite value (not −inf), so a fully masked row gives a uniform
    average instead of NaN.
    """
    B, T, d = x.shape
    h = F.layer_norm(x, (d,), ln1_w, ln1_b)
    q, k, v = F.linear(h, qkv_w, qkv_b).split(d, dim=-1)
    dh = d // n_heads
    q, k, v = (t.reshape(B, T, n_heads, dh).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    att = torch.softmax(scores, dim=-1) @ v
    x = x + F.linear(att.transpose(1, 2).reshape(B, T, d), proj_w, proj_b)
    h = F.layer_norm(x, (d,), ln2_w, ln2_b)
    return x + F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


class TinyLM(nn.Module):
    """A causal transformer LM: ``model(input_ids, attention_mask=None) -> logits``.

    Args:
        config: the sizes (:class:`TinyLMConfig`).
        checkpoint: recompute each block in backward (gradient checkpointing with the
            block's weights passed explicitly; same numbers, less memory).

    ``input_ids``: int64 ``(B, T)``; ``attention_mask``: ``(B, T)`` of 0/1 (1: a real
    token), or None. Keys where the mask is 0 are not attended to. Returns float
    logits ``(B, T, vocab_size)``; :meth:`hidden_states` returns the final
    (LayerNorm'ed) hidden states ``(B, T, d_model)``.
    """

    def __init__(self, config: TinyLMConfig, *, checkpoint: bool = False) -> None:
        super().__init__()
        self.config = config
        self.checkpoint = checkpoint
        d = config.d_model
        self.tok = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_len, d)
        self.blocks = nn.ModuleList(_Block(d, config.mlp_ratio * d)
                                    for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    def _check(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer (batch, time) tensor, got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions; "
                             f"max_len is {self.config.max_len}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                             f"input_ids shape {tuple(input_ids.shape)}")

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The last hidden states ``(B, T, d_model)`` after the final LayerNorm."""
        self._check(input_ids, attention_mask)
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.expand(input_ids.shape[0], 1, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        heads = self.config.n_heads
        for block in self.blocks:
            weights = block.weights()
            if self.checkpoint and torch.is_grad_enabled():
                x = checkpoint_call(block_forward, x, allowed, heads, *weights,
                                    use_reentrant=False)
            else:
                x = block_forward(x, allowed, heads, *weights)
        return F.layer_norm(x, (x.shape[-1],), self.ln_f.weight, self.ln_f.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``(B, T, vocab_size)``."""
        return self.head(self.hidden_states(input_ids, attention_mask))
