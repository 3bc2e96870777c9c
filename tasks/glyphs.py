"""A built-in, offline, Omniglot-like benchmark: letters of many scripts rendered from the
fonts that ship with matplotlib (DejaVu Sans/Serif/Mono and STIX, regular and bold).

How classes are chosen
    A class is one Unicode letter (category ``Lu``/``Ll``/``Lt``/``Lo``, no canonical
    decomposition — so no precomposed accented letters) of a script in :data:`SCRIPTS`,
    present in at least one font's ``cmap`` and rendering with ink (no tofu, no blank).
    Letters whose undistorted rendering (canonical font = first covering font in
    :data:`FONT_FILES`) is nearly identical to an earlier kept letter — cosine similarity
    above ``dedupe_threshold`` — are dropped, which removes homoglyphs such as Latin ``A``
    / Greek ``Α`` / Cyrillic ``А`` and case pairs like ``o``/``O`` that differ only in size
    (glyphs are scaled to a common box). Scripts are visited in :data:`SCRIPTS` order and
    letters in code-point order, so the first spelling wins.

How examples are drawn
    Each of ``examples_per_class`` examples picks one covering font at random (the
    "drawer": serif/sans/mono, regular/bold), is fitted (75 % of the side) into a
    ``2·image_size`` canvas and distorted by a random affine map — rotation U[−15°, 15°],
    scale U[0.8, 1.1], shear U[−0.25, 0.25], translation U[−2, 2] pixels at the output
    size — plus, with probability 0.3, a stroke thickening (3×3 max filter at 2×
    resolution); it is then area-downsampled to ``image_size × image_size`` ``uint8`` (ink = 255).

Splits (Omniglot-like: new scripts at meta-test)
    ``split_by="script"`` (default) assigns whole scripts by :data:`SCRIPT_SPLITS`;
    ``split_by="class"`` is a seeded random class split of about 64/16/20 %.

The rendered arrays are cached as ``glyphs-<hash>.npz`` under :func:`tasks.cache.cache_dir`
(hash of the configuration, library versions and font files), written atomically.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from tasks.cache import cache_dir, cache_key, load_arrays, save_arrays
from tasks.dataset import LabelledDataset
from tasks.splits import split_classes, split_classes_by_group

__all__ = [
    "FONT_FILES",
    "GLYPH_VERSION",
    "SCRIPTS",
    "SCRIPT_SPLITS",
    "font_paths",
    "glyph_candidates",
    "glyph_dataset",
    "render_prototypes",
]

#: Bump when rendering changes, to invalidate caches.
GLYPH_VERSION = 1

#: Fonts used as "drawers", in canonical-font priority order (matplotlib's ttf folder).
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)

#: Unicode-name prefix → script (alphabet) name, in dedupe priority order.
SCRIPTS: dict[str, str] = {
    "LATIN": "Latin", "GREEK": "Greek", "CYRILLIC": "Cyrillic", "ARMENIAN": "Armenian",
    "GEORGIAN": "Georgian", "HEBREW": "Hebrew", "ARABIC": "Arabic",
    "CANADIAN": "Canadian_Syllabics", "TIFINAGH": "Tifinagh", "LISU": "Lisu", "LAO": "Lao",
    "NKO": "NKo", "OLD ITALIC": "Old_Italic", "OGHAM": "Ogham", "COPTIC": "Coptic",
}

#: Default script → split assignment for ``split_by="script"``.
SCRIPT_SPLITS: dict[str, str] = {
    "Latin": "train", "Cyrillic": "train", "Canadian_Syllabics": "train", "Arabic": "train",
    "Hebrew": "train", "Lao": "train", "Ogham": "train", "Coptic": "train",
    "Armenian": "val", "Tifinagh": "val", "Old_Italic": "val",
    "Greek": "test", "Georgian": "test", "Lisu": "test", "NKo": "test",
}

_ROTATION_DEG, _SCALE, _SHEAR, _SHIFT_PX, _THICKEN_P = 15.0, (0.8, 1.1), 0.25, 2.0, 0.3
_FILL = 0.75  # glyph's longest side as a fraction of the canvas


def font_paths() -> list[Path]:
    """Paths of :data:`FONT_FILES` inside the installed matplotlib (missing ones skipped)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FONT_FILES if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"none of {FONT_FILES} found in {folder}")
    return paths


def _script_of(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    for prefix, script in SCRIPTS.items():
        if name.startswith(prefix + " "):
            return script
    return None


def glyph_candidates(scripts: Sequence[str] | None = None) -> list[tuple[str, str, list[int]]]:
    """Candidate letters ``(char, script, covering font indices)`` before rendering checks,
    in script-priority then code-point order."""
    from fontTools.ttLib import TTFont

    wanted = set(SCRIPTS.values()) if scripts is None else set(scripts)
    unknown = wanted - set(SCRIPTS.values())
    if unknown:
        raise ValueError(f"unknown scripts {sorted(unknown)}; known: {list(SCRIPTS.values())}")
    coverage: dict[int, list[int]] = {}
    for fi, path in enumerate(font_paths()):
        with TTFont(path, lazy=True) as font:
            for cp in font.getBestCmap():
                coverage.setdefault(cp, []).append(fi)
    found: dict[str, list[tuple[str, str, list[int]]]] = {s: [] for s in SCRIPTS.values()}
    for cp in sorted(coverage):
        ch = chr(cp)
        if unicodedata.category(ch) not in ("Lu", "Ll", "Lt", "Lo"):
            continue
        if unicodedata.decomposition(ch):
            continue
        script = _script_of(ch)
        if script in wanted:
            found[script].append((ch, script, coverage[cp]))
    return [c for script in SCRIPTS.values() for c in found[script]]


def _render(ch: str, font, canvas: int) -> np.ndarray | None:
    """The glyph fitted (aspect kept) into a centred box of ``_FILL · canvas``; ``None``
    when it has no ink."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (3 * canvas, 3 * canvas))
    centre = (3 * canvas // 2, 3 * canvas // 2)
    ImageDraw.Draw(img).text(centre, ch, font=font, fill=255, anchor="mm")
    box = img.getbbox()
    if box is None:
        return None
    img = img.crop(box)
    w, h = img.size
    side = _FILL * canvas
    factor = side / max(w, h)
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    out = Image.new("L", (canvas, canvas))
    out.paste(img, ((canvas - nw) // 2, (canvas - nh) // 2))
    arr = np.asarray(out)
    return arr if int((arr > 127).sum()) >= 4 else None


def render_prototypes(chars: Sequence[str], font_indices: Sequence[Sequence[int]],
                      canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Undistorted renderings ``[C, F, canvas, canvas]`` (uint8) of every char in every
    font, and a ``[C, F]`` mask of which renderings exist (font covers it and has ink)."""
    from PIL import ImageFont

    paths = font_paths()
    size = canvas  # pixel size of the font; the glyph is refitted anyway
    fonts = [ImageFont.truetype(str(p), size, layout_engine=ImageFont.Layout.BASIC)
             for p in paths]
    protos = np.zeros((len(chars), len(paths), canvas, canvas), dtype=np.uint8)
    valid = np.zeros((len(chars), len(paths)), dtype=bool)
    for ci, (ch, covering) in enumerate(zip(chars, font_indices)):
        for fi in covering:
            arr = _render(ch, fonts[fi], canvas)
            if arr is not None:
                protos[ci, fi], valid[ci, fi] = arr, True
    return protos, valid


def _downsample(images: Tensor, factor: int) -> Tensor:
    return F.avg_pool2d(images, factor) if factor > 1 else images


def _canonical(protos: np.ndarray, valid: np.ndarray, factor: int) -> Tensor:
    first = valid.argmax(axis=1)
    canon = torch.from_numpy(protos[np.arange(len(protos)), first]).float()[:, None] / 255
    return _downsample(canon, factor)[:, 0]


def _dedupe(canon: Tensor, threshold: float) -> list[int]:
    """Indices to keep: greedily drop any image too similar (cosine) to a kept one."""
    flat = canon.flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = flat @ flat.T
    keep: list[int] = []
    dropped = torch.zeros(len(flat), dtype=torch.bool)
    for i in range(len(flat)):
        if dropped[i]:
            continue
        keep.append(i)
        dropped |= sim[i] > threshold
    return keep


def _distort(protos: Tensor, generator: torch.Generator, out_size: int, factor: int
             ) -> Tensor:
    """Random affine distortion of ``[M, 1, S, S]`` images in [0, 1], then
    area-downsampled by ``factor``."""
    m, size = protos.shape[0], protos.shape[-1]
    rand = torch.rand(m, 5, generator=generator)
    angle = (2 * rand[:, 0] - 1) * math.radians(_ROTATION_DEG)
    scale = _SCALE[0] + (_SCALE[1] - _SCALE[0]) * rand[:, 1]
    shear = (2 * rand[:, 2] - 1) * _SHEAR
    shift = (2 * rand[:, 3:5] - 1) * (2 * _SHIFT_PX / out_size)  # normalised coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map A = s · R · Sh; sampling needs output→input: A⁻¹ (p − t)
    fwd = torch.stack([torch.stack([cos, cos * shear - sin], -1),
                       torch.stack([sin, sin * shear + cos], -1)], -2) * scale[:, None, None]
    inv = torch.linalg.inv(fwd)
    offset = -(inv @ shift[:, :, None])[..., 0]
    # Pixel-centre coordinates in [-1, 1] (align_corners=False convention).
    axis = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    py, px = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([px, py], -1).reshape(-1, 2)  # [S*S, (x, y)]
    grid = points @ inv.transpose(1, 2) + offset[:, None, :]
    grid = grid.reshape(m, size, size, 2)
    x = F.grid_sample(protos, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample(x, factor)


def _render_dataset(scripts: Sequence[str] | None, examples_per_class: int, image_size: int,
                    seed: int, max_classes_per_script: int | None, dedupe_threshold: float
                    ) -> dict[str, np.ndarray]:
    factor = 2
    canvas = image_size * factor
    cands = glyph_candidates(scripts)
    if max_classes_per_script is not None:
        per: dict[str, int] = {}
        kept = []
        for c in cands:
            if per.get(c[1], 0) < max_classes_per_script:
                kept.append(c)
                per[c[1]] = per.get(c[1], 0) + 1
        cands = kept
    chars = [c[0] for c in cands]
    protos, valid = render_prototypes(chars, [c[2] for c in cands], canvas)
    inked = valid.any(axis=1)
    idx = np.nonzero(inked)[0]
    protos, valid = protos[idx], valid[idx]
    chars = [chars[i] for i in idx]
    scripts_of = [cands[i][1] for i in idx]
    keep = _dedupe(_canonical(protos, valid, factor), dedupe_threshold)
    protos, valid = protos[keep], valid[keep]
    chars = [chars[i] for i in keep]
    scripts_of = [scripts_of[i] for i in keep]
    # Stroke-width variation: a thickened copy (3×3 max filter) of every prototype.
    protos_t = torch.from_numpy(protos)
    thick = F.max_pool2d(protos_t.flatten(0, 1)[:, None].float(), 3, 1, 1)
    styles = torch.cat([protos_t, thick.to(torch.uint8).reshape(protos_t.shape)], dim=1)
    # One random covering font (and stroke width) per example, then distort in chunks.
    g = torch.Generator().manual_seed(seed)
    c, e, n_fonts = len(chars), examples_per_class, valid.shape[1]
    weights = torch.from_numpy(valid).double()
    font_choice = torch.multinomial(weights, e, replacement=True, generator=g).flatten()
    thicken = torch.rand(c * e, generator=g) < _THICKEN_P
    style = font_choice + n_fonts * thicken.long()
    labels = torch.arange(c).repeat_interleave(e)
    out = torch.empty(c * e, 1, image_size, image_size, dtype=torch.uint8)
    chunk = 2048
    for start in range(0, c * e, chunk):
        sl = slice(start, start + chunk)
        base = styles[labels[sl], style[sl]].float()[:, None] / 255
        img = _distort(base, g, image_size, factor)
        out[sl] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    canon = (_canonical(protos, valid, factor).clamp(0, 1) * 255).round().to(torch.uint8)
    return {
        "images": out.numpy(), "labels": labels.numpy(),
        "chars": np.array(chars), "scripts": np.array(scripts_of),
        "prototypes": canon.numpy(),
    }


def _config(scripts, examples_per_class, image_size, seed, max_classes_per_script,
            dedupe_threshold) -> dict:
    import PIL
    from PIL import ImageFont

    fonts = [(p.name, p.stat().st_size) for p in font_paths()]
    return {
        "version": GLYPH_VERSION, "scripts": None if scripts is None else sorted(scripts),
        "examples_per_class": examples_per_class, "image_size": image_size, "seed": seed,
        "max_classes_per_script": max_classes_per_script,
        "dedupe_threshold": dedupe_threshold, "fonts": fonts, "pillow": PIL.__version__,
        "freetype": getattr(ImageFont.core, "freetype2_version", "?"),
        "torch": torch.__version__.split("+")[0],
    }


def glyph_dataset(*, scripts: Sequence[str] | None = None, examples_per_class: int = 20,
                  image_size: int = 28, seed: int = 0, split_by: str = "script",
                  max_classes_per_script: int | None = None, dedupe_threshold: float = 0.95,
                  cache: bool = True, cache_root: str | os.PathLike | None = None
                  ) -> LabelledDataset:
    """The glyph benchmark as a :class:`LabelledDataset` (see module docstring).

    ``images`` are ``[C·E, 1, image_size, image_size]`` ``uint8`` (ink 255), class-major;
    ``class_names`` are ``"<Script>/U+XXXX <UNICODE NAME>"``; ``groups`` the scripts;
    ``metadata["chars"]`` the letters themselves (one per class) and
    ``metadata["prototypes"]`` the undistorted canonical renderings ``[C, size, size]``.
    ``scripts`` restricts to some scripts (tests render a small subset).
    ``split_by``: ``"script"`` or ``"class"``.
    """
    if examples_per_class < 1 or image_size < 4:
        raise ValueError(f"need examples_per_class >= 1 and image_size >= 4, got "
                         f"{examples_per_class}, {image_size}")
    if split_by not in ("script", "class"):
        raise ValueError(f"split_by must be 'script' or 'class', got '{split_by}'")
    config = _config(scripts, examples_per_class, image_size, seed, max_classes_per_script,
                     dedupe_threshold)
    path = cache_dir(cache_root) / f"glyphs-{cache_key(config)}.npz"
    arrays = load_arrays(path) if cache else None
    if arrays is None:
        arrays = _render_dataset(scripts, examples_per_class, image_size, seed,
                                 max_classes_per_script, dedupe_threshold)
        if cache:
            save_arrays(path, arrays)
    chars = [str(c) for c in arrays["chars"]]
    groups = tuple(str(s) for s in arrays["scripts"])
    names = tuple(f"{s}/U+{ord(c):04X} {unicodedata.name(c, '?')}"
                  for c, s in zip(chars, groups))
    if split_by == "script":
        assignment = {s: SCRIPT_SPLITS.get(s, "train") for s in set(groups)}
        splits = split_classes_by_group(groups, assignment)
    else:
        n = len(names)
        n_val, n_test = round(0.16 * n), round(0.2 * n)
        splits = split_classes(n, (n - n_val - n_test, n_val, n_test), seed=seed)
    return LabelledDataset(
        images=torch.from_numpy(arrays["images"]), labels=torch.from_numpy(arrays["labels"]),
        class_names=names, groups=groups, splits=splits, name="glyphs",
        metadata={"chars": "".join(chars), "cache_file": str(path),
                  "prototypes": torch.from_numpy(arrays["prototypes"])})

