"""Shared pytest configuration for the package tests.

Every test seeds its own generator through the ``rng`` fixture; comparisons go through
:func:`companion.testing.assert_close` (one helper, messages that name the worst element).
"""

import os

# Quiet TensorFlow before anything imports it (the Makefile exports these too).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(20261122)


def pytest_addoption(parser):
    parser.addoption(
        "--build-book", action="store_true", default=False,
        help="build the book (jupyter-book build . -W -n --keep-going) and check the built site; "
             "without it, the site checks use an existing _build/html or skip",
    )
