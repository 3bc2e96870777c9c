"""A labelled dataset as plain tensors, plus its class splits.

:class:`LabelledDataset` is what every offline loader returns and what the episodic
sampler consumes: ``images [N, ...]`` (any dtype; ``uint8`` means 0..255 intensity),
``labels [N]`` integer class ids in ``0..num_classes-1``, one name per class and,
optionally, one group per class (an alphabet or script) and named class splits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassSplits", "LabelledDataset"]


@dataclass(frozen=True)
class ClassSplits:
    """Disjoint meta-train/val/test class ids — class splits as data."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))
        seen: dict[int, str] = {}
        for name in ("train", "val", "test"):
            for c in getattr(self, name):
                if c in seen:
                    raise ValueError(f"class {c} is in both the {seen[c]} and the {name} split")
                seen[c] = name

    def __getitem__(self, name: str) -> tuple[int, ...]:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split '{name}'; splits are train, val, test")
        return getattr(self, name)

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True, eq=False)
class LabelledDataset:
    """Images and integer labels; validated on construction.

    ``class_names[c]`` names class ``c`` (errors quote it); ``groups[c]`` is its alphabet
    or script when known; ``splits`` are the dataset's default class splits.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None
    splits: ClassSplits | None = None
    name: str = "dataset"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(self.groups))
        if not isinstance(images, Tensor) or images.dim() < 1:
            raise ValueError(f"{self.name}: images must be a Tensor [N, ...]")
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise ValueError(f"{self.name}: labels must be a 1-D Tensor [N], got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{self.name}: labels must be integers, got {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{self.name}: images has {images.shape[0]} examples but labels "
                             f"has {labels.shape[0]}")
        c = len(self.class_names)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
            raise ValueError(f"{self.name}: labels outside 0..{c - 1} (there are {c} class "
                             f"names): min {int(labels.min())}, max {int(labels.max())}")
        if self.groups is not None and len(self.groups) != c:
            raise ValueError(f"{self.name}: {len(self.groups)} groups for {c} classes")
        if self.splits is not None:
            for split, ids in self.splits.as_dict().items():
                bad = [i for i in ids if not 0 <= i < c]
                if bad:
                    raise ValueError(f"{self.name}: {split} split names classes {bad[:5]} "
                                     f"outside 0..{c - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def class_counts(self) -> Tensor:
        """Examples per class, ``[num_classes]``."""
        return torch.bincount(self.labels.long(), minlength=self.num_classes)

    def resolve_classes(self, classes: str | Sequence[int] | Tensor) -> tuple[int, ...]:
        """Class ids from a split name (``"train"``/``"val"``/``"test"``) or explicit ids."""
        if isinstance(classes, str):
            if self.splits is None:
                raise ValueError(f"{self.name} has no default class splits; pass class ids "
                                 "or a ClassSplits")
            return self.splits[classes]
        ids = tuple(int(i) for i in (classes.tolist() if isinstance(classes, Tensor)
                                     else classes))
        bad = [i for i in ids if not 0 <= i < self.num_classes]
        if bad:
            raise ValueError(f"{self.name}: class ids {bad[:5]} outside 0..{self.num_classes - 1}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: class ids repeat in {ids[:20]}")
        return ids

    def subset_classes(self, classes: Sequence[int]) -> LabelledDataset:
        """The examples of ``classes`` only, relabelled ``0..len(classes)-1`` in that order."""
        ids = torch.as_tensor(list(classes), dtype=torch.long)
        lookup = torch.full((self.num_classes,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        new = lookup[self.labels.long()]
        keep = new >= 0
        return LabelledDataset(
            images=self.images[keep], labels=new[keep],
            class_names=tuple(self.class_names[i] for i in ids.tolist()),
            groups=None if self.groups is None else tuple(self.groups[i] for i in ids.tolist()),
            name=self.name, metadata=dict(self.metadata))
