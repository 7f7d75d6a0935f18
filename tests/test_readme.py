"""Every ```python block of README.md runs as written, on small shapes.

A block runs in a fresh namespace from the repository root. A block that needs smaller
sizes (or a test fixture in place of a checkpoint) says so in an HTML comment on the line
before it, invisible on the rendered page:

    <!-- readme-test: "(1, 4608, 24, 128)" -> "(1, 600, 2, 32)"; "a" -> "b" -->

Each quoted text must occur in the block (so a stale marker fails too) and is replaced
before the block runs.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->", re.S)
_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')


def python_blocks(text: str) -> list[dict]:
    """The ```python blocks of a Markdown text: code, first line, section, substitutions."""
    blocks, lines = [], text.splitlines()
    section, i = "(top)", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = _MARKER.search(lines[i - 1]) if i else None
            pairs = _PAIR.findall(marker.group(1)) if marker else []
            if marker and not pairs:
                raise ValueError(f"README.md line {i}: readme-test marker without "
                                 '"old" -> "new" pairs')
            blocks.append(dict(code="\n".join(lines[start:end]) + "\n", line=start,
                               section=section, subs=pairs))
            i = end
        i += 1
    return blocks


def _blocks():
    with open(README, encoding="utf-8") as f:
        return python_blocks(f.read())


def test_the_extraction_finds_blocks_and_substitutions():
    text = ('# A\n<!-- readme-test: "big" -> "small"; "x = 1" -> "x = 2" -->\n```python\n'
            'big = 1\n```\n## B\n```bash\nls\n```\n```python\nprint(2)\n```\n')
    got = python_blocks(text)
    assert [(b["section"], b["line"], b["subs"]) for b in got] == [
        ("A", 3, [("big", "small"), ("x = 1", "x = 2")]), ("B", 10, [])]
    assert len(_blocks()) >= 3            # the README's own blocks are found


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: f"line{b['line']}")
def test_readme_python_block_runs(block, monkeypatch):
    where = f"README.md block at line {block['line']} (section {block['section']!r})"
    code = block["code"]
    for old, new in block["subs"]:
        assert old in code, f"{where}: its readme-test marker replaces {old!r}, not in the block"
        code = code.replace(old, new)
    monkeypatch.chdir(ROOT)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__readme__"})
    except Exception as e:
        pytest.fail(f"{where} failed: {type(e).__name__}: {e}")
