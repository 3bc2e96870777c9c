"""CaMeLS's token-weighting model: a weight for every token's language-model loss.

Hu et al. 2023 ("Meta-Learning Online Adaptation of Language Models"): a small
causal transformer reads the document; its last hidden state h_t goes through
``Linear(d, 128) → GELU → Linear(128, 1)`` (last layer zero-initialised), then
``softplus`` with β = 3 and a multiplication by the attention mask:

    w_t = softplus_β(MLP(h_t)) · m_t,   softplus_β(x) = log(1 + e^{βx}) / β.

At initialisation every real token gets softplus_3(0) = log 2 / 3. With
``normalize=True`` the weights of each sequence are rescaled to mean 1 over its
real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SOFTPLUS_BETA", "TokenWeighting", "backbone_hidden_states"]

#: β of the softplus, as in the reference.
SOFTPLUS_BETA = 3.0


def backbone_hidden_states(backbone: nn.Module, input_ids: Tensor,
                           attention_mask: Tensor | None) -> Tensor:
    """The backbone's last hidden states ``(B, T, d)``.

    A backbone with a ``hidden_states(input_ids, attention_mask)`` method (the
    project's :class:`~metaopt.models.TinyLM`) is called through it; any other
    (a Hugging Face causal LM) is called with ``output_hidden_states=True`` and its
    last entry of ``hidden_states`` is used.
    """
    method = getattr(backbone, "hidden_states", None)
    if callable(method):
        return method(input_ids, attention_mask)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def _hidden_size(backbone: nn.Module) -> int:
    size = getattr(backbone, "hidden_size", None)
    if size is None:
        size = getattr(getattr(backbone, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot read the hidden size of {type(backbone).__name__}; "
                         f"pass hidden_size=")
    return size


class TokenWeighting(nn.Module):
    """``weights = TokenWeighting(backbone)(input_ids, attention_mask)`` → ``(B, T)``.

    Args:
        backbone: a causal transformer (default use: a :class:`~metaopt.models.TinyLM`;
            any Hugging Face causal LM works, see :func:`backbone_hidden_states`).
        hidden_size: the backbone's hidden size (read from it when None).
        width: the head's hidden width (128 in the reference).
        normalize: rescale each sequence's weights to mean 1 over its real tokens.

    The head's last layer (weight and bias) starts at zero, so every real token
    starts with weight softplus_3(0) = log(2)/3 (1 with ``normalize``).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None, *,
                 width: int = 128, normalize: bool = False) -> None:
        super().__init__()
        d = _hidden_size(backbone) if hidden_size is None else hidden_size
        self.backbone = backbone
        self.hidden = nn.Linear(d, width)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Per-token loss weights ``(B, T)``, zero where ``attention_mask`` is 0."""
        h = backbone_hidden_states(self.backbone, input_ids, attention_mask)
        raw = self.out(F.gelu(self.hidden(h))).squeeze(-1)
        mask = (torch.ones_like(raw) if attention_mask is None
                else attention_mask.to(raw.dtype))
        weights = F.softplus(raw, beta=SOFTPLUS_BETA) * mask
        if self.normalize:
            weights = weights * mask.sum(-1, keepdim=True) / weights.sum(-1, keepdim=True)
        return weights
