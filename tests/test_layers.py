"""The package's floors (issue 22 item 33): backends share private helpers only
through backend-free modules one floor down (``companion._*``), never each other's.

``companion.torch`` and ``companion.tensorflow`` may import public names of
``companion.numpy`` (``MultiHeadParams`` is one class for all three), but no private
one; no backend module imports ``companion.hf`` (the converters live there alone) at
module level. Checked on the source by reading the imports (AST), so nothing imports
a framework here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "companion"


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _imported_names(path: Path):
    """``(module, name, top_level)`` for every ``from module import name``, and
    ``(module, None, top_level)`` for ``import module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, id(node) in top


@pytest.mark.parametrize(
    "path", _modules("torch", "tensorflow"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_backend_imports_a_private_name_of_companion_numpy(path):
    private = [
        f"from {module} import {name}"
        for module, name, _ in _imported_names(path)
        if module.startswith("companion.numpy") and name and name.startswith("_")
    ]
    assert not private, (
        f"{path.relative_to(ROOT)} imports private names of companion.numpy: "
        f"{private}; move the shared helper one floor down (companion/_*.py)"
    )


@pytest.mark.parametrize(
    "path",
    _modules("numpy", "torch", "tensorflow"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_backend_module_imports_the_converters_at_module_level(path):
    found = [
        module
        for module, name, top_level in _imported_names(path)
        if top_level
        and (module == "companion.hf" or (module, name) == ("companion", "hf"))
    ]
    assert not found, f"{path.relative_to(ROOT)} imports companion.hf at module level"


def test_the_private_floor_imports_no_backend():
    for path in ROOT.glob("_*.py"):
        if path.name == "__init__.py":
            continue
        for module, _, _ in _imported_names(path):
            assert not module.startswith(
                ("companion.numpy", "companion.torch", "companion.tensorflow")
            ), f"{path.name} imports {module}: the floor below the backends"
            assert module.split(".")[0] not in ("torch", "tensorflow", "keras"), (
                f"{path.name} imports {module}"
            )


def test_the_multi_head_backends_share_one_kernel_choice():
    import companion.numpy.multihead as numpy_multihead
    from companion import _implementation

    assert numpy_multihead._choose_implementation is (
        _implementation.choose_implementation
    )
