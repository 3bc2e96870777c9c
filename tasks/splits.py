"""Seeded, reproducible splits: of classes (meta-learning) and of examples (plain learning).

* :func:`split_classes` — a seeded random split of class ids with fixed sizes.
* :func:`split_classes_by_group` — whole groups (alphabets, scripts) go to one split,
  as in Omniglot's background/evaluation alphabets.
* :func:`stratified_split` — example indices split with the class proportions kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tasks.dataset import ClassSplits

__all__ = ["split_classes", "split_classes_by_group", "stratified_split"]


def split_classes(num_classes: int, sizes: tuple[int, int, int], seed: int = 0) -> ClassSplits:
    """Seeded random split of ``range(num_classes)`` into train/val/test of ``sizes``."""
    if any(s < 0 for s in sizes) or sum(sizes) > num_classes:
        raise ValueError(f"split sizes {sizes} need {sum(sizes)} classes; only "
                         f"{num_classes} exist")
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b, c = sizes
    return ClassSplits(train=tuple(sorted(order[:a])), val=tuple(sorted(order[a:a + b])),
                       test=tuple(sorted(order[a + b:a + b + c])))


def split_classes_by_group(groups: Sequence[str],
                           assignment: Mapping[str, str]) -> ClassSplits:
    """Assign each class to the split its group is mapped to (``"train"|"val"|"test"``).

    Groups missing from ``assignment`` are left out of every split.
    """
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for split in assignment.values():
        if split not in out:
            raise ValueError(f"unknown split '{split}' in assignment; use train, val, test")
    for cls, group in enumerate(groups):
        if group in assignment:
            out[assignment[group]].append(cls)
    return ClassSplits(**out)


def stratified_split(labels: Tensor, sizes: tuple[int, ...], seed: int = 0
                     ) -> tuple[Tensor, ...]:
    """Split example indices into parts of exactly ``sizes``, each with the class mix of
    ``labels`` (largest-remainder rounding per class), disjoint and seeded.

    Returns one sorted ``LongTensor`` of indices per part.
    """
    labels = torch.as_tensor(labels).long()
    n = labels.numel()
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} need {sum(sizes)} examples; only {n} exist")
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    # Per part, how many of each class: proportional, then largest remainders to hit size.
    quotas = []
    remaining = counts.clone()
    for size in sizes:
        exact = counts.double() * size / n
        take = torch.minimum(exact.floor().long(), remaining)
        short = size - int(take.sum())
        order = torch.argsort(exact - exact.floor(), descending=True, stable=True)
        for idx in order.tolist():
            if short == 0:
                break
            if take[idx] < remaining[idx]:
                take[idx] += 1
                short -= 1
        if short:
            for idx in range(len(classes)):  # rare: rounding exhausted some classes
                extra = min(short, int(remaining[idx] - take[idx]))
                take[idx] += extra
                short -= extra
        remaining -= take
        quotas.append(take)
    parts: list[list[Tensor]] = [[] for _ in sizes]
    for ci, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        start = 0
        for p, take in enumerate(quotas):
            k = int(take[ci])
            parts[p].append(members[start:start + k])
            start += k
    return tuple(torch.sort(torch.cat(p)).values if p else torch.empty(0, dtype=torch.long)
                 for p in parts)
