"""The CaMeLS base model on disk: a :class:`~metaopt.models.TinyLM` and its tokenizer.

A base-model directory holds

* ``tokenizer.json`` — :meth:`metaopt.text.Tokenizer.save` (atomic);
* ``checkpoint/step_<n>/`` — a runner checkpoint (:func:`~metaopt.runner.checkpoint.
  write_checkpoint`: safetensors + JSON, sha256 manifest, atomic directory rename) whose
  state is ``{"model": state_dict}`` and whose config records the model sizes, how it
  was trained and the tokenizer file's sha256.

:func:`load_base_lm` verifies the checkpoint (checksums, shapes through a strict
``load_state_dict``) and that the tokenizer is the one the model was trained with. No
second checkpoint format, nothing pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from metaopt.errors import CheckpointError
from metaopt.fileio import sha256_hex
from metaopt.models import TinyLM, TinyLMConfig
from metaopt.runner.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from metaopt.text import Tokenizer

__all__ = ["BASE_LM_KIND", "load_base_lm", "save_base_lm"]

#: The ``experiment`` field of a base-model checkpoint.
BASE_LM_KIND = "tiny_lm"
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoint"


def save_base_lm(directory: str | Path, model: TinyLM, tokenizer: Tokenizer, *, step: int,
                 training: Mapping[str, Any]) -> Path:
    """Write ``model`` and ``tokenizer`` under ``directory``; returns the checkpoint path.

    ``training``: JSON-able facts about how the model was trained (kept in the config).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / TOKENIZER)
    config = {"model": asdict(model.config), "training": dict(training),
              "tokenizer_sha256": sha256_hex((directory / TOKENIZER).read_bytes())}
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return write_checkpoint(directory / CHECKPOINTS, step=step, experiment=BASE_LM_KIND,
                            config=config, state=state)


def load_base_lm(directory: str | Path) -> tuple[TinyLM, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, config)`` from a directory :func:`save_base_lm` wrote.

    Raises :class:`~metaopt.errors.CheckpointError` naming the file for a missing or
    corrupt checkpoint, a checkpoint of something else, or a tokenizer that is not the
    one recorded in it.
    """
    directory = Path(directory)
    path = latest_checkpoint(directory / CHECKPOINTS)
    if path is None:
        raise CheckpointError(f"{directory / CHECKPOINTS}: no base-model checkpoint (train "
                              f"one with scripts/train_tiny_lm.py)")
    ckpt = read_checkpoint(path)
    if ckpt.experiment != BASE_LM_KIND:
        raise CheckpointError(f"{path}: field 'experiment' is {ckpt.experiment!r}, not a "
                              f"{BASE_LM_KIND!r} base model")
    tok_path = directory / TOKENIZER
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: missing tokenizer")
    if sha256_hex(tok_path.read_bytes()) != ckpt.config.get("tokenizer_sha256"):
        raise CheckpointError(f"{tok_path}: sha256 differs from the checkpoint's "
                              f"'tokenizer_sha256' (not the tokenizer the model was trained with)")
    tokenizer = Tokenizer.load(tok_path)
    try:
        model = TinyLM(TinyLMConfig(**ckpt.config["model"]))
        model.load_state_dict(ckpt.state["model"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: field 'model': {e}") from None
    if model.config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{path}: vocab_size {model.config.vocab_size} != the "
                              f"tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer, ckpt.config
