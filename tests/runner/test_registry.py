"""Registries are filled explicitly, in one place, idempotently; no import circles.

* importing ``metaopt.bilevel`` registers nothing (no ``replace=True`` side effects);
* :func:`register_builtins` registers every built-in, BOME included, and can run twice;
* the runner's modules import each other without a cycle (every import statement,
  function-level ones included, is an edge);
* options are checked against the named class before anything is built.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metaopt.errors import ConfigError
from metaopt.registry import ESTIMATORS, EXPERIMENTS, TASKS, Registry, UnknownNameError
from metaopt.runner.builtins import register_builtins

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_library_registers_nothing():
    code = ("import metaopt.bilevel, metaopt.bilevel.bome, metaopt.runner.experiment\n"
            "from metaopt.registry import ESTIMATORS, EXPERIMENTS\n"
            "print(len(ESTIMATORS), len(EXPERIMENTS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["0", "0"], out.stderr


def test_register_builtins_is_complete_and_idempotent():
    from metaopt.bilevel import BOME, F2SA, FirstOrder, Implicit, Unrolled

    register_builtins()
    register_builtins()
    assert {n: ESTIMATORS.get(n) for n in ESTIMATORS.names()} == {
        "bome": BOME, "f2sa": F2SA, "first_order": FirstOrder, "implicit": Implicit,
        "unrolled": Unrolled}
    assert {"ridge_hyper", "hypercleaning", "few_shot", "sinusoid"} <= set(EXPERIMENTS)
    assert "sinusoid" in TASKS


def test_no_import_error_is_swallowed():
    sources = [p.read_text() for p in (REPO / "metaopt").rglob("*.py")]
    assert not any("IMPORT_ERRORS" in s for s in sources)
    assert not any(re.search(r"(ESTIMATORS|EXPERIMENTS)\.register\([^)]*replace=True", s)
                   for s in sources)


def _runner_import_graph() -> dict[str, set[str]]:
    root = REPO / "metaopt"
    files = {p: ".".join(p.relative_to(REPO).with_suffix("").parts)
             for p in [*(root / "runner").rglob("*.py"), root / "cli.py", root / "registry.py"]}
    names = {m.removesuffix(".__init__") for m in files.values()}
    graph: dict[str, set[str]] = {}
    for path, module in files.items():
        module = module.removesuffix(".__init__")
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            edges.update(t for t in targets if t in names and t != module)
    return graph


def test_runner_modules_have_no_import_cycle():
    graph = _runner_import_graph()
    assert "metaopt.runner.experiments.ridge_hyper" in graph["metaopt.runner.builtins"]
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, n]))
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_cycle_the_issue_named_is_gone():
    graph = _runner_import_graph()
    assert not graph["metaopt.runner.experiment"] & {
        "metaopt.runner.experiments", "metaopt.runner.builtins"}


def test_options_are_checked_against_the_class():
    reg: Registry = Registry("thing")

    def make(a: int, *, b: float = 1.0) -> tuple:
        if a < 0:
            raise ValueError("a must be >= 0")
        return a, b

    reg.register("make", make)
    assert reg.build("make", {"a": 2, "b": 3.0}) == (2, 3.0)
    with pytest.raises(ConfigError, match=r"'make' does not accept option\(s\) c; it "
                                          r"accepts: a, b"):
        reg.build("make", {"a": 1, "c": 2})
    with pytest.raises(ConfigError, match="missing a required argument: 'a'"):
        reg.build("make", {})
    with pytest.raises(ConfigError, match="a must be >= 0"):
        reg.build("make", {"a": -1})
    with pytest.raises(ConfigError, match="unknown thing 'nope'; known: make"):
        reg.build("nope")
    with pytest.raises(UnknownNameError) as info:
        reg.get("nope")
    assert isinstance(info.value, KeyError) and str(info.value) == \
        "unknown thing 'nope'; known: make"
    reg.register("make", make)  # same object again: a no-op
    with pytest.raises(KeyError, match="already registered"):
        reg.register("make", lambda: None)


def test_ridge_settings_validate_the_estimator():
    from metaopt.runner.experiments.ridge_hyper import RidgeHyperConfig

    RidgeHyperConfig(estimator="implicit", estimator_options={"solver": "cg"})
    with pytest.raises(ConfigError, match="unknown estimator 'ift'"):
        RidgeHyperConfig(estimator="ift")
    with pytest.raises(ConfigError, match="'implicit' does not accept option"):
        RidgeHyperConfig(estimator="implicit", estimator_options={"solverr": "cg"})
