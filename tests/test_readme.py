"""Every ```python block of README.md runs as a test (a snippet defines what it uses).

How blocks run (the rules a README author needs):

* Only fences whose info string is ``python`` or ``py`` are run (``bash`` etc. are not).
* Each block runs on its own: a fresh namespace, a fresh temporary working directory
  (a block may write files) and ``torch.manual_seed(0)``. So every block defines
  everything it uses and a reader can copy any block alone.
* A block whose first line is ``# readme: continues`` runs after the blocks it continues
  (back to the last block of the same section without that line), in their namespace:
  for a walkthrough split by prose.
* A block whose first line is ``# readme: not run: <reason>`` is skipped with the reason
  shown. Use it sparingly: only for a block that needs a large dataset or an optional
  extra that is not installed.

Blocks are found when this module is imported, so whatever blocks README.md holds are
the tests; a traceback points at the README's own line numbers. Each block should
finish in a few seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_LANGUAGES = ("python", "py")
_DIRECTIVE = re.compile(r"^\s*#\s*readme:\s*(?P<rest>.*)$", re.IGNORECASE)
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NOT_RUN = re.compile(r"^not run\b[\s:—–-]*(?P<reason>.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts (1-based line of its first code line)."""

    line: int
    section: str
    language: str
    code: str
    skip_reason: str | None = None
    continues: bool = False


def _directive(first_line: str, where: str) -> tuple[str | None, bool]:
    match = _DIRECTIVE.match(first_line)
    if match is None:
        return None, False
    rest = match.group("rest").strip()
    if rest.lower() == "continues":
        return None, True
    not_run = _NOT_RUN.match(rest)
    if not_run is None:
        raise ValueError(f"{where}: unknown readme directive {rest!r}; use "
                         "'# readme: continues' or '# readme: not run: <reason>'")
    reason = not_run.group("reason").strip()
    if not reason:
        raise ValueError(f"{where}: '# readme: not run' needs a reason")
    return reason, False


def parse_blocks(text: str, name: str = "README.md") -> list[Block]:
    """The fenced code blocks of a Markdown text, with their section heading."""
    blocks: list[Block] = []
    section = "(top)"
    fence: str | None = None
    language = ""
    start = 0
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            opening = _FENCE.match(stripped)
            if opening is not None:
                fence = opening.group("fence")
                info = opening.group("info").split()
                language = info[0].lower() if info else ""
                start, body = number + 1, []
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
            continue
        if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            code = "\n".join(body) + "\n"
            reason, continues = _directive(body[0] if body else "", f"{name}:{start}")
            blocks.append(Block(start, section, language, code, reason, continues))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"{name}:{start - 1}: code fence never closed")
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in RUN_LANGUAGES]


def chain(blocks: list[Block], block: Block) -> list[Block]:
    """``block`` preceded by the blocks of its section it continues."""
    i = blocks.index(block)
    out = [block]
    while out[0].continues:
        i -= 1
        if i < 0 or blocks[i].section != block.section:
            raise ValueError(f"README.md:{out[0].line}: '# readme: continues' but no earlier "
                             f"block in section {block.section!r}")
        out.insert(0, blocks[i])
    return out


def run_blocks(blocks: list[Block], name: str = "README.md") -> dict:
    """Execute blocks in one namespace; tracebacks carry the file's line numbers."""
    namespace: dict = {"__name__": "__readme__"}
    for b in blocks:
        source = "\n" * (b.line - 1) + b.code  # line numbers as in the file
        exec(compile(source, name, "exec"), namespace)
    return namespace


BLOCKS = runnable(parse_blocks(README.read_text(encoding="utf-8")))


def _id(block: Block) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-")[:40]
    return f"L{block.line}-{slug}"


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python blocks (or the parser missed them)"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip_reason is not None:
        pytest.skip(f"README.md:{block.line} is marked not run: {block.skip_reason}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_blocks(chain(BLOCKS, block))


# --------------------------------------------------------------------- the parser itself

_SAMPLE = """# Title
```bash
make demo
```
## A
```python
x = 1
```
Some prose.
```python
# readme: continues
y = x + 1
```
## B
```python
# readme: not run: needs the Omniglot folder
load_omniglot()
```
````python
print("four backticks")
````
"""


def test_parser_finds_blocks_sections_and_directives():
    blocks = parse_blocks(_SAMPLE)
    assert [(b.line, b.section, b.language) for b in blocks] == [
        (3, "Title", "bash"), (7, "A", "python"), (11, "A", "python"),
        (16, "B", "python"), (20, "B", "python")]
    py = runnable(blocks)
    assert [b.continues for b in py] == [False, True, False, False]
    assert py[2].skip_reason == "needs the Omniglot folder"
    assert run_blocks(chain(py, py[1]))["y"] == 2


def test_parser_refuses_bad_markup():
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```python\nx = 1\n")
    with pytest.raises(ValueError, match="needs a reason"):
        parse_blocks("```python\n# readme: not run\n```\n")
    with pytest.raises(ValueError, match="unknown readme directive"):
        parse_blocks("```python\n# readme: skip this\n```\n")
    orphan = runnable(parse_blocks("# S\n```python\n# readme: continues\n```\n"))
    with pytest.raises(ValueError, match="no earlier block"):
        chain(orphan, orphan[0])


def test_tracebacks_point_at_readme_lines():
    block = runnable(parse_blocks("# S\ntext\n```python\nx = 1\nundefined_name\n```\n"))[0]
    with pytest.raises(NameError) as info:
        run_blocks([block])
    assert info.traceback[-1].lineno + 1 == 5  # pytest's lineno is 0-based
