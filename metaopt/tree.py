"""Trees of tensors: the one module for maps, algebra and flattening over them.

Two kinds of trees appear in metaopt, and both are handled here:

* **flat** parameter dicts (``Params``: ``{name: Tensor}``), with the leaf-wise
  algebra the estimators and solvers need (:func:`tree_add`, :func:`tree_dot`, …);
* **nested** dicts of tensors (optimizer states, checkpoint states, learned-optimizer
  states: dicts of dicts of tensors, with plain numbers/strings/None as static
  leaves), handled by :func:`tree_map_nested`, :func:`tree_leaves` and
  :func:`tree_rebuild`.

Every room uses these instead of writing its own recursion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from metaopt.errors import StructureError

Params = dict[str, Tensor]
#: A static (non-tensor) leaf of a nested tree: kept as is by maps and flattening.
STATIC_LEAVES = (bool, int, float, str, type(None))

__all__ = [
    "Params",
    "check_same_structure",
    "tree_add",
    "tree_axpy",
    "tree_clone",
    "tree_detach",
    "tree_dot",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_map_like",
    "tree_map_nested",
    "tree_norm",
    "tree_numel",
    "tree_rebuild",
    "tree_requires_grad",
    "tree_scale",
    "tree_sub",
    "tree_unflatten",
    "tree_zeros_like",
]


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



# --------------------------------------------------------------------------- nested trees


def tree_leaves(tree: Any, prefix: str = "") -> tuple[list[str], list[Tensor]]:
    """The tensor leaves of a nested dict, in insertion order, with ``a/b/c`` paths.

    Static leaves (numbers, strings, None) are skipped; any other leaf type is refused
    with its path, since such a tree could not be saved without pickling.
    """
    keys: list[str] = []
    values: list[Tensor] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{path}{k}/")
        elif isinstance(node, Tensor):
            keys.append(path.rstrip("/"))
            values.append(node)
        elif not isinstance(node, STATIC_LEAVES):
            raise TypeError(f"tree leaf '{path.rstrip('/')}' is a {type(node).__name__}; "
                            f"trees hold dicts, tensors, numbers, strings and None")

    visit(tree, prefix)
    return keys, values


def tree_rebuild(like: Any, values: list[Tensor]) -> Any:
    """``like`` with its tensor leaves replaced, in order, by ``values``."""
    it = iter(values)

    def build(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, Tensor):
            return next(it)
        return node

    out = build(like)
    if next(it, None) is not None:
        raise StructureError("more values than tensor leaves in the tree")
    return out


def tree_map_nested(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a nested dict; static leaves are kept."""
    if isinstance(tree, Mapping):
        return {k: tree_map_nested(fn, v) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        return fn(tree)
    return tree


def tree_map_like(fn: Callable[[Tensor, Tensor], Any], tree: Any, like: Any) -> Any:
    """``fn(leaf, like_leaf)`` on every tensor leaf of ``tree`` whose counterpart in
    ``like`` (same path through dicts and lists) is a tensor; everything else is kept.

    The two trees are expected to have one structure (check it first, e.g. with the
    runner's ``check_state_matches``); where they differ, ``tree`` is kept as is.
    """
    if isinstance(tree, Tensor):
        return fn(tree, like) if isinstance(like, Tensor) else tree
    if isinstance(tree, Mapping) and isinstance(like, Mapping):
        return {k: tree_map_like(fn, v, like[k]) if k in like else v for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and isinstance(like, (list, tuple)) \
            and len(tree) == len(like):
        return [tree_map_like(fn, a, b) for a, b in zip(tree, like)]
    return tree


# --------------------------------------------------------------------------- flat trees


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
