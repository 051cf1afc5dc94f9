"""The backend a parametrized test asks for, skipped where its framework is missing."""

from __future__ import annotations

import importlib

import pytest

BACKENDS = ["numpy", "torch", "tensorflow"]


def backend_module(backend: str, submodule: str | None = None):
    """``companion.<backend>`` (or its ``submodule``, e.g. ``"paged"``); the test is
    skipped when ``backend`` is torch or tensorflow and that framework is not
    installed."""
    if backend in ("torch", "tensorflow"):
        pytest.importorskip(backend)
    name = (
        f"companion.{backend}"
        if submodule is None
        else f"companion.{backend}.{submodule}"
    )
    return importlib.import_module(name)
