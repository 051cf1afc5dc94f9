"""The package, tests, tools, extensions and the notebooks' code are formatted and
linted by ruff.

Lines are at most 88 characters (pyproject.toml ``[tool.ruff]``): the book shows package
code with ``literalinclude``, and its code column is about 88 characters wide. Notebook
cells are checked too (issue 22): ruff reads ``book/*.ipynb`` cell by cell, with the
notebook rules of pyproject.toml (imports may follow prose, a cell may end on a value);
their line width is checked by ``tests/test_notebook_policy.py``.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["companion", "tests", "tools", "_ext", "book"]


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    return [found]


@pytest.mark.parametrize(
    "command",
    [["check"], ["format", "--check"]],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff(command):
    result = subprocess.run(
        _ruff() + command + PATHS, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
