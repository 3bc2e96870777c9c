"""The hyper-cleaning data: split sizes, stratification, corruption rate and determinism."""

import pytest
import torch

from tasks.hypercleaning import (
    clean_f1,
    corrupt_labels,
    hypercleaning_split,
    load_mnist_5000,
    make_hypercleaning,
)


def test_split_sizes_stratified_and_disjoint():
    d = make_hypercleaning(0.5, seed=0, center=False, dtype=torch.float64)
    assert d.x_train.shape == (2000, 784) and d.x_val.shape == (1000, 784)
    assert d.x_test.shape == (2000, 784)
    for y, per_class in ((d.y_train_true, 200), (d.y_val, 100), (d.y_test, 200)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    # the three splits are disjoint index sets of the 5000 images, and the data is theirs
    tr, va, te = hypercleaning_split(0)
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 5000
    x, y = load_mnist_5000()
    assert torch.equal(d.x_val, x[va]) and torch.equal(d.y_test, y[te])
    assert torch.equal(d.y_train_true, y[tr])
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9])
def test_corruption_rate_and_always_wrong(p):
    d = make_hypercleaning(p, seed=3)
    rate = 1 - d.is_clean.double().mean().item()
    assert abs(rate - p) < 0.035  # 2000 Bernoulli draws: std ≤ 0.011
    wrong = d.y_train != d.y_train_true
    assert torch.equal(wrong, ~d.is_clean)  # a corrupted label is never the true one
    assert torch.equal(d.y_val, d.y_val) and d.y_val.dtype == torch.long


def test_corrupted_labels_uniform_over_other_classes():
    labels = torch.zeros(90000, dtype=torch.long)
    noisy, clean = corrupt_labels(labels, 1.0, torch.Generator().manual_seed(0))
    assert not clean.any()
    counts = torch.bincount(noisy, minlength=10).double()
    assert counts[0] == 0
    assert (counts[1:] / 10000 - 1).abs().max() < 0.05


def test_deterministic_in_seed():
    a, b = make_hypercleaning(0.7, seed=5), make_hypercleaning(0.7, seed=5)
    for name in ("x_train", "y_train", "is_clean", "x_val", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = make_hypercleaning(0.7, seed=6)
    assert not torch.equal(a.y_train, c.y_train)


def test_centering_uses_train_mean():
    d = make_hypercleaning(0.5, seed=0, dtype=torch.float64)
    assert d.x_train.mean(0).abs().max() < 1e-12
    assert d.x_val.mean(0).abs().max() > 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be"):
        make_hypercleaning(1.5)
    with pytest.raises(ValueError, match="p must be"):
        make_hypercleaning(-0.1)
    with pytest.raises(ValueError, match="sizes"):
        make_hypercleaning(0.5, sizes=(10, 0, 10))


def test_clean_f1():
    truth = torch.tensor([True, True, False, False])
    assert clean_f1(torch.tensor([0.9, 0.8, 0.1, 0.2]), truth) == 1.0
    assert clean_f1(torch.tensor([0.1, 0.1, 0.1, 0.1]), truth) == 0.0
    assert clean_f1(torch.tensor([0.9, 0.9, 0.9, 0.9]), truth) == pytest.approx(2 / 3)
    assert clean_f1(torch.tensor([0.9, 0.1, 0.9, 0.1]), truth) == pytest.approx(0.5)
