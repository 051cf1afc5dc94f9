"""Every Markdown table in the book has as many cells in each row as in its header.

A row with an extra cell renders without it (markdown-it, which MyST uses, drops cells
beyond the header's count) and a short row renders with a blank: either way the reader
sees something other than what was written (issue 22 item 3: errata row 2 had 7 cells
under a 6-cell header).

Cells are counted as markdown-it splits them: on every ``|`` not escaped as ``\\|``,
including a ``|`` inside inline code or math, which therefore must be escaped in a
table (the test says so when that is the cause).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def book_pages() -> list[Path]:
    pages = sorted(BOOK.glob("*.ipynb")) + sorted(BOOK.glob("*.md"))
    assert pages, f"no pages found under {BOOK}"
    return pages


def markdown_blocks(path: Path) -> list[tuple[str, str]]:
    """(where, text) of each Markdown cell of a notebook, or of a whole .md page."""
    if path.suffix == ".md":
        return [(path.name, path.read_text(encoding="utf-8"))]
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [
        (f"{path.name} cell {i}", "".join(c["source"]))
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown"
    ]


def split_row(line: str) -> list[str]:
    """The cells of one table row, split on unescaped pipes (markdown-it's rule)."""
    line = line.strip()
    cells, current, i = [], "", 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            current += line[i : i + 2]
            i += 2
            continue
        if line[i] == "|":
            cells.append(current)
            current = ""
        else:
            current += line[i]
        i += 1
    cells.append(current)
    if line.startswith("|"):
        cells = cells[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        cells = cells[:-1]
    return cells


def tables(text: str):
    """(line number, header, rows) of every pipe table outside fenced code."""
    lines = text.split("\n")
    fenced = False
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            fenced = not fenced
        elif (
            not fenced
            and "|" in lines[i]
            and i + 1 < len(lines)
            and "-" in lines[i + 1]
            and DELIMITER.match(lines[i + 1].strip())
        ):
            header, rows, j = lines[i], [], i + 2
            while j < len(lines) and lines[j].strip() and "|" in lines[j]:
                rows.append((j + 1, lines[j]))
                j += 1
            yield i + 1, header, rows
            i = j
            continue
        i += 1


def test_split_row_follows_markdown_it():
    assert split_row("| a | b |") == [" a ", " b "]
    assert split_row("a | b") == ["a ", " b"]
    assert len(split_row(r"| `x \| y` | b |")) == 2  # an escaped pipe stays in its cell
    assert len(split_row("| `x | y` | b |")) == 3  # inline code does not protect a pipe


def test_tables_are_found():
    text = "x\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n| 3 | 4 |\n\n```\n| c |\n|---|\n```\n"
    found = list(tables(text))
    assert [(n, len(rows)) for n, _, rows in found] == [(3, 2)]


@pytest.mark.parametrize("page", book_pages(), ids=lambda p: p.name)
def test_every_table_row_has_as_many_cells_as_its_header(page):
    problems = []
    for where, text in markdown_blocks(page):
        for line_no, header, rows in tables(text):
            width = len(split_row(header))
            for row_no, row in rows:
                cells = split_row(row)
                if len(cells) != width:
                    hint = ""
                    if re.search(r"`[^`]*\|[^`]*`|\$[^$]*\|[^$]*\$", row):
                        hint = " (a '|' in inline code or math splits the cell: '\\|')"
                    problems.append(
                        f"{where}, line {row_no}: {len(cells)} cells under a "
                        f"{width}-cell header (table at line {line_no}){hint}: "
                        f"{row[:100]}"
                    )
    assert not problems, "\n".join(problems)
