"""Parameters as name→tensor dicts, and the small tree algebra over them.

Every part of metaopt speaks in ``Params`` — a plain ``dict[str, Tensor]`` keyed by
the names ``nn.Module.named_parameters()`` gives. Any unmodified module becomes a
pure function of such a dict through :func:`functional_call`; nothing is patched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

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


class StructureError(ValueError):
    """Two parameter dicts that should match do not (keys, shapes or dtypes)."""


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared; the message names the tensor and where."""


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
    buffers: Mapping[str, Tensor] | None = None,
    strict: bool = True,
):
    """Call ``module`` with ``params`` (and ``buffers``) in place of its own tensors.

    With ``strict`` every parameter of the module must be supplied, so a typo in a
    key fails loudly instead of silently using the module's own weights.
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
    tensors = dict(params)
    if buffers is not None:
        tensors.update(buffers)
    if isinstance(args, Tensor):
        args = (args,)
    return torch.func.functional_call(module, tensors, args, kwargs or {}, strict=False)


def check_same_structure(a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                         names: tuple[str, str] = ("a", "b"), *, shapes: bool = True) -> None:
    """Raise :class:`StructureError` naming the keys/shapes where ``a`` and ``b`` differ."""
    missing = sorted(a.keys() - b.keys())
    extra = sorted(b.keys() - a.keys())
    problems = []
    if missing:
        problems.append(f"keys in {names[0]} but not {names[1]}: {missing}")
    if extra:
        problems.append(f"keys in {names[1]} but not {names[0]}: {extra}")
    if shapes:
        for k in sorted(a.keys() & b.keys()):
            if a[k].shape != b[k].shape:
                problems.append(
                    f"'{k}' has shape {tuple(a[k].shape)} in {names[0]} "
                    f"but {tuple(b[k].shape)} in {names[1]}"
                )
    if problems:
        raise StructureError("; ".join(problems))


def check_finite(tree: Mapping[str, Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor holding NaN/inf."""
    for k, v in tree.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            kind = "NaN" if bool(torch.isnan(v).any()) else "inf"
            raise NonFiniteError(f"{kind} in '{k}' {where}")


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor],
             *rest: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` leaf-wise over dicts with identical keys."""
    for i, other in enumerate(rest):
        if other.keys() != tree.keys():
            check_same_structure(tree, other, ("first tree", f"tree {i + 2}"), shapes=False)
    return {k: fn(v, *(o[k] for o in rest)) for k, v in tree.items()}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return tree_map(torch.add, a, b)


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return tree_map(torch.sub, a, b)


def tree_scale(a: Mapping[str, Tensor], s: float | Tensor) -> Params:
    return {k: v * s for k, v in a.items()}


def tree_axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``alpha * x + y`` leaf-wise."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Sum over leaves of the elementwise products (the Euclidean inner product)."""
    terms = [torch.sum(a[k] * b[k]) for k in a]
    if len(a.keys() ^ b.keys()):
        check_same_structure(a, b, shapes=False)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of all leaves."""
    return torch.sqrt(tree_dot(a, a))


def tree_zeros_like(a: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_detach(a: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in a.items()}


def tree_clone(a: Mapping[str, Tensor]) -> Params:
    return {k: v.clone() for k, v in a.items()}


def tree_requires_grad(a: Mapping[str, Tensor], flag: bool = True) -> Params:
    """Detached copies that are fresh autograd leaves (``requires_grad=flag``)."""
    return {k: v.detach().clone().requires_grad_(flag) for k, v in a.items()}


def tree_numel(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def tree_flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate all leaves (in key order) into one vector."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def tree_unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`tree_flatten` with shapes taken from ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i:i + n].reshape(v.shape)
        i += n
    if i != vec.numel():
        raise StructureError(f"vector has {vec.numel()} elements, tree needs {i}")
    return out
