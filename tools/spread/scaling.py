"""Measure the spread of the scaling chapter's ring-attention timing (issue 21 policy).

Runs the chapter's own timing cells (its imports, ``W = 4``, ``sc-time-run`` and
``sc-time-show`` without the asserts at its end) in fresh Python processes, ``--runs``
times on this machine ("normal") and ``--runs`` times with the settings of
``tools/second_machine.py`` ("second": AVX2 dispatch, another L2 size, one thread,
``taskset -c 0``), ``--parallel`` processes at a time (2 is what ``make test`` does
with its two xdist workers), and adds the runs to ``book/_data/spread/scaling.json``
with the load average seen before each batch. ``--burn K`` runs K extra CPU-bound
processes beside each batch (half of them float64 matrix products, half Python loops),
for the load of a busy CI machine.

Usage (from the repository root; about a minute per run on two loaded cores)::

    python tools/spread/scaling.py --runs 3 --parallel 2
    python tools/spread/scaling.py --runs 2 --parallel 2 --burn 6 --machines second
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "book" / "scaling.ipynb"
SPREAD = ROOT / "book" / "_data" / "spread" / "scaling.json"
SECOND = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": (
        "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
    ),
    "COMPANION_L2_CACHE_BYTES": "524288",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


BURN = """
import sys
import numpy as np
a = np.random.default_rng(0).random((700, 700))
x = 0
while True:
    if sys.argv[1] == "matmul":
        a @ a
    else:
        x += 1
"""


def _program() -> str:
    cells = {c.get("id"): c for c in json.loads(NOTEBOOK.read_text())["cells"]}
    first = next(c for c in cells.values() if c["cell_type"] == "code")
    imports = "".join(first["source"])
    imports = "\n".join(x for x in imports.splitlines() if not x.startswith("%"))
    show = "".join(cells["sc-time-show"]["source"]).splitlines()
    show = "\n".join(x for x in show if not x.startswith("assert slowest"))
    report = """
out = {}
for n in (512, 2048):
    c, z = (runs[n, lay]["ms"] for lay in ring.LAYOUTS)
    out[n] = {"slowest": max(c) / max(z), "total": sum(z) / sum(c),
              "ms": {"contiguous": [round(x, 2) for x in c],
                     "zigzag": [round(x, 2) for x in z]}}
print("SPREAD " + json.dumps(out))
"""
    return "\n".join(
        [
            "import matplotlib\nmatplotlib.use('Agg')",
            imports,
            "W = 4",
            "".join(cells["sc-time-run"]["source"]),
            show,
            report,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--machines", nargs="+", default=["normal", "second"])
    parser.add_argument("--burn", type=int, default=0)
    args = parser.parse_args()
    program = _program()
    data = json.loads(SPREAD.read_text())
    new = []
    for machine in args.machines:
        env = {**os.environ, **(SECOND if machine == "second" else {})}
        command = [sys.executable, "-c", program]
        if machine == "second":
            command = ["taskset", "-c", "0", *command]
        done = 0
        while done < args.runs:
            batch = min(args.parallel, args.runs - done)
            one = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            burners = [
                subprocess.Popen(
                    [sys.executable, "-c", BURN, "matmul" if i % 2 else "loop"], env=one
                )
                for i in range(args.burn)
            ]
            if burners:
                time.sleep(20)  # let the load average rise
            load = [round(x, 1) for x in os.getloadavg()]
            start = time.time()
            procs = [
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=ROOT / "book",
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(batch)
            ]
            for proc in procs:
                stdout, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"a {machine} run failed ({proc.returncode})")
                line = next(x for x in stdout.splitlines() if x.startswith("SPREAD "))
                result = json.loads(line[len("SPREAD ") :])
                new.append(
                    {
                        "tag": f"{machine}, {batch} at once, load {load[0]}"
                        + (f", {args.burn} burners" if args.burn else ""),
                        "seconds": round(time.time() - start),
                        **result,
                    }
                )
                print(
                    machine,
                    load,
                    {n: round(r["slowest"], 2) for n, r in result.items()},
                    flush=True,
                )
            for burner in burners:
                burner.kill()
                burner.wait()
            done += batch
    data.setdefault("interleaved_runs", []).extend(new)
    every = data["interleaved_runs"]
    data["interleaved_range"] = {
        f"{what}_n{n}": [
            round(min(r[n][what] for r in every), 2),
            round(max(r[n][what] for r in every), 2),
        ]
        for n in ("512", "2048")
        for what in ("slowest", "total")
    }
    SPREAD.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data["interleaved_range"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
