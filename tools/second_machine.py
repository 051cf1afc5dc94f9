"""Run strict nbval as if on another machine (``make test-second-machine``).

The stored outputs that nbval compares must not depend on the CPU: its instruction set,
its L2 cache size or the number of threads (issue 21). This script re-runs the notebooks
whose outputs could depend on the CPU -- every notebook that trains, times or measures
memory -- in processes that behave like another machine:

- PyTorch's ATen kernels one dispatch level below the host's (``ATEN_CPU_CAPABILITY``:
  AVX-512 -> AVX2 -> default);
- oneDNN and MKL capped one level below too (``ONEDNN_MAX_CPU_ISA``,
  ``MKL_ENABLE_INSTRUCTIONS``), numpy's OpenBLAS on Haswell (AVX2) kernels where the
  host has AVX-512 (``OPENBLAS_CORETYPE``), numpy's own AVX-512 loops switched off
  (``NPY_DISABLE_CPU_FEATURES``);
- another L2 size for the package's default tile sizes (``COMPANION_L2_CACHE_BYTES``:
  512 KiB, or 2 MiB where the host has 512 KiB or less);
- one thread, on one core (``OMP_NUM_THREADS=1`` and friends, ``taskset -c 0``).

Before running the notebooks it checks, in a fresh process with the same settings, that
each setting took effect (torch's reported capability, oneDNN's and MKL's verbose ISA
lines, OpenBLAS's kernel, numpy's dispatch table, the package's L2 size, the thread
count, the CPU affinity), and stops with an error naming any that did not.

TensorFlow's CPU kernels (Eigen) are compiled for one instruction set and cannot be
redirected; its thread count follows the affinity.

Usage: ``python tools/second_machine.py [--settings] [--list] [NOTEBOOK ...]``
(default: every CPU-dependent notebook, see :func:`cpu_dependent_notebooks`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What makes a notebook's outputs depend on the CPU: training (a backward pass, an
# optimiser, Keras fit), timing, or measuring memory.
CPU_DEPENDENT = re.compile(
    r"\.backward\(|\boptim\.|\.fit\(|\btrain(?:_\w+)?\(|perf_counter|timeit|"
    r"\btime\.time\(|tracemalloc|memprobe|peak_|ru_maxrss|companion\.bench"
)

# numpy's dispatch targets that only AVX-512 machines run.
AVX512_TARGETS = ("X86_V4", "AVX512F", "AVX512CD", "AVX512_KNL", "AVX512_KNM")
AVX512_TARGETS += ("AVX512_SKX", "AVX512_CLX", "AVX512_CNL", "AVX512_ICL")
AVX512_TARGETS += ("AVX512_SPR",)


def _code(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def cpu_dependent_notebooks() -> list[Path]:
    """The notebooks under book/ whose code trains, times or measures memory, or that
    hold a cell shown but not compared (tag ``nbval-ignore-output``)."""
    found = []
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        if CPU_DEPENDENT.search(_code(path)) or "nbval-ignore-output" in text:
            found.append(path)
    return found


def _probe(env: dict[str, str] | None = None, prefix: list[str] | None = None) -> dict:
    """Facts about the CPU as a fresh process with ``env`` sees them."""
    script = r"""
import json, os
import numpy as np
import numpy._core._multiarray_umath as um
import threadpoolctl
import torch
from companion.numpy import attention
out = {
    "aten": torch.backends.cpu.get_cpu_capability(),
    "numpy_dispatch": [t for t in um.__cpu_dispatch__ if um.__cpu_features__.get(t)],
    "numpy_features": [k for k, v in um.__cpu_features__.items() if v],
    "l2_bytes": attention._l2_cache_bytes(),
    "torch_threads": torch.get_num_threads(),
    "affinity": sorted(os.sched_getaffinity(0)),
    "blas": [
        {k: i.get(k) for k in ("internal_api", "architecture", "num_threads")}
        for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"
    ],
}
# oneDNN and MKL say which instruction set they dispatched to when asked to be verbose
x = torch.randn(8, 64, 28, 28)
torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3), padding=1)
a = torch.randn(64, 64)
(a @ a).sum().item()
print("PROBE" + json.dumps(out))
"""
    run_env = dict(os.environ if env is None else env)
    run_env.update(ONEDNN_VERBOSE="1", MKL_VERBOSE="1")
    result = subprocess.run(
        (prefix or []) + [sys.executable, "-c", script],
        env=run_env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the probe failed:\n{result.stdout}\n{result.stderr}")
    facts = {}
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        if line.startswith("PROBE"):
            facts.update(json.loads(line[len("PROBE") :]))
        elif line.startswith("onednn_verbose") and ",isa:" in line:
            facts["onednn_isa"] = line.split(",isa:", 1)[1].strip()
        elif line.startswith("MKL_VERBOSE") and "enabled processors" in line:
            facts["mkl_isa"] = line
    return facts


def _taskset() -> list[str]:
    tool = shutil.which("taskset")
    return [tool, "-c", "0"] if tool else []


def settings(host: dict) -> tuple[dict[str, str], dict]:
    """The environment of the second machine, and what the probe must then report."""
    aten = host["aten"].upper()
    env: dict[str, str] = {}
    expect: dict = {}
    if aten.startswith("AVX512"):
        env["ATEN_CPU_CAPABILITY"] = "avx2"
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
        env["OPENBLAS_CORETYPE"] = "Haswell"
        expect.update(aten="AVX2", onednn="AVX2", mkl="AVX2", blas="Haswell")
    else:
        env["ATEN_CPU_CAPABILITY"] = "default"
        env["ONEDNN_MAX_CPU_ISA"] = "SSE41"
        env["MKL_ENABLE_INSTRUCTIONS"] = "SSE4_2"
        expect.update(aten="DEFAULT", onednn="SSE4.1", mkl="SSE4.2")
    disabled = [t for t in AVX512_TARGETS if t in host["numpy_dispatch"]]
    if disabled:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(disabled)
        expect["numpy_off"] = disabled
    l2 = 2 << 20 if host["l2_bytes"] <= 512 << 10 else 512 << 10
    env["COMPANION_L2_CACHE_BYTES"] = str(l2)
    expect["l2_bytes"] = l2
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    expect["threads"] = 1
    return env, expect


def verify(facts: dict, expect: dict, pinned: bool) -> list[str]:
    """The settings that did not take effect (empty when all did)."""
    problems = []

    def check(name, ok, seen):
        if not ok:
            problems.append(f"{name}: expected {expect.get(name)!r}, saw {seen!r}")

    check("aten", facts.get("aten", "").upper() == expect["aten"], facts.get("aten"))
    check(
        "onednn",
        expect["onednn"] in facts.get("onednn_isa", "")
        and "AVX-512" not in facts.get("onednn_isa", "")
        and "AVX512" not in facts.get("onednn_isa", ""),
        facts.get("onednn_isa"),
    )
    mkl = facts.get("mkl_isa", "")
    check("mkl", expect["mkl"] in mkl and "AVX-512" not in mkl, mkl)
    if "blas" in expect:
        arch = [b.get("architecture") for b in facts.get("blas", [])]
        check("blas", expect["blas"] in arch, arch)
    for target in expect.get("numpy_off", []):
        on = target in facts.get("numpy_dispatch", [])
        check("numpy_off", not on, facts.get("numpy_dispatch"))
    check(
        "l2_bytes", facts.get("l2_bytes") == expect["l2_bytes"], facts.get("l2_bytes")
    )
    threads = facts.get("torch_threads")
    check("threads", threads == expect["threads"], threads)
    if pinned:
        check("affinity", facts.get("affinity") == [0], facts.get("affinity"))
    return problems


def second_machine_env() -> tuple[dict[str, str], list[str], dict, dict]:
    """``(env, command prefix, settings, facts)``; raises if a setting did not hold."""
    host = _probe()
    extra, expect = settings(host)
    env = dict(os.environ)
    env.update(extra)
    prefix = _taskset()
    facts = _probe(env, prefix)
    problems = verify(facts, expect, pinned=bool(prefix))
    if problems:
        raise RuntimeError(
            "the second-machine settings did not take effect:\n  "
            + "\n  ".join(problems)
        )
    return env, prefix, extra, facts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="default: the CPU-dependent ones")
    parser.add_argument("--list", action="store_true", help="list the notebooks, exit")
    parser.add_argument(
        "--settings", action="store_true", help="check and print the settings, exit"
    )
    args, pytest_args = parser.parse_known_args(argv)
    paths = [Path(p) for p in args.notebooks] or [
        p.relative_to(ROOT) for p in cpu_dependent_notebooks()
    ]
    if args.list:
        print("\n".join(str(p) for p in paths))
        return 0
    env, prefix, extra, facts = second_machine_env()
    print("second machine:", " ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    print(
        f"  verified: ATen {facts['aten']}, oneDNN {facts['onednn_isa']}, "
        f"OpenBLAS {[b.get('architecture') for b in facts['blas']]}, "
        f"numpy dispatch {facts['numpy_dispatch']}, L2 {facts['l2_bytes']} bytes, "
        f"{facts['torch_threads']} thread(s), cores {facts['affinity']}",
        flush=True,
    )
    if args.settings:
        return 0
    command = prefix + [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--nbval",
        "--nbval-current-env",
        "--nbval-sanitize-with",
        "tests/nbval_sanitize.cfg",
        "--nbval-cell-timeout=600",
        *pytest_args,
        *[str(p) for p in paths],
    ]
    return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
