"""Shared by the spread scripts: merge the JSON lines their runs printed into a
chapter's spread file (``book/_data/spread/<chapter>.json``), one entry per claim with
the values of every run and their range; the second machine's settings."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: What makes a child process behave like another machine (the second machine of
#: issue 21): one ISA level down for ATen, oneDNN, MKL and numpy, another L2 size, one
#: thread.
SECOND_MACHINE = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": (
        "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
    ),
    "COMPANION_L2_CACHE_BYTES": "524288",
    "OMP_NUM_THREADS": "1",
}


def run_on_both_machines(command: list, env: dict | None = None) -> dict:
    """Run ``command`` (a child that prints its metrics as one JSON line, last, with
    its ``"cpu_capability"``) from the repository root on this machine (``"host"``)
    and as the second machine (``"avx2-1thread"``: :data:`SECOND_MACHINE`, pinned to
    core 0); returns each one's metrics by machine label."""
    raw = {}
    for machine, extra in (("host", {}), ("avx2-1thread", SECOND_MACHINE)):
        pinned = command if machine == "host" else ["taskset", "-c", "0", *command]
        done = subprocess.run(
            pinned,
            env={**os.environ, **(env or {}), **extra},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        raw[machine] = json.loads(done.stdout.strip().splitlines()[-1])
        print(machine, "cpu capability:", raw[machine]["cpu_capability"], flush=True)
    return raw


def claim_entry(claim: str, metric: str, values: list, assertion: str) -> dict:
    """One claim of a spread file: the ``values`` of every run (``{"seed",
    "machine", "value"}``), their range and the assert written on the metric."""
    numbers = [v["value"] for v in values]
    return {
        "claim": claim,
        "metric": metric,
        "values": values,
        "min": min(numbers),
        "max": max(numbers),
        "assert": assertion,
    }


def collect(paths, claims: dict, chapter: str, out: pathlib.Path) -> None:
    """``claims`` maps a metric to ``(claim, assertion)``; each line of the logs in
    ``paths`` that starts with ``{`` is one run's ``{"metric", "seed", "machine",
    "value"}``."""
    values = {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                values.setdefault(row.pop("metric"), []).append(row)
    entries = [
        claim_entry(
            claim,
            metric,
            sorted(values[metric], key=lambda r: (r["machine"], r["seed"])),
            assertion,
        )
        for metric, (claim, assertion) in claims.items()
    ]
    spread = {"chapter": chapter, "claims": entries}
    out.write_text(json.dumps(spread, indent=1) + "\n")
