#!/usr/bin/env bash
# Install learn2learn into metaopt's venv on Python 3.11+ (benchmark peer only).
#
# learn2learn 0.2.0 ships Cython-generated .c files from Cython 0.29.24, which do not
# compile against CPython 3.11 headers, and it imports torchvision, gym and requests at
# `import learn2learn` time. This script, step by step and only where needed:
#   1. installs `requests` (real package; learn2learn.data.utils imports it);
#   2. installs `gym==0.26.2` without its dependencies (learn2learn/__init__ imports
#      learn2learn.gym unconditionally; gym_notices is left out on purpose: it only
#      prints an "unmaintained" banner on every import);
#   3. if no torchvision is importable, builds a tiny stub distribution `torchvision`
#      (version 0.0.0+l2lstub) in a temp dir and pip-installs it: it provides only the
#      names learn2learn imports at module level; using any of them raises. A real
#      torchvision, if present, is never touched. Remove it with `pip uninstall torchvision`.
#   4. installs Cython, downloads the learn2learn sdist with pip, regenerates the .c
#      files from the .pyx sources, and installs learn2learn with --no-deps;
#   5. checks `import learn2learn; learn2learn.algorithms.MAML`.
# qpth and pytorch_lightning are optional in learn2learn (guarded imports) and not installed.
#
# Usage: scripts/peers/install_learn2learn.sh [--force]
#   PYTHON=/path/to/python  (default: <repo>/.venv/bin/python)
#   L2L_VERSION=0.2.0       (sdist version to build)
# Idempotent: steps whose result is already present are skipped and say so.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONSTRAINTS="$ROOT/constraints.txt"
L2L_VERSION="${L2L_VERSION:-0.2.0}"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

pip_install() { "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }
importable() { "$PY" -c "import $1" >/dev/null 2>&1; }
say() { echo "[install_learn2learn] $*"; }

say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

if [[ $FORCE -eq 0 ]] && "$PY" -c "import learn2learn as l; from learn2learn.algorithms import MAML; assert l.__version__ == '$L2L_VERSION'" >/dev/null 2>&1; then
    say "learn2learn $L2L_VERSION already importable; nothing to do (use --force to rebuild)."
    exit 0
fi

# 1. requests
if importable requests; then say "requests: present"; else say "requests: installing"; pip_install requests; fi

# 2. gym (no deps: numpy and cloudpickle are already there; gym_notices only prints a banner)
if importable gym; then say "gym: present"; else say "gym: installing gym==0.26.2 --no-deps"; pip_install --no-deps "gym==0.26.2"; fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 3. torchvision stub
if importable torchvision; then
    say "torchvision: present ($("$PY" -c 'import torchvision; print(torchvision.__version__)')); not touched"
else
    say "torchvision: not importable; installing the learn2learn import stub (0.0.0+l2lstub)"
    STUB="$TMP/torchvision-stub"
    mkdir -p "$STUB/torchvision/transforms" "$STUB/torchvision/datasets"
    cat > "$STUB/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "torchvision"
version = "0.0.0+l2lstub"
description = "Import stub so that `import learn2learn` works without torchvision. Not torchvision."

[tool.setuptools]
packages = ["torchvision", "torchvision.transforms", "torchvision.datasets"]
TOML
    cat > "$STUB/torchvision/_stub.py" <<'PY'
"""Placeholders for the torchvision names learn2learn imports; using one raises."""


def placeholder(name: str) -> type:
    """Return a class named ``name`` that raises ImportError when instantiated."""

    def __init__(self, *args, **kwargs):
        raise ImportError(f"torchvision.{name} is a stub (installed for learn2learn imports "
                          "by metaopt's scripts/peers/install_learn2learn.sh); install torchvision.")

    return type(name, (), {"__init__": __init__, "__module__": "torchvision"})


def module_getattr(prefix: str):
    """A PEP 562 module ``__getattr__`` that hands out placeholders for public names."""

    def __getattr__(name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return placeholder(f"{prefix}.{name}")

    return __getattr__
PY
    cat > "$STUB/torchvision/__init__.py" <<'PY'
"""Stub, not torchvision: just enough for `import learn2learn` (see _stub.py)."""
__version__ = "0.0.0+l2lstub"
IS_LEARN2LEARN_STUB = True
from . import datasets, transforms  # noqa: E402
PY
    cat > "$STUB/torchvision/transforms/__init__.py" <<'PY'
from torchvision._stub import module_getattr

__getattr__ = module_getattr("transforms")
PY
    cat > "$STUB/torchvision/datasets/__init__.py" <<'PY'
from torchvision._stub import module_getattr, placeholder

ImageFolder = placeholder("datasets.ImageFolder")
__getattr__ = module_getattr("datasets")
PY
    cat > "$STUB/torchvision/datasets/folder.py" <<'PY'
def default_loader(path):
    raise ImportError("torchvision.datasets.folder.default_loader is a stub; install torchvision.")
PY
    cat > "$STUB/torchvision/datasets/omniglot.py" <<'PY'
from torchvision._stub import placeholder

Omniglot = placeholder("datasets.omniglot.Omniglot")
PY
    pip_install --no-deps --no-build-isolation "$STUB"
fi

# 4. learn2learn from the sdist with regenerated Cython sources
if importable Cython; then say "cython: present"; else say "cython: installing"; pip_install "cython>=3"; fi
say "downloading learn2learn==$L2L_VERSION sdist"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$TMP/dl" "learn2learn==$L2L_VERSION"
tar -xzf "$TMP/dl/learn2learn-$L2L_VERSION.tar.gz" -C "$TMP"
SRC="$TMP/learn2learn-$L2L_VERSION"
rm -rf "$SRC/.eggs"
for pyx in "$SRC"/learn2learn/data/*.pyx; do
    say "cythonize $(basename "$pyx") (old: $(head -c 40 "${pyx%.pyx}.c" | tr -d '/*\n'))"
    "$PY" -m cython -3 --directive embedsignature=True "$pyx"
done
say "building and installing learn2learn (--no-deps; compiles 3 C extensions, about 1 minute)"
pip_install --no-deps --no-build-isolation --force-reinstall "$SRC"

# 5. check
"$PY" - <<'PY'
import learn2learn as l2l
from learn2learn.algorithms import MAML
print(f"[install_learn2learn] OK: learn2learn {l2l.__version__} imports; MAML = {MAML.__module__}.MAML")
PY
