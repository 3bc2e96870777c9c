"""Pretrained learned optimizers by name: shipped ones directly, published ones fetched.

    from metaopt.lopt.hub import pretrained
    lopt = pretrained("velo")      # first call downloads the official release folder

Names registered with :func:`~metaopt.lopt.checkpoint.register_pretrained` (the native
checkpoints shipped in the package) load directly. Published names (:data:`PUBLISHED`)
are learned_optimization release folders (``params`` + ``config.gin``) at their public
location; the first call downloads each file (``urllib``: ``https://``, ``http://`` or
``file://``) into ``<cache>/<name>/`` (default ``~/.cache/metaopt/lopt``), each file
written atomically (:func:`metaopt.fileio.atomic_write_bytes`), then loads the folder
with :func:`~metaopt.lopt.release.load_release`, which checks structure and shapes.

Checksums. The package does not know the real release checksums, so :data:`PUBLISHED`
pins none (``sha256=None`` means *unknown*, not *unchecked*). Verification is then
trust-on-first-use: the sha256 of every file is recorded in ``<cache>/<name>/pins.json``
on first fetch, and every later load refuses files that no longer match it. A caller who
knows the checksums passes ``expected_sha256={"params": "...", "config.gin": "..."}``;
a mismatch (at download or later) is refused and the downloaded file is not kept.

Offline, or when the download fails, :class:`HubError` names the URL and says where to
place the files by hand (e.g. ``gsutil cp gs://.../params <cache>/<name>/``).
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from metaopt.errors import CheckpointError
from metaopt.fileio import atomic_write_bytes, atomic_write_text, sha256_hex
from metaopt.lopt.base import LearnedOptimizer

__all__ = ["PUBLISHED", "SHIPPED", "HubError", "Published", "default_cache_dir", "fetch_release",
           "pretrained"]

#: Public HTTPS form of learned_optimization's ``gs://gresearch/learned_optimization/
#: pretrained_lopts/`` (the root its ``opt_from_checkpoint`` prefab reads).
GCS_ROOT = "https://storage.googleapis.com/gresearch/learned_optimization/pretrained_lopts"
RELEASE_FILES = ("params", "config.gin")
PINS_FILE = "pins.json"
MAX_DOWNLOAD_BYTES = 1 << 30


class HubError(CheckpointError):
    """A published learned optimizer could not be fetched or verified."""


@dataclass(frozen=True)
class Published:
    """A published release folder: its URL (``<url>/params``, ``<url>/config.gin``),
    a one-line description and the sha256 per file where known (``None``: unknown)."""

    url: str
    description: str
    sha256: Mapping[str, str] | None = None
    files: tuple[str, ...] = RELEASE_FILES


#: Published learned optimizers. VeLO is the checkpoint learned_optimization's
#: ``research/general_lopt/prefab.py`` loads by default. Checksums: unknown (see module).
PUBLISHED: dict[str, Published] = {
    "velo": Published(
        f"{GCS_ROOT}/aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620",
        "VeLO (Metz et al. 2022), learned_optimization's release; fetched on first use"),
}


def default_cache_dir() -> Path:
    """``~/.cache/metaopt/lopt``."""
    return Path.home() / ".cache" / "metaopt" / "lopt"


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise HubError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes; refused")
    return data


def fetch_release(name: str, *, cache_dir: str | os.PathLike | None = None,
                  url: str | None = None, expected_sha256: Mapping[str, str] | None = None
                  ) -> Path:
    """The local release folder of published ``name``, downloading missing files.

    ``url`` overrides the published location (tests, mirrors); ``expected_sha256``
    overrides the package's pins. Returns ``<cache_dir>/<name>``.
    """
    if name not in PUBLISHED and url is None:
        raise HubError(f"unknown published optimizer '{name}'; known: {sorted(PUBLISHED)}")
    entry = PUBLISHED.get(name, Published(url or "", ""))
    base = (url or entry.url).rstrip("/")
    expected = dict(expected_sha256 if expected_sha256 is not None else entry.sha256 or {})
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    pins_path = folder / PINS_FILE
    pins = json.loads(pins_path.read_text()) if pins_path.is_file() else {}
    for fname in entry.files:
        target = folder / fname
        if target.is_file():
            data = target.read_bytes()
        else:
            file_url = f"{base}/{fname}"
            try:
                data = _download(file_url)
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise HubError(
                    f"could not fetch {file_url} ({reason}); to install by hand, place "
                    f"{', '.join(entry.files)} from {base}/ into {folder}/") from None
            digest = sha256_hex(data)
            want = expected.get(fname, pins.get(fname))
            if want is not None and digest != want:
                raise HubError(f"{file_url}: sha256 {digest} does not match the expected "
                               f"{want}; the file was not kept")
            atomic_write_bytes(target, data)
        digest = sha256_hex(data)
        want = expected.get(fname, pins.get(fname))
        if want is not None and digest != want:
            raise HubError(f"{target}: sha256 {digest} does not match the expected {want} "
                           "(delete the file to fetch it again)")
        pins[fname] = digest  # trust on first use
    atomic_write_text(pins_path, json.dumps(pins, indent=1, sort_keys=True) + "\n")
    return folder


def pretrained(name: str, *, cache_dir: str | os.PathLike | None = None,
               url: str | None = None, expected_sha256: Mapping[str, str] | None = None
               ) -> LearnedOptimizer:
    """A pretrained learned optimizer by name: shipped (registered) ones load directly,
    published ones (:data:`PUBLISHED`, or any release folder at ``url``) are fetched into
    the cache, verified and imported (see module docstring)."""
    from metaopt.lopt.checkpoint import load_checkpoint
    from metaopt.lopt.release import load_release
    from metaopt.registry import PRETRAINED_LOPTS

    if url is None and name not in PUBLISHED:
        if name in PRETRAINED_LOPTS:
            return load_checkpoint(name)
        known = sorted(set(PRETRAINED_LOPTS.names()) | set(PUBLISHED))
        raise HubError(f"no pretrained learned optimizer named '{name}' (known: "
                       f"{', '.join(known)})")
    folder = fetch_release(name, cache_dir=cache_dir, url=url,
                           expected_sha256=expected_sha256)
    return load_release(folder)


#: Learned optimizers meta-trained by metaopt and shipped inside the package (native
#: checkpoints under ``metaopt/lopt/pretrained/<name>``; provenance — command, config,
#: seed, commit — in each one's metadata; written by ``scripts/ship_pretrained.py``).
SHIPPED: dict[str, str] = {
    "mulo-small-fc-w128": "μLO (mulo_small_fc) meta-trained by PES on μP MLPs of width 128 in "
                          "five stages: configs/lopt_mulo.yaml, lopt_mulo_logloss.yaml, "
                          "lopt_mulo_logmean.yaml, lopt_mulo_glyphs.yaml, "
                          "lopt_mulo_glyphs_continued.yaml; checkpoints and step scales "
                          "chosen on training tasks, the release on the validation suite "
                          "mlp_mup_val; see its metadata",
    "sp-small-fc-w128": "small_fc_lopt meta-trained by PES on SP MLPs of width 128, μLO's "
                        "standard twin (configs/lopt_sp.yaml, then "
                        "configs/lopt_sp_logloss.yaml)",
    "mulo-small-fc-w128-meanloss": "stage 1 of mulo-small-fc-w128, mean training loss "
                                   "(configs/lopt_mulo.yaml, 3500 outer steps)",
    "mulo-small-fc-w128-logloss": "stage 2 of mulo-small-fc-w128, per-step log loss "
                                  "(configs/lopt_mulo_logloss.yaml; shipped as "
                                  "mulo-small-fc-w128 until 2026-12-07)",
    "mulo-small-fc-w128-logmean": "stage 3 of mulo-small-fc-w128, log of each truncation "
                                  "segment's mean loss (configs/lopt_mulo_logmean.yaml)",
    "mulo-small-fc-w128-glyphs": "stage 4 of mulo-small-fc-w128, log-mean objective with "
                                 "glyph tasks weighted ×3 (configs/lopt_mulo_glyphs.yaml; "
                                 "shipped as mulo-small-fc-w128 on 2026-12-07)",
    "sp-small-fc-w128-meanloss": "the mean-training-loss stage of sp-small-fc-w128 "
                                 "(configs/lopt_sp.yaml, 3500 outer steps)",
}
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def _register_shipped() -> None:
    from metaopt.registry import PRETRAINED_LOPTS

    for name, description in SHIPPED.items():
        if name not in PRETRAINED_LOPTS:
            PRETRAINED_LOPTS.register(name, PRETRAINED_DIR / name, help=description)


def _register_published() -> None:
    from metaopt.registry import PRETRAINED_LOPTS

    for name, entry in PUBLISHED.items():
        if name not in PRETRAINED_LOPTS:
            PRETRAINED_LOPTS.register(name, functools.partial(pretrained, name),
                                      help=entry.description)


_register_shipped()
_register_published()
