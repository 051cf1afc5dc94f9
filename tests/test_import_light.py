"""`import companion` imports numpy only: no framework is loaded until asked for."""

import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "matplotlib")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "statement",
    [
        "import companion",
        "import companion.numpy",
        "import companion.conventions, companion.registry, companion.testing",
        "import companion.params",
    ],
)
def test_import_loads_no_framework(statement):
    loaded = _modules_after(statement)
    assert "companion.numpy" in loaded or "companion.numpy" not in statement
    heavy = sorted(m for m in loaded if m.split(".")[0] in FRAMEWORKS)
    assert not heavy, f"`{statement}` imported frameworks: {heavy[:10]}"


def test_torch_namespace_imports_torch_only():
    loaded = _modules_after("import companion.torch")
    assert "torch" in loaded
    assert "tensorflow" not in loaded


def test_tensorflow_namespace_is_quiet():
    """companion.tensorflow silences TF's C++ log lines before TF is imported."""
    code = (
        "import companion.tensorflow as t; import tensorflow as tf; "
        "tf.constant(1.0) + 1"
    )
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stderr.strip() == "", (
        f"TensorFlow printed on stderr:\n{out.stderr[:2000]}"
    )
