"""The API appendix (book/api.ipynb) documents every public module of the package.

A module added without an ``automodule`` entry would be importable but invisible on the
website; this test names it. Public = no path component starting with an underscore.
``companion.bench`` is a command-line tool (``python -m companion.bench``), described in
the chapters that quote its numbers, not an API.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_API = ("companion.bench",)


def public_modules() -> set[str]:
    names = set()
    for path in (ROOT / "companion").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__" or any(p.startswith("_") for p in parts):
            continue
        name = ".".join(parts)
        if not any(name == n or name.startswith(n + ".") for n in NOT_API):
            names.add(name)
    return names


def documented_modules() -> set[str]:
    nb = json.loads((ROOT / "book" / "api.ipynb").read_text(encoding="utf-8"))
    text = "\n".join("".join(cell["source"]) for cell in nb["cells"])
    return set(re.findall(r"\.\. automodule:: (\S+)", text))


def test_every_public_module_is_in_the_api_appendix():
    missing = sorted(public_modules() - documented_modules())
    assert not missing, (
        f"public modules without an automodule entry in book/api.ipynb: {missing}"
    )


def test_every_documented_module_exists():
    stale = sorted(
        name
        for name in documented_modules()
        if not (ROOT / Path(*name.split("."))).with_suffix(".py").exists()
        and not (ROOT / Path(*name.split(".")) / "__init__.py").exists()
    )
    assert not stale, f"book/api.ipynb documents modules that do not exist: {stale}"
