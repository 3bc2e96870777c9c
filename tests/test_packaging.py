"""pyproject.toml states its license as an SPDX expression (PEP 639).

A ``{text = ...}`` table makes setuptools >= 77 print a deprecation warning on every
install; the string form needs setuptools >= 77 in the isolated build environment.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_string_and_the_build_backend_supports_it():
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert data["project"]["license"] == "Apache-2.0"
    setuptools = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(setuptools) == 1
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0].replace(" ", ""))
    assert minimum is not None and int(minimum.group(1)) >= 77, setuptools
