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

Where a tensor's scale comes from, in order: the ``mup_scales`` argument of ``init``;
the :class:`~metaopt.lopt.mup.MuPInfo` attached to the tensor by
:func:`~metaopt.lopt.mup.attach_mup_info` (so ``lopt.optimizer(model.parameters())``
works for a :class:`~metaopt.lopt.mup.MuMLP` as is); else 1 (standard parametrisation).
Scales are stored per tensor in ``state["mup_scale"]`` and so follow ``state_dict``.

Architectures: ``mulo_velo`` (exactly ``new_p = p - lr_mult * step * scale`` as
``MuHyperV2`` in the authors' code; imports ``MuHyperV2`` releases) and
``mulo_small_fc`` (small_fc_lopt's step, rescaled as ``p - scale * (p - p_small_fc)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaopt.lopt.base import LOptState, register_architecture
from metaopt.lopt.mup import MuPInfo, mup_info_of
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO
from metaopt.params import Params

__all__ = ["MuSmallFC", "MuVeLO", "resolve_mup_scales"]


def resolve_mup_scales(params: Params, mup_scales: Mapping[str, float | MuPInfo] | None = None
                       ) -> dict[str, float]:
    """Per-tensor μP update scale: explicit value, attached :class:`MuPInfo`, or 1."""
    out = {}
    for key, p in params.items():
        given = None if mup_scales is None else mup_scales.get(key)
        if given is None:
            given = mup_info_of(p)
        if isinstance(given, MuPInfo):
            given = given.update_scale
        out[key] = 1.0 if given is None else float(given)
        if not out[key] > 0:
            raise ValueError(f"μP update scale of '{key}' must be positive, got {out[key]}")
    return out


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

    def _step_scale(self, state: LOptState, name: str) -> Tensor | float:
        return state["mup_scale"][name]
