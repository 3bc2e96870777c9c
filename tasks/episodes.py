"""Episodic N-way K-shot sampling over any :class:`~tasks.dataset.LabelledDataset`.

One call draws a whole meta-batch with tensor ops only — no Python loop over tasks or
images:

1. per task, ``N`` distinct classes of the split: the ``N`` largest of uniform keys
   (``topk``, one row per task — a uniformly random ``N``-subset in random order);
2. per chosen class, ``K + Q`` distinct examples: the ``K + Q`` smallest uniform keys over
   a padded ``[classes, max_examples]`` index table (padding gets key 2, never chosen);
3. one gather ``images[index]`` of shape ``[B, N, K + Q, ...]``, split into support/query.

Episode label ``j`` is the ``j``-th chosen class (labels remapped to ``0..N-1``); examples
are class-major: ``support_y[b] = [0]*K + [1]*K + … + [N-1]*K``. ``TaskBatch.classes``
keeps the original class ids. ``uint8`` images are scaled to ``[0, 1]`` floats (once, at
construction, for the split's images when that copy fits in 1 GiB; else per meta-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tasks.batch import TaskBatch
from tasks.dataset import LabelledDataset

__all__ = ["Augmentation", "EpisodeSampler", "compose"]

#: A split whose images, converted to the sampler's dtype, need at most this many bytes
#: is converted once at construction instead of per meta-batch.
_PRECONVERT = 1 << 30

#: A task-augmentation hook: ``(meta_batch, generator) -> meta_batch`` (e.g. :class:`MLTI`).
Augmentation = Callable[[TaskBatch, torch.Generator], TaskBatch]


def compose(*augmentations: Augmentation) -> Augmentation:
    """Apply task augmentations left to right."""

    def apply(batch: TaskBatch, generator: torch.Generator) -> TaskBatch:
        for aug in augmentations:
            batch = aug(batch, generator)
        return batch

    return apply


class EpisodeSampler:
    """N-way K-shot episodes (``q_query`` queries per class) from one class split.

    ``classes`` is a split name of ``dataset.splits`` (``"train"``, ``"val"``, ``"test"``)
    or explicit class ids. ``augment`` (optional) transforms every sampled meta-batch,
    using the sampler's generator so the whole stream stays deterministic by ``seed``.
    ``sample(B)`` returns support ``[B, N*K, ...]`` and query ``[B, N*Q, ...]``.
    """

    def __init__(self, dataset: LabelledDataset, classes: str | Sequence[int] | Tensor = "train",
                 *, n_way: int = 5, k_shot: int = 1, q_query: int = 15, seed: int = 0,
                 augment: Augmentation | None = None, dtype: torch.dtype = torch.float32
                 ) -> None:
        if n_way < 1 or k_shot < 1 or q_query < 0:
            raise ValueError(f"need n_way >= 1, k_shot >= 1, q_query >= 0; got n_way={n_way}, "
                             f"k_shot={k_shot}, q_query={q_query}")
        split_name = classes if isinstance(classes, str) else "given"
        ids = dataset.resolve_classes(classes)
        if not ids:
            raise ValueError(f"the {split_name} class split of {dataset.name} is empty")
        if n_way > len(ids):
            raise ValueError(f"n_way={n_way} but the {split_name} split of {dataset.name} has "
                             f"only {len(ids)} classes")
        self.dataset, self.split_name = dataset, split_name
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.augment, self.dtype, self.seed = augment, dtype, seed
        self.classes = torch.tensor(ids, dtype=torch.long)
        self.counts, self.table = _index_table(dataset.labels, self.classes)
        need = k_shot + q_query
        short = torch.nonzero(self.counts < need).flatten()
        if short.numel():
            i = int(short[0])
            cid = ids[i]
            raise ValueError(
                f"class '{dataset.class_names[cid]}' (id {cid}) of {dataset.name} has "
                f"{int(self.counts[i])} examples; {k_shot}-shot {q_query}-query episodes need "
                f"{need} per class ({short.numel()} classes of the {split_name} split are short)")
        self._uniform_counts = bool((self.counts == self.counts[0]).all())
        self._feature = tuple(dataset.images.shape[1:])
        # Rows this split can draw; a converted copy of just those when it is small enough.
        self._images, self._row_of = dataset.images, None
        members = torch.unique(self.table)
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_row = dataset.images[:1].numel() * itemsize
        if dataset.images.dtype != dtype and members.numel() * per_row <= _PRECONVERT:
            self._images = self._gather(members)
            self._row_of = torch.full((len(dataset),), -1, dtype=torch.long)
            self._row_of[members] = torch.arange(members.numel())
        self.generator = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return (f"EpisodeSampler({self.dataset.name}, {self.split_name}: {len(self.classes)} "
                f"classes, {self.n_way}-way {self.k_shot}-shot {self.q_query}-query)")

    def sample_indices(self, batch_size: int, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
        """Chosen class positions ``[B, N]`` (into ``self.classes``) and dataset example
        indices ``[B, N, K+Q]`` — the random part of :meth:`sample`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        g = self.generator if generator is None else generator
        b, n, m = batch_size, self.n_way, self.k_shot + self.q_query
        c, width = self.table.shape
        chosen = torch.rand(b, c, generator=g).topk(n, dim=1).indices  # uniform N-subset
        keys = torch.rand(b, n, width, generator=g)
        if not self._uniform_counts:
            pad = torch.arange(width) >= self.counts[chosen][..., None]
            keys = keys.masked_fill(pad, 2.0)
        picks = keys.topk(m, dim=-1, largest=False).indices
        return chosen, self.table[chosen[..., None], picks]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TaskBatch:
        """A meta-batch of ``batch_size`` episodes (then ``augment``, if given)."""
        g = self.generator if generator is None else generator
        chosen, index = self.sample_indices(batch_size, g)
        b, n, k, q = batch_size, self.n_way, self.k_shot, self.q_query
        labels = torch.arange(n)
        batch = TaskBatch(
            support_x=self._gather(index[:, :, :k]).reshape(b, n * k, *self._feature),
            support_y=labels.repeat_interleave(k).expand(b, n * k).contiguous(),
            query_x=self._gather(index[:, :, k:]).reshape(b, n * q, *self._feature),
            query_y=labels.repeat_interleave(q).expand(b, n * q).contiguous(),
            num_classes=n, classes=self.classes[chosen])
        return batch if self.augment is None else self.augment(batch, g)

    def _gather(self, index: Tensor) -> Tensor:
        """Images at dataset indices ``index`` (flattened), as ``self.dtype``."""
        index = index.flatten() if self._row_of is None else self._row_of[index.flatten()]
        x = self._images.index_select(0, index)
        if x.dtype != self.dtype:
            x = x.to(self.dtype).div_(255) if x.dtype == torch.uint8 else x.to(self.dtype)
        return x

    def state_dict(self) -> dict[str, Tensor]:
        """Generator state, so a resumed run continues the same episode stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def _index_table(labels: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Examples per class ``[C]`` and a ``[C, max_count]`` table of dataset indices
    (row ``i`` lists class ``classes[i]``'s examples, padded with its first index)."""
    labels = labels.long()
    lookup = torch.full((int(labels.max()) + 1 if labels.numel() else 1,), -1,
                        dtype=torch.long)
    lookup[classes[classes < lookup.numel()]] = torch.arange(len(classes))[
        classes < lookup.numel()]
    row = lookup[labels]
    members = torch.nonzero(row >= 0).flatten()
    row = row[members]
    order = torch.argsort(row, stable=True)
    members, row = members[order], row[order]
    counts = torch.bincount(row, minlength=len(classes))
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(row.numel()) - starts[row]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    table = torch.zeros(len(classes), width, dtype=torch.long)
    table[row, col] = members
    first = table[:, :1].expand_as(table)
    table = torch.where(torch.arange(width) < counts[:, None], table, first)
    return counts, table
