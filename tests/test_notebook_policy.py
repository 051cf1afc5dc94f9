"""What strict nbval compares, and how notebook code reads (issues 21 and 22).

- A cell whose output is a measurement of the machine (times, memory under defaults
  chosen from cache sizes) or a result of float32 training is shown but not compared:
  it carries nbval's tag ``nbval-ignore-output`` and says so in its first line,
  ``# Shown, not compared: <why>``. The tag and the comment go together, so that a
  reader of the notebook sees which outputs CI does not check, and nothing is blinded
  by accident.
- Code cells fit the book's 88-character column.
- A cell of more than a few lines whose only output is a figure is tagged
  ``hide-input``: the reader sees the figure and can open the drawing code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
IGNORE_TAG = "nbval-ignore-output"
MARK = "# Shown, not compared: "
WIDTH = 88
# a figure cell this long or longer hides its code
FIGURE_CELL_LINES = 8


def _code_cells(path: Path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, c) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_shown_not_compared_cells_say_so(path):
    wrong = []
    for i, cell in _code_cells(path):
        tags = cell.get("metadata", {}).get("tags", [])
        first = "".join(cell["source"]).lstrip().split("\n", 1)[0]
        marked = first.startswith(MARK) and len(first) > len(MARK) + 3
        if (IGNORE_TAG in tags) != marked:
            state = "present" if IGNORE_TAG in tags else "absent"
            wrong.append(f"cell {i}: tag {state}, first line {first[:60]!r}")
    assert not wrong, (
        f"{path.name}: a cell shown but not compared needs both the tag "
        f"{IGNORE_TAG!r} and a first line '{MARK}<why>':\n  " + "\n  ".join(wrong)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_code_fits_the_column(path):
    long = [
        f"cell {i}, line {n + 1} ({len(line)} characters): {line[:50]}..."
        for i, cell in _code_cells(path)
        for n, line in enumerate("".join(cell["source"]).splitlines())
        if len(line) > WIDTH
    ]
    assert not long, f"{path.name}: code lines over {WIDTH} characters:\n  " + (
        "\n  ".join(long)
    )


def _only_figures(cell) -> bool:
    outputs = cell.get("outputs", [])
    if not outputs:
        return False
    for out in outputs:
        if out.get("output_type") == "stream":
            return False
        data = out.get("data", {})
        if out.get("output_type") in ("display_data", "execute_result"):
            if "image/png" not in data and "image/svg+xml" not in data:
                # a repr such as "<Figure size ...>" is a figure too
                text = "".join(data.get("text/plain", ""))
                if not text.startswith("<Figure"):
                    return False
        elif out.get("output_type") == "error":
            return False
    return True


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_figure_cells_hide_their_code(path):
    shown = [
        f"cell {i} ({len(''.join(cell['source']).splitlines())} lines)"
        for i, cell in _code_cells(path)
        if _only_figures(cell)
        and len("".join(cell["source"]).splitlines()) >= FIGURE_CELL_LINES
        and "hide-input" not in cell.get("metadata", {}).get("tags", [])
    ]
    assert not shown, (
        f"{path.name}: cells that only draw a figure should be tagged hide-input: "
        + ", ".join(shown)
    )
