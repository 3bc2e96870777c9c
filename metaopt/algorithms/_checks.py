"""Input checks for meta-batches: clear errors that name the offending tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["check_labels", "check_meta_batch", "check_outputs", "check_task"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _require_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_meta_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor | None,
                     query_y: Tensor | None) -> int:
    """Validate ``(tasks, examples, ...)`` tensors; return the number of tasks.

    Every tensor needs a leading task axis and an example axis; x and y of one set
    agree on both; support and query agree on the number of tasks and on the
    per-example feature shape of x.
    """
    named = [("support_x", support_x), ("support_y", support_y)]
    if query_x is not None or query_y is not None:
        named += [("query_x", query_x), ("query_y", query_y)]
    for name, t in named:
        _require_tensor(t, name)
        if t.dim() < 2:
            raise ValueError(
                f"{name} has shape {_shape(t)}: expected a leading task axis "
                f"(tasks, examples, ...); for a single task use x.unsqueeze(0)")
    tasks = support_x.shape[0]
    for name, t in named:
        if t.shape[0] != tasks:
            raise ValueError(f"{name} has {t.shape[0]} tasks (shape {_shape(t)}) but "
                             f"support_x has {tasks} (shape {_shape(support_x)})")
    if tasks == 0:
        raise ValueError("support_x has no tasks (task axis of size 0)")
    for name, t in named[::2]:
        if t.dim() < 3:
            raise ValueError(
                f"{name} has shape {_shape(t)}: expected (tasks, examples, features...); "
                f"a scalar input per example is (tasks, examples, 1) (x.unsqueeze(-1)), "
                f"a single task is x.unsqueeze(0)")
    pairs = [("support", support_x, support_y)]
    if query_x is not None:
        pairs.append(("query", query_x, query_y))
    for which, x, y in pairs:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{which}_x has {x.shape[1]} examples per task (shape "
                             f"{_shape(x)}) but {which}_y has {y.shape[1]} (shape {_shape(y)})")
        if x.shape[1] == 0:
            raise ValueError(f"{which}_x has no examples (shape {_shape(x)})")
        if not x.is_floating_point():
            raise TypeError(f"{which}_x has dtype {x.dtype}; inputs must be floating point")
    if query_x is not None and support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(f"support_x examples have shape {_shape(support_x)[2:]} but query_x "
                         f"examples have shape {_shape(query_x)[2:]}")
    if query_y is not None and support_y.shape[2:] != query_y.shape[2:]:
        raise ValueError(f"support_y targets have shape {_shape(support_y)[2:]} but query_y "
                         f"targets have shape {_shape(query_y)[2:]}")
    return tasks


def check_task(x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    """Validate one task's ``(examples, ...)`` inputs and targets."""
    _require_tensor(x, names[0])
    _require_tensor(y, names[1])
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{names[0]} has shape {_shape(x)} and {names[1]} has shape "
                         f"{_shape(y)}: they must agree on the leading (examples) axis")
    if x.shape[0] == 0:
        raise ValueError(f"{names[0]} has no examples (shape {_shape(x)})")
    if x.dim() < 2:
        raise ValueError(f"{names[0]} has shape {_shape(x)}: expected (examples, "
                         f"features...); a scalar input per example is (examples, 1) "
                         f"(x.unsqueeze(-1))")


def _output_shape(forward: Callable[[Tensor], Tensor], example: Tensor,
                  cache: dict) -> tuple[int, ...]:
    """The model's output shape on one task's inputs (one forward per input signature)."""
    key = (tuple(example.shape), example.dtype, example.device)
    if key not in cache:
        with torch.no_grad():
            cache[key] = tuple(forward(example).shape)
    return cache[key]


#: torch losses that compare output and target element by element (and broadcast them,
#: with only a warning, when their shapes differ).
_ELEMENTWISE = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, nn.MSELoss, nn.L1Loss,
                nn.SmoothL1Loss, nn.HuberLoss)
#: torch losses with the class axis at dim 1 of the output and class-index targets.
_CLASSWISE = (F.cross_entropy, F.nll_loss, nn.CrossEntropyLoss, nn.NLLLoss)


def _is(loss_fn: object, kinds: tuple) -> bool:
    return any(loss_fn is k or (isinstance(k, type) and isinstance(loss_fn, k)) for k in kinds)


def check_outputs(forward: Callable[[Tensor], Tensor], example: Tensor,
                  targets: list[tuple[str, Tensor]], cache: dict, loss_fn: object = None, *,
                  task_axis: bool = True) -> None:
    """The model's output must line up with the targets, example by example.

    ``example`` is one task's inputs ``(examples, ...)``; each target has a leading
    task axis when ``task_axis``. The output needs one row per example. For torch's
    elementwise regression losses (``mse_loss``, ``l1_loss``, …), targets must have
    exactly the output's per-example shape — a 3-output model against 1-D targets is
    an error here, not a broadcasting warning; for ``cross_entropy``/``nll_loss`` with
    class-index targets, the output's shape without its class axis (dim 1). Other loss
    functions get only the row check.
    """
    out = _output_shape(forward, example, cache)
    n = example.shape[0]
    if not out or out[0] != n:
        raise ValueError(f"the model's output has shape {out} for a task's inputs of shape "
                         f"{_shape(example)}: expected one row per example ({n}); check the "
                         f"task axis of the inputs")
    for name, y in targets:
        per_example = _shape(y)[2:] if task_axis else _shape(y)[1:]
        if _is(loss_fn, _ELEMENTWISE) and per_example != out[1:]:
            raise ValueError(
                f"{name} has per-example shape {per_example} but the model outputs "
                f"{out[1:]} per example: regression targets must match the output "
                f"exactly (e.g. targets (tasks, examples, 1) for one output)")
        if (_is(loss_fn, _CLASSWISE) and not y.is_floating_point()
                and per_example != out[2:]):
            raise ValueError(f"{name} has per-example shape {per_example} but the model "
                             f"outputs {out[1:]} per example: class labels need the output's "
                             f"shape without its class axis, {out[2:]}")


def check_labels(forward: Callable[[Tensor], Tensor], example: Tensor,
                 labels: list[tuple[str, Tensor]], cache: dict) -> None:
    """Integer labels must lie in ``[0, classes)`` for the model's output width.

    The width is found once per input shape with one forward pass on a single
    example (cached), so mistakes like 5-way labels on a 4-output head or labels
    that were never remapped to ``0..N-1`` fail here with the tensor named instead
    of deep inside ``cross_entropy`` (or not at all).
    """
    int_labels = [(n, y) for n, y in labels if not y.is_floating_point() and not y.is_complex()]
    if not int_labels:
        return
    out = _output_shape(forward, example, cache)
    classes = out[-1] if out else None
    for name, y in int_labels:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise ValueError(f"{name} contains label {lo}; class labels must be >= 0")
        if classes is not None and hi >= classes:
            raise ValueError(f"{name} contains label {hi} but the model outputs {classes} "
                             f"classes (labels must be in [0, {classes - 1}])")
