"""The fenced blocks of README.md and docs/*.md and the test markers on them.

Every fenced block (```lang ... ```) in those files carries a marker, an HTML
comment on the nearest non-blank line above its opening fence:

``<!-- test: run NAME -->``
    tests/integration/test_docs.py runs the block with its check ``NAME``
    against real processes and compares what happens with what the docs
    say around it.
``<!-- test: by FILE#ID -->``
    another test runs it: ``tests/integration/FILE`` reads the block by
    ``ID`` (``block(doc, ID)`` here) and runs it.
``<!-- test: file NAME -->``
    the block is a file the doc's commands use: written as ``NAME`` into the
    directory where that doc's blocks run, before any of them.
``<!-- test: excerpt PATH -->``
    the block is a copy of lines of the repository's file ``PATH``: its
    lines must appear there, in order.
``<!-- test: skip REASON -->``
    not meant to run here (a systemd unit, a fragment that needs a context);
    the reason is required.

A block without a marker, or with an unknown kind, fails test_docs: no block
is silently skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
KINDS = ("run", "by", "file", "excerpt", "skip")

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: str            # "README.md", "docs/deployment.md"
    line: int           # 1-based line of the opening fence
    lang: str
    text: str           # the block's lines, indentation of the fence removed
    kind: str | None    # the marker's kind, None without a marker
    arg: str            # what follows the kind ("" without a marker)
    before: str         # the doc's text above the block (for checks that read the prose)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """Every fenced block of ``doc`` (a path relative to the repository)."""
    lines = (REPO / doc).read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(2) and _closing(lines, i):
            i += 1
            continue
        indent = len(m.group(1))
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1:j])
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        out.append(Block(doc, i + 1, m.group(2), body + "\n",
                         marker.group(1) if marker else None, marker.group(2) if marker else "",
                         "\n".join(lines[:i])))
        i = j + 1
    return out


def _closing(lines, i) -> bool:
    """A bare ``` line is a closing fence when an odd number of fences precede it."""
    return sum(1 for line in lines[:i] if _FENCE.match(line)) % 2 == 1


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def block(doc: str, ident: str) -> Block:
    """The block of ``doc`` marked ``<!-- test: by FILE#ident -->``."""
    found = [b for b in blocks(doc) if b.kind == "by" and b.arg.partition("#")[2] == ident]
    assert len(found) == 1, f"{doc}: expected one block marked 'by ...#{ident}', found {len(found)}"
    return found[0]


__all__ = ["Block", "blocks", "all_blocks", "block", "DOCS", "KINDS", "REPO"]
