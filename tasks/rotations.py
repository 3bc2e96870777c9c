"""Class augmentation by rotation: every class also appears rotated by 90°, 180°, 270°
as new classes (Santoro et al., 2016; common for Omniglot), quadrupling the classes.

Rotated copies stay in their source class's split, so splits remain disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tasks.dataset import ClassSplits, LabelledDataset

__all__ = ["rotate_classes"]


def rotate_classes(dataset: LabelledDataset, angles: Sequence[int] = (0, 90, 180, 270)
                   ) -> LabelledDataset:
    """A dataset with one class per (source class, angle); images ``[N, ..., H, W]`` are
    rotated counter-clockwise in the last two axes (``H == W``).

    New class id = ``a · C + c`` for angle index ``a`` and source class ``c``; names get
    ``"@<angle>"`` appended.
    """
    if not angles or any(a % 90 for a in angles) or len(set(angles)) != len(angles):
        raise ValueError(f"angles must be distinct multiples of 90, got {tuple(angles)}")
    images = dataset.images
    if images.dim() < 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{dataset.name}: images must be square in the last two axes, got "
                         f"{tuple(images.shape)}")
    c = dataset.num_classes
    stacked = torch.cat([torch.rot90(images, (a // 90) % 4, dims=(-2, -1)) for a in angles])
    labels = torch.cat([dataset.labels.long() + i * c for i in range(len(angles))])
    names = tuple(f"{n}@{a}" for a in angles for n in dataset.class_names)
    groups = None if dataset.groups is None else tuple(dataset.groups) * len(angles)
    splits = None
    if dataset.splits is not None:
        splits = ClassSplits(**{name: tuple(cls + i * c for i in range(len(angles))
                                            for cls in ids)
                                for name, ids in dataset.splits.as_dict().items()})
    return LabelledDataset(images=stacked, labels=labels, class_names=names, groups=groups,
                           splits=splits, name=f"{dataset.name}+rot",
                           metadata=dict(dataset.metadata))
