"""μLO: learned optimizers meta-trained under μP (Thérien et al., 2024).

"μLO: Compute-Efficient Meta-Generalization of Learned Optimizers" meta-trains small_fc
and VeLO-style optimizers on task models in μP (:mod:`metaopt.lopt.mup`) and, when they
step a tensor, multiplies the learned step by that tensor's μP update scale — the same
rule ``mup.MuAdam`` applies to learning rates:

* hidden ("matrix-like", two width-sized axes) weights: ``step / width_mult`` where
  ``width_mult = fan_in / base_fan_in``;
* input weights, biases and the readout weight (whose forward pass is already divided
  by ``width_mult``): the step unchanged.

With this, the per-coordinate change of every pre-activation is width-independent, so an
optimizer meta-trained at width 128 keeps working at width 8192 (the paper's claim).

A tensor's scale comes from the ``mup_scales`` argument of ``init`` (a float or a
:class:`~metaopt.lopt.mup.MuPInfo` per name; e.g. :meth:`~metaopt.lopt.mup.MuMLP.mup_scales`),
else 1 (standard parametrisation); the torch.optim shell takes them in parameter order
(``lopt.optimizer(model.parameters(), n, mup_scales=[...])``). Scales are stored per
tensor in ``state["mup_scale"]`` and so follow ``state_dict``.

Architectures: ``mulo_velo`` (exactly ``new_p = p - lr_mult * step * scale`` as
``MuHyperV2`` in the authors' code; imports ``MuHyperV2`` releases) and
``mulo_small_fc`` (small_fc_lopt's step, rescaled as ``p - scale * (p - p_small_fc)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.lopt.base import LOptState, register_architecture
from metaopt.lopt.mup import MuPInfo
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO
from metaopt.params import Params

__all__ = ["MuSmallFC", "MuVeLO", "resolve_mup_scales"]


def resolve_mup_scales(params: Params, mup_scales: Mapping[str, float | MuPInfo] | None = None
                       ) -> dict[str, float]:
    """Per-tensor μP update scale: the given value (or :class:`MuPInfo`), else 1."""
    out = {}
    for key in params:
        given = None if mup_scales is None else mup_scales.get(key)
        if isinstance(given, MuPInfo):
            given = given.update_scale
        out[key] = 1.0 if given is None else float(given)
        if not out[key] > 0:
            raise ValueError(f"μP update scale of '{key}' must be positive, got {out[key]}")
    return out


def _shell_init_kwargs(kw: dict[str, Any], mup_scales: Sequence[float | MuPInfo] | None
                       ) -> dict[str, Any]:
    """The shell's ``init_kwargs`` with scales given in parameter order (names "0", "1", …)."""
    if mup_scales is None:
        return kw
    if isinstance(mup_scales, Mapping):
        raise TypeError("optimizer(mup_scales=...) takes one scale per parameter, in the "
                        "order of params (e.g. list(model.mup_scales().values()))")
    init_kwargs = dict(kw.pop("init_kwargs", None) or {})
    init_kwargs["mup_scales"] = {str(i): s for i, s in enumerate(mup_scales)}
    return {**kw, "init_kwargs": init_kwargs}


def _scale_state(params: Params, scales: Mapping[str, float]) -> dict[str, Tensor]:
    return {k: torch.tensor(scales[k], dtype=torch.float32, device=p.device)
            for k, p in params.items()}


@register_architecture
class MuVeLO(VeLO):
    """VeLO whose per-tensor step is multiplied by the tensor's μP update scale."""

    architecture = "mulo_velo"
    release_names = ("MuHyperV2",)

    def init(self, params: Params, num_steps: int,
             mup_scales: Mapping[str, float | MuPInfo] | None = None) -> LOptState:
        state = super().init(params, num_steps)
        state["mup_scale"] = _scale_state(params, resolve_mup_scales(params, mup_scales))
        return state

    def optimizer(self, params: Any, num_steps: int, *,
                  mup_scales: Sequence[float | MuPInfo] | None = None, **kw: Any):
        """The torch.optim shell; ``mup_scales``: one μP scale per parameter, in order."""
        return super().optimizer(params, num_steps, **_shell_init_kwargs(kw, mup_scales))

    def _update_scales(self, state: LOptState, keys: list[str]) -> list[Tensor | float]:
        return [state["mup_scale"][k] for k in keys]

    def _step(self, grads, state, params, loss, kern, inplace=None, workspace=None):
        new_params, new_state, internals = super()._step(grads, state, params, loss, kern,
                                                         inplace, workspace)
        new_state["mup_scale"] = {k: state["mup_scale"][k] for k in params}
        return new_params, new_state, internals


@register_architecture
class MuSmallFC(SmallFCLOpt):
    """small_fc_lopt whose per-tensor step is multiplied by the μP update scale."""

    architecture = "mulo_small_fc"
    release_names = ()

    def init(self, params: Params, num_steps: int,
             mup_scales: Mapping[str, float | MuPInfo] | None = None) -> LOptState:
        state = dict(super().init(params, num_steps))
        state["mup_scale"] = _scale_state(params, resolve_mup_scales(params, mup_scales))
        return state

    def optimizer(self, params: Any, num_steps: int, *,
                  mup_scales: Sequence[float | MuPInfo] | None = None, **kw: Any):
        """The torch.optim shell; ``mup_scales``: one μP scale per parameter, in order."""
        return super().optimizer(params, num_steps, **_shell_init_kwargs(kw, mup_scales))

    def _step_scale(self, state: LOptState, name: str) -> Tensor | float:
        return state["mup_scale"][name]
