"""Episodic sampler and MLTI on a synthetic dataset whose images encode their own index."""

import pytest
import torch

from tasks import (
    MLTI,
    ClassSplits,
    EpisodeSampler,
    LabelledDataset,
    SinusoidTasks,
    TaskBatch,
    TaskSampler,
    interpolate_tasks,
    split_classes,
    split_classes_by_group,
)
from tasks.mlti import _standard_gamma


def indexed_dataset(counts=(6, 7, 5, 9, 6, 8, 6, 10, 7, 6, 6, 6)) -> LabelledDataset:
    """Class c has counts[c] examples; image i is a 2×3 array filled with the value i."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None].expand(-1, 2, 3)
    names = tuple(f"class{c}" for c in range(len(counts)))
    return LabelledDataset(images.clone(), labels, names,
                           splits=split_classes(len(counts), (6, 3, 3), seed=1), name="toy")


def index_of(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0, 0].long()


def test_shapes_remap_and_distinct_examples():
    data = indexed_dataset()
    sampler = EpisodeSampler(data, "train", n_way=4, k_shot=2, q_query=3, seed=0)
    batch = sampler.sample(64)
    assert batch.support_x.shape == (64, 8, 2, 3) and batch.support_y.shape == (64, 8)
    assert batch.query_x.shape == (64, 12, 2, 3) and batch.query_y.shape == (64, 12)
    assert batch.classes.shape == (64, 4) and batch.num_classes == 4
    assert torch.equal(batch.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(batch.query_y[5], torch.arange(4).repeat_interleave(3))
    for s_idx, q_idx, s_y, q_y, cls in zip(index_of(batch.support_x), index_of(batch.query_x),
                                           batch.support_y, batch.query_y, batch.classes):
        # remap: the dataset label of every image is the class behind its episode label
        assert torch.equal(data.labels[s_idx], cls[s_y])
        assert torch.equal(data.labels[q_idx], cls[q_y])
        assert len(set(cls.tolist())) == 4  # N distinct classes
        all_idx = torch.cat([s_idx, q_idx]).tolist()
        assert len(set(all_idx)) == len(all_idx)  # no example twice, support ∩ query = ∅
        assert set(cls.tolist()) <= set(data.splits.train)


def test_all_split_classes_and_examples_get_used():
    data = indexed_dataset()
    sampler = EpisodeSampler(data, "train", n_way=3, k_shot=1, q_query=1, seed=5)
    batch = sampler.sample(500)
    assert set(batch.classes.flatten().tolist()) == set(data.splits.train)
    used = set(index_of(batch.support_x).flatten().tolist())
    train_examples = {i for i, c in enumerate(data.labels.tolist()) if c in data.splits.train}
    assert used == train_examples  # padding never chosen, every real example reachable


def test_deterministic_by_seed_and_resumable():
    data = indexed_dataset()
    a = EpisodeSampler(data, "val", n_way=3, k_shot=1, q_query=2, seed=11)
    b = EpisodeSampler(data, "val", n_way=3, k_shot=1, q_query=2, seed=11)
    c = EpisodeSampler(data, "val", n_way=3, k_shot=1, q_query=2, seed=12)
    first = a.sample(16)
    assert torch.equal(first.support_x, b.sample(16).support_x)
    assert not torch.equal(first.support_x, c.sample(16).support_x)
    state = a.state_dict()
    nxt = a.sample(16)
    b.load_state_dict(state)
    assert torch.equal(nxt.query_x, b.sample(16).query_x)


def test_uint8_images_are_scaled_to_unit_interval():
    labels = torch.arange(4).repeat_interleave(3)
    images = torch.tensor([0, 255, 51] * 4, dtype=torch.uint8)[:, None]
    data = LabelledDataset(images, labels, ("a", "b", "c", "d"))
    batch = EpisodeSampler(data, [0, 1, 2, 3], n_way=2, k_shot=1, q_query=1).sample(3)
    assert batch.support_x.dtype == torch.float32
    assert set(batch.support_x.flatten().tolist()) <= {0.0, 1.0, 0.2}


def test_disjoint_splits_and_split_errors():
    s = split_classes(20, (10, 5, 5), seed=3)
    assert not set(s.train) & set(s.val) and not set(s.val) & set(s.test)
    assert not set(s.train) & set(s.test) and len(set(s.train + s.val + s.test)) == 20
    assert split_classes(20, (10, 5, 5), seed=3) == s and split_classes(20, (10, 5, 5), 4) != s
    with pytest.raises(ValueError, match="class 3 is in both the train and the test split"):
        ClassSplits(train=(1, 3), val=(2,), test=(3,))
    by_group = split_classes_by_group(["a", "b", "a", "c"], {"a": "train", "b": "test"})
    assert by_group == ClassSplits(train=(0, 2), val=(), test=(1,))
    with pytest.raises(ValueError, match="need 25 classes"):
        split_classes(20, (10, 10, 5))


def test_bad_inputs_name_the_problem():
    data = indexed_dataset()
    empty = LabelledDataset(data.images, data.labels, data.class_names,
                            splits=ClassSplits(train=(0, 1, 2), val=(), test=(3,)), name="toy")
    with pytest.raises(ValueError, match="val class split of toy is empty"):
        EpisodeSampler(empty, "val")
    with pytest.raises(ValueError, match="n_way=4 but the test split of toy has only 3 classes"):
        EpisodeSampler(data, "test", n_way=4)
    # class2 has 5 examples: 2-shot 4-query needs 6; the error names the class
    with pytest.raises(ValueError, match=r"class 'class2' \(id 2\) of toy has 5 examples"):
        EpisodeSampler(data, [2, 3], n_way=2, k_shot=2, q_query=4)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2"):
        LabelledDataset(torch.zeros(4, 1), torch.tensor([0, 1, 2, 3]), ("a", "b", "c"))
    with pytest.raises(ValueError, match="images has 4 examples but labels has 3"):
        LabelledDataset(torch.zeros(4, 1), torch.tensor([0, 1, 2]), ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels must be integers"):
        LabelledDataset(torch.zeros(3, 1), torch.tensor([0.0, 1.0, 2.0]), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"class ids .* outside"):
        EpisodeSampler(data, [0, 99])
    with pytest.raises(ValueError, match="no default class splits"):
        EpisodeSampler(LabelledDataset(data.images, data.labels, data.class_names), "train")


def test_augment_hook_receives_batch_and_sampler_generator():
    seen = []

    def flip(batch: TaskBatch, generator: torch.Generator) -> TaskBatch:
        seen.append(generator)
        return TaskBatch(-batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                         num_classes=batch.num_classes, classes=batch.classes)

    data = indexed_dataset()
    plain = EpisodeSampler(data, n_way=2, k_shot=1, q_query=1, seed=2).sample(4)
    sampler = EpisodeSampler(data, n_way=2, k_shot=1, q_query=1, seed=2, augment=flip)
    out = sampler.sample(4)
    assert seen == [sampler.generator]
    assert torch.equal(out.support_x, -plain.support_x)
    assert isinstance(sampler, TaskSampler)


def test_mlti_outputs_convex_combinations_one_hot_per_class():
    data = indexed_dataset()
    sampler = EpisodeSampler(data, n_way=3, k_shot=2, q_query=2, seed=0)
    batch = sampler.sample(8)
    mixed = MLTI(alpha=0.5)(batch, torch.Generator().manual_seed(1))
    lam, partner = mixed.info["mlti_lambda"], mixed.info["mlti_partner"]
    assert torch.all((lam >= 0) & (lam <= 1)) and torch.all(partner != torch.arange(8))
    lam4 = lam[:, None, None, None]
    torch.testing.assert_close(mixed.support_x,
                               lam4 * batch.support_x + (1 - lam4) * batch.support_x[partner])
    torch.testing.assert_close(mixed.query_x,
                               lam4 * batch.query_x + (1 - lam4) * batch.query_x[partner])
    # class-major pairing: label n mixes with label n → labels stay one-hot of n
    assert mixed.support_y.shape == (8, 6, 3) and mixed.soft_labels
    torch.testing.assert_close(mixed.support_y,
                               torch.nn.functional.one_hot(batch.support_y, 3).float())


def test_mlti_label_sharing_gives_soft_convex_labels():
    data = indexed_dataset()
    batch = EpisodeSampler(data, n_way=3, k_shot=2, q_query=2, seed=0).sample(8)
    mixed = MLTI(alpha=2.0, label_sharing=True)(batch, torch.Generator().manual_seed(1))
    lam, partner = mixed.info["mlti_lambda"], mixed.info["mlti_partner"]
    pair = mixed.info["mlti_pairing_support"]
    other_y = torch.gather(batch.support_y[partner], 1, pair)
    onehot = torch.nn.functional.one_hot
    expected = lam[:, None, None] * onehot(batch.support_y, 3) + (1 - lam[:, None, None]) * \
        onehot(other_y, 3)
    torch.testing.assert_close(mixed.support_y, expected.float())
    assert torch.all(mixed.support_y >= 0)
    torch.testing.assert_close(mixed.support_y.sum(-1), torch.ones(8, 6))
    assert (mixed.support_y.max(-1).values < 1).any()  # some labels really are soft
    # inputs: the same pairing
    other_x = batch.support_x[partner][torch.arange(8)[:, None], pair]
    lam4 = lam[:, None, None, None]
    torch.testing.assert_close(mixed.support_x, lam4 * batch.support_x + (1 - lam4) * other_x)


def test_mlti_regression_mixes_targets_and_p_zero_is_identity():
    batch = SinusoidTasks(seed=0).sample(6)
    mixed = MLTI(alpha=1.0)(batch, torch.Generator().manual_seed(0))
    lam, partner = mixed.info["mlti_lambda"], mixed.info["mlti_partner"]
    l3 = lam[:, None, None]
    expected = l3 * batch.query_y + (1 - l3) * batch.query_y[partner]
    torch.testing.assert_close(mixed.query_y, expected)
    same = MLTI(p=0.0)(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.support_x, batch.support_x)
    torch.testing.assert_close(same.support_y, batch.support_y)


def test_mlti_beta_moments_and_determinism():
    # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1)); checked through the Gamma sampler.
    g = torch.Generator().manual_seed(0)
    for alpha in (0.5, 2.0):
        a, b = _standard_gamma(alpha, 10000, g), _standard_gamma(alpha, 10000, g)
        assert abs(float(a.mean()) - alpha) < 0.05  # Gamma(α, 1): mean α, s.e. √(α/n)
        lam = a / (a + b)
        assert abs(float(lam.mean()) - 0.5) < 0.015
        assert abs(float(lam.var()) - 1 / (4 * (2 * alpha + 1))) < 0.01
    data = indexed_dataset()
    s1 = EpisodeSampler(data, n_way=2, k_shot=1, q_query=1, seed=3, augment=MLTI())
    s2 = EpisodeSampler(data, n_way=2, k_shot=1, q_query=1, seed=3, augment=MLTI())
    assert torch.equal(s1.sample(5).support_x, s2.sample(5).support_x)


def test_interpolate_tasks_checks_shapes():
    batch = SinusoidTasks().sample(3)
    with pytest.raises(ValueError, match="partner and lam must be"):
        interpolate_tasks(batch, torch.zeros(2, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        MLTI(alpha=0.0)


def test_preconverted_and_per_batch_conversion_agree(monkeypatch):
    import tasks.episodes as episodes

    labels = torch.arange(5).repeat_interleave(4)
    images = torch.randint(0, 256, (20, 1, 3, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    data = LabelledDataset(images, labels, tuple("abcde"))
    fast = EpisodeSampler(data, [0, 1, 3, 4], n_way=3, k_shot=2, q_query=1, seed=4)
    monkeypatch.setattr(episodes, "_PRECONVERT", 0)
    slow = EpisodeSampler(data, [0, 1, 3, 4], n_way=3, k_shot=2, q_query=1, seed=4)
    assert slow._row_of is None and fast._row_of is not None
    a, b = fast.sample(6), slow.sample(6)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    _, index = EpisodeSampler(data, [0, 1, 3, 4], n_way=3, k_shot=2, q_query=1,
                              seed=4).sample_indices(6)
    torch.testing.assert_close(a.support_x, images[index[:, :, :2]].reshape(6, 6, 1, 3, 3)
                               .float() / 255)


def test_task_batch_to_and_iteration():
    batch = EpisodeSampler(indexed_dataset(), n_way=2, k_shot=1, q_query=2).sample(3)
    half = batch.to(torch.float64)
    assert half.support_x.dtype == torch.float64 and half.support_y.dtype == torch.long
    tasks = list(batch.tasks())
    assert len(tasks) == 3 and tasks[1].query_x.shape == (4, 2, 3)
    assert torch.equal(tasks[2].support_y, batch.support_y[2])


def test_class_choice_and_label_order_are_uniform():
    # 6 train classes, 3 per episode: each class is in an episode w.p. 1/2 and takes each
    # label position w.p. 1/6. Over 3000 episodes: s.e. ≈ 27 and 20 → 5σ bounds below.
    data = indexed_dataset()
    batch = EpisodeSampler(data, "train", n_way=3, k_shot=1, q_query=1, seed=0).sample(3000)
    for cls in data.splits.train:
        present = int((batch.classes == cls).sum())
        assert abs(present - 1500) < 140
        at_label0 = int((batch.classes[:, 0] == cls).sum())
        assert abs(at_label0 - 500) < 100
