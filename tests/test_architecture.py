"""The import directions the README's Architecture section promises, checked on the source.

Every import statement (module level or inside functions) of each room is read with
``ast``; a room may not import the rooms listed against it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE = ["metaopt/errors.py", "metaopt/tree.py", "metaopt/fileio.py", "metaopt/params.py",
        "metaopt/optim", "metaopt/bilevel"]
UPPER = ("metaopt.algorithms", "metaopt.lopt", "metaopt.runner", "metaopt.cli",
         "metaopt.distributed", "tasks", "ray")

RULES = [
    (CORE, UPPER),
    (["tasks"], ("metaopt.runner", "metaopt.cli", "metaopt.algorithms", "ray")),
    (["metaopt/lopt"], ("metaopt.algorithms", "metaopt.runner", "metaopt.cli", "tasks",
                        "ray")),
    (["metaopt/algorithms"], ("metaopt.runner", "metaopt.cli", "tasks", "ray")),
]


def _files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = ROOT / p
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("rooms,forbidden", RULES, ids=[",".join(r[0]) for r in RULES])
def test_import_directions(rooms: list[str], forbidden: tuple[str, ...]) -> None:
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in _files(rooms) for line, name in _imports(path)
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import tasks.x\n\ndef f():\n    from metaopt.runner import loop\n")
    assert [n for _, n in _imports(src)] == ["tasks.x", "metaopt.runner"]
