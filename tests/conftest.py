"""Shared pytest configuration for the package tests.

Every test seeds its own generator through the ``rng`` fixture; comparisons go through
:func:`companion.testing.assert_close` (one helper, messages that name the worst
element).
"""

import fcntl
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
    parser.addoption(
        "--second-machine",
        action="store_true",
        default=False,
        help="re-run strict nbval of the CPU-dependent notebooks as if on another "
        "machine (tools/second_machine.py; make test passes it)",
    )


def _build_problems(command: list[str], what: str) -> str:
    """Run one build; '' if it passed with no warning, else what went wrong."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    log = result.stdout + result.stderr
    warnings = [
        line for line in log.splitlines() if "WARNING" in line or "ERROR" in line
    ]
    if result.returncode == 0 and not warnings:
        return ""
    return (
        f"{what} failed (exit {result.returncode}); warnings/errors:\n"
        + "\n".join(warnings[:40])
        + "\n--- last lines ---\n"
        + "\n".join(log.splitlines()[-30:])
    )


def _build_site() -> str:
    """The English book (-W -n --keep-going), then the Chinese edition into
    _build/html/zh (issue 17); '' when both built cleanly."""
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    problems = _build_problems(
        [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going"],
        "jupyter-book build",
    )
    return problems or _build_problems(
        [sys.executable, str(ROOT / "tools" / "i18n.py"), "build"], "the zh build"
    )


@pytest.fixture(scope="session")
def site(request) -> Path:
    if request.config.getoption("--build-book"):
        # Under pytest-xdist (make test runs two workers) the first worker that needs
        # the site builds it, under a lock; the others wait and reuse that build, and
        # its verdict, in the same run (PYTEST_XDIST_TESTRUNUID names the run).
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid-{os.getpid()}")
        (ROOT / "_build").mkdir(exist_ok=True)
        marker = ROOT / "_build" / ".site-built"
        with open(ROOT / "_build" / ".site-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            built = marker.read_text().split("\n", 1) if marker.exists() else []
            if built and built[0] == run:
                problems = built[1]
            else:
                problems = _build_site()
                marker.write_text(f"{run}\n{problems}")
        assert not problems, problems
    elif not (SITE / "index.html").exists():
        pytest.skip(
            "no built site in _build/html: run `make book`, or pytest with --build-book"
        )
    return SITE


@pytest.fixture
def one_process_group():
    """A world of one gloo process, in this process (no environment variables set);
    the distributed tests call collectives and check errors in it."""
    import torch.distributed as dist

    from companion.torch.distributed import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()
