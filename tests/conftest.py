"""Test-wide settings: caches and Ray state stay inside the repository."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("METAOPT_CACHE", str(ROOT / ".cache" / "metaopt"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
