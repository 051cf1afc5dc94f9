"""Shared pytest configuration for the package tests.

Every test seeds its own generator through the ``rng`` fixture; comparisons go through
:func:`companion.testing.assert_close` (one helper, messages that name the worst
element).
"""

import os
import subprocess
import sys
from pathlib import Path

# Quiet TensorFlow before anything imports it (the Makefile exports these too).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(20261122)


def pytest_addoption(parser):
    parser.addoption(
        "--build-book",
        action="store_true",
        default=False,
        help="build the book (jupyter-book build . -W -n --keep-going) and check the "
        "built site; "
        "without it, the site checks use an existing _build/html or skip",
    )


@pytest.fixture(scope="session")
def site(request) -> Path:
    if request.config.getoption("--build-book"):
        jupyter_book = Path(sys.executable).parent / "jupyter-book"
        result = subprocess.run(
            [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        log = result.stdout + result.stderr
        warnings = [
            line for line in log.splitlines() if "WARNING" in line or "ERROR" in line
        ]
        assert result.returncode == 0 and not warnings, (
            f"jupyter-book build failed (exit {result.returncode}); warnings/errors:\n"
            + "\n".join(warnings[:40])
            + "\n--- last lines ---\n"
            + "\n".join(log.splitlines()[-30:])
        )
        # The Chinese edition (issue 17), same flags, into _build/html/zh.
        result = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "i18n.py"), "build"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        log = result.stdout + result.stderr
        warnings = [
            line for line in log.splitlines() if "WARNING" in line or "ERROR" in line
        ]
        assert result.returncode == 0 and not warnings, (
            f"the zh build failed (exit {result.returncode}); warnings/errors:\n"
            + "\n".join(warnings[:40])
            + "\n--- last lines ---\n"
            + "\n".join(log.splitlines()[-30:])
        )
    elif not (SITE / "index.html").exists():
        pytest.skip(
            "no built site in _build/html: run `make book`, or pytest with --build-book"
        )
    return SITE
