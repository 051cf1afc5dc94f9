"""The second-machine run of ``make test`` (issue 21).

The notebooks whose outputs could depend on the CPU are run again under strict nbval in
processes that behave like another machine (``tools/second_machine.py``: a lower
instruction set for ATen, oneDNN, MKL, OpenBLAS and numpy, another L2 size for the
package's default tiles, one thread on one core). The first test proves the settings
took effect; then one test per notebook. They run with ``pytest --second-machine``
(``make test`` passes it); the settings' own unit tests always run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "second_machine", ROOT / "tools" / "second_machine.py"
)
second_machine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(second_machine)

NOTEBOOKS = [p.relative_to(ROOT) for p in second_machine.cpu_dependent_notebooks()]


@pytest.fixture(scope="module")
def machine(request):
    if not request.config.getoption("--second-machine"):
        pytest.skip("the second-machine run needs pytest --second-machine (make test)")
    return second_machine.second_machine_env()


def test_settings_take_effect(machine):
    """Each emulated setting is seen by a fresh process (the probe), not only set."""
    env, prefix, extra, facts = machine
    host = second_machine._probe()
    assert facts["aten"] != host["aten"], (host["aten"], facts["aten"])
    assert facts["l2_bytes"] != host["l2_bytes"]
    assert facts["l2_bytes"] == int(extra["COMPANION_L2_CACHE_BYTES"])
    assert facts["torch_threads"] == 1
    assert facts.get("onednn_isa") and "AVX-512" not in facts["onednn_isa"]
    assert not any("AVX512" in t or t == "X86_V4" for t in facts["numpy_dispatch"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_on_second_machine(machine, path, tmp_path):
    env, prefix, extra, facts = machine
    # its own TensorBoard folder: the first pass may be reading the same chapter's
    # event files back at this moment (pytest-xdist runs both at once)
    env = {**env, "COMPANION_RUNS_DIR": str(tmp_path)}
    command = prefix + [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "--nbval",
        "--nbval-current-env",
        "--nbval-sanitize-with",
        "tests/nbval_sanitize.cfg",
        "--nbval-cell-timeout=600",
        str(path),
    ]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    settings = " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
    assert result.returncode == 0, (
        f"{path} differs on the second machine ({settings}):\n"
        + "\n".join((result.stdout + result.stderr).splitlines()[-80:])
    )


# ------------------------------------------------------------ the settings themselves


def test_l2_override_sets_the_default_blocks(monkeypatch):
    from companion.numpy import attention

    for l2, side in [(512 << 10, 256), (2 << 20, 512), (8 << 20, 1024)]:
        monkeypatch.setenv("COMPANION_L2_CACHE_BYTES", str(l2))
        attention._block_side.cache_clear()
        assert attention._l2_cache_bytes() == l2
        assert attention._default_blocks(4096, 4096, 4) == (side, side)
    attention._block_side.cache_clear()


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_l2_override_refuses_nonsense(monkeypatch, value):
    from companion.numpy import attention

    monkeypatch.setenv("COMPANION_L2_CACHE_BYTES", value)
    with pytest.raises(ValueError, match="COMPANION_L2_CACHE_BYTES"):
        attention._l2_cache_bytes()


def test_settings_go_one_level_down():
    env, expect = second_machine.settings(
        {"aten": "AVX512", "numpy_dispatch": ["X86_V3", "X86_V4"], "l2_bytes": 2 << 20}
    )
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["NPY_DISABLE_CPU_FEATURES"] == "X86_V4"
    assert env["COMPANION_L2_CACHE_BYTES"] == str(512 << 10)
    env, expect = second_machine.settings(
        {"aten": "AVX2", "numpy_dispatch": ["X86_V3"], "l2_bytes": 512 << 10}
    )
    assert env["ATEN_CPU_CAPABILITY"] == "default"
    assert "NPY_DISABLE_CPU_FEATURES" not in env
    assert env["COMPANION_L2_CACHE_BYTES"] == str(2 << 20)
    assert all(env[k] == "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def test_every_training_or_timing_notebook_is_listed():
    """A notebook that trains, times or measures memory is in the second-machine run."""
    listed = {p.stem for p in NOTEBOOKS}
    for name in ("fast", "translation", "vision", "language", "positions"):
        assert name in listed, sorted(listed)
