"""The package, tests, tools and extensions are formatted and linted by ruff.

Lines are at most 88 characters (pyproject.toml ``[tool.ruff]``): the book shows package
code with ``literalinclude``, and its code column is about 88 characters wide.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["companion", "tests", "tools", "_ext"]


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
