"""Parameters as name→tensor dicts, and calling a module with them.

Every part of metaopt speaks in ``Params`` — a plain ``dict[str, Tensor]`` keyed by
the names ``nn.Module.named_parameters()`` gives (the tree algebra over such dicts,
and over nested dicts, lives in :mod:`metaopt.tree` and is re-exported here). Any unmodified module
becomes a pure function of such a dict through :func:`functional_call`; nothing is
patched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metaopt.errors import NonFiniteError, StructureError
from metaopt.tree import (
    check_same_structure,
    tree_add,
    tree_axpy,
    tree_clone,
    tree_detach,
    tree_dot,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_numel,
    tree_requires_grad,
    tree_scale,
    tree_sub,
    tree_unflatten,
    tree_zeros_like,
)

Params = dict[str, Tensor]

__all__ = [
    "NonFiniteError",
    "Params",
    "StructureError",
    "buffers_of",
    "check_finite",
    "check_same_structure",
    "functional_call",
    "parameters_of",
    "tree_add",
    "tree_axpy",
    "tree_clone",
    "tree_detach",
    "tree_dot",
    "tree_flatten",
    "tree_map",
    "tree_norm",
    "tree_numel",
    "tree_requires_grad",
    "tree_scale",
    "tree_sub",
    "tree_unflatten",
    "tree_zeros_like",
]


def parameters_of(module: nn.Module, *, detach: bool = False) -> Params:
    """The module's parameters as a dict (the live tensors unless ``detach``)."""
    return {
        name: (p.detach().clone().requires_grad_(p.requires_grad) if detach else p)
        for name, p in module.named_parameters()
    }


def buffers_of(module: nn.Module) -> Params:
    """The module's buffers (BatchNorm running stats, …) as a dict."""
    return dict(module.named_buffers())


def functional_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple | Tensor,
    kwargs: dict | None = None,
    *,
    buffers: Mapping[str, Tensor | None] | None = None,
    strict: bool = True,
):
    """Call ``module`` with ``params`` (and ``buffers``) in place of its own tensors.

    The one wrapper of ``torch.func.functional_call`` in metaopt (the algorithms'
    ``FunctionalModel`` calls it too). ``buffers`` may map a buffer to None: the module
    then runs without it (how training-mode BatchNorm is kept from updating running
    statistics). Where a name is in both, ``params`` wins. Tensors not given are the
    module's own. With ``strict`` every parameter of the module must be supplied, so a
    typo in a key fails loudly instead of silently using the module's own weights.
    """
    if strict:
        expected = {name for name, _ in module.named_parameters()}
        missing = sorted(expected - params.keys())
        unexpected = sorted(params.keys() - expected - set(dict(module.named_buffers())))
        if missing or unexpected:
            raise StructureError(
                f"functional_call on {type(module).__name__}: "
                f"missing parameters {missing}, unexpected {unexpected}"
            )
    tensors = {} if buffers is None else dict(buffers)
    tensors.update(params)
    if isinstance(args, Tensor):
        args = (args,)
    return torch.func.functional_call(module, tensors, args, kwargs or {}, strict=False)


def check_finite(tree: Mapping[str, Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor holding NaN/inf."""
    for k, v in tree.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            kind = "NaN" if bool(torch.isnan(v).any()) else "inf"
            raise NonFiniteError(f"{kind} in '{k}' {where}")
