"""Loader for a local copy of Omniglot in its original folder layout (nothing downloaded).

Expected layout (the unzipped ``images_background.zip`` / ``images_evaluation.zip``)::

    root/images_background/<alphabet>/<character>/*.png
    root/images_evaluation/<alphabet>/<character>/*.png

Each ``<alphabet>/<character>`` folder is one class; its group is the alphabet.
Default splits (Omniglot's own, by alphabet): evaluation alphabets → ``test``; of the
background alphabets a seeded ``val_alphabets`` of them → ``val``, the rest → ``train``.
Images (black strokes on white) are inverted so ink is bright, resized with area
averaging to ``image_size`` and stored as ``uint8`` ``[N, 1, size, size]``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from tasks.cache import cache_dir, cache_key, load_arrays, save_arrays
from tasks.dataset import LabelledDataset
from tasks.splits import split_classes_by_group

__all__ = ["OMNIGLOT_PARTS", "omniglot_dataset"]

OMNIGLOT_PARTS = ("images_background", "images_evaluation")


def _load_png(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        gray = img.convert("L")
        if gray.size != (image_size, image_size):
            gray = gray.resize((image_size, image_size), Image.Resampling.BOX)
        return 255 - np.asarray(gray, dtype=np.uint8)


def _listing(root: Path) -> list[tuple[str, str, list[Path]]]:
    """``(class name, group, png files)`` per class folder, sorted."""
    parts = [p for p in OMNIGLOT_PARTS if (root / p).is_dir()]
    if not parts:
        raise FileNotFoundError(f"no Omniglot folders under {root}: expected "
                                f"{' and/or '.join(OMNIGLOT_PARTS)}/<alphabet>/<character>/*.png")
    classes = []
    for part in parts:
        for alphabet in sorted(d for d in (root / part).iterdir() if d.is_dir()):
            for character in sorted(d for d in alphabet.iterdir() if d.is_dir()):
                files = sorted(character.glob("*.png"))
                if not files:
                    raise FileNotFoundError(f"class folder {character} has no .png images")
                classes.append((f"{part}/{alphabet.name}/{character.name}",
                                f"{part}/{alphabet.name}", files))
    if not classes:
        raise FileNotFoundError(f"no <alphabet>/<character> folders under {root}/{parts}")
    return classes


def _fingerprint(root: Path, classes: list[tuple[str, str, list[Path]]]) -> str:
    """Hash of every file's relative path, size and modification time."""
    lines = []
    for _, _, files in classes:
        for f in files:
            st = f.stat()
            lines.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def omniglot_dataset(root: str | os.PathLike, *, image_size: int = 28, val_alphabets: int = 5,
                     seed: int = 0, cache: bool = True,
                     cache_root: str | os.PathLike | None = None) -> LabelledDataset:
    """Omniglot from ``root`` as a :class:`LabelledDataset` (see module docstring).

    Class names are ``"<part>/<alphabet>/<character>"``; groups are
    ``"<part>/<alphabet>"``. Decoded images are cached (``omniglot-<hash>.npz`` under
    :func:`tasks.cache.cache_dir`, keyed by every file's path, size and mtime).
    Raises ``FileNotFoundError`` naming what is missing.
    """
    root = Path(root)
    classes = _listing(root)
    key = cache_key({"version": 1, "root": str(root.resolve()), "image_size": image_size,
                     "files": _fingerprint(root, classes)})
    path = cache_dir(cache_root) / f"omniglot-{key}.npz"
    arrays = load_arrays(path) if cache else None
    if arrays is None:
        images, labels = [], []
        for label, (_, _, files) in enumerate(classes):
            for f in files:
                images.append(_load_png(f, image_size))
                labels.append(label)
        arrays = {"images": np.stack(images)[:, None], "labels": np.asarray(labels)}
        if cache:
            save_arrays(path, arrays)
    names = [name for name, _, _ in classes]
    groups = [group for _, group, _ in classes]
    background = sorted({g for g in groups if g.startswith(OMNIGLOT_PARTS[0])})
    order = torch.randperm(len(background), generator=torch.Generator().manual_seed(seed))
    n_val = min(val_alphabets, max(len(background) - 1, 0))
    val = {background[i] for i in order[:n_val].tolist()}
    assignment = {g: ("test" if g.startswith(OMNIGLOT_PARTS[1]) else
                      "val" if g in val else "train") for g in set(groups)}
    return LabelledDataset(
        images=torch.from_numpy(arrays["images"]),
        labels=torch.from_numpy(arrays["labels"].astype(np.int64)),
        class_names=tuple(names), groups=tuple(groups),
        splits=split_classes_by_group(groups, assignment), name="omniglot",
        metadata={"root": str(root), "cache_file": str(path)})
