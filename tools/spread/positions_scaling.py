"""Measure the spread of the positions chapter's RoPE scaling grid (issue 21 policy).

Runs ``python -m companion.experiments_positions`` (seeds 0, 1, 2) on this machine
("host") and in a child process that behaves like another machine ("avx2-1thread":
the settings of ``_collect.SECOND_MACHINE``), checks that both give the same grid, and
writes the claims the chapter asserts into ``book/_data/spread/positions.json``,
beside the claims of ``positions_language.py`` (entries whose metric starts with
``scaling`` are replaced, the others kept).

Usage (from the repository root; several minutes on two cores)::

    python tools/spread/positions_scaling.py
    python tools/spread/positions_scaling.py --host a.json --second b.json  # reuse runs
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _collect import SECOND_MACHINE, claim_entry  # noqa: E402

# (rule, kind, part) -> (claim, assertion on the metric)
KEEP = "keeps the fastest pair: nothing lost without fine-tuning"
SLOW = "slows the fastest pair: near chance without fine-tuning"
CLAIMS = {
    **{
        (rule, "no_fine_tune", part): (f"{rule} {KEEP}", "== 1.0")
        for rule in ("ntk", "dynamic", "yarn", "longrope")
        for part in ("seen", "unseen")
    },
    **{
        (rule, "no_fine_tune", "seen"): (f"{rule} {SLOW}", "< 0.2")
        for rule in ("linear", "llama3")
    },
    **{
        (rule, "no_fine_tune", "unseen"): (f"{rule} {SLOW}", "< 0.12")
        for rule in ("linear", "llama3")
    },
    ("llama3", "fine_tune", "unseen"): ("50 steps repair llama3, every seed", "== 1.0"),
    ("linear", "fine_tune", "unseen"): (
        "50 steps repair PI for some seeds only",
        "min < 0.5 and max > 0.95",
    ),
    ("none", "no_fine_tune", "unseen"): ("plain RoPE extrapolates", "> 0.99"),
    ("none", "fine_tune", "unseen"): ("plain RoPE, fine-tuned", "== 1.0"),
}


def run(out: pathlib.Path, second: bool) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", **(SECOND_MACHINE if second else {})}
    command = [sys.executable, "-m", "companion.experiments_positions", "--out", out]
    if second:
        command = ["taskset", "-c", "0", *command]
    subprocess.run([str(c) for c in command], env=env, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", type=pathlib.Path)
    parser.add_argument("--second", type=pathlib.Path)
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    paths = {"host": args.host, "avx2-1thread": args.second}
    for machine, path in paths.items():
        if path is None:
            paths[machine] = tmp / f"{machine}.json"
            run(paths[machine], second=machine != "host")
    grids = {m: json.loads(p.read_text()) for m, p in paths.items()}
    for machine, grid in grids.items():
        print(machine, "cpu capability:", grid["machine"]["cpu_capability"])
    same = grids["host"]["seeds"] == grids["avx2-1thread"]["seeds"]
    print("host and avx2-1thread grids identical:", same)
    entries = []
    for (rule, kind, part), (claim, assertion) in CLAIMS.items():
        metric = f"scaling {rule} {kind} {part}"
        values = [
            {"seed": int(seed), "machine": machine, "value": row[rule][kind][index]}
            for machine, grid in grids.items()
            for seed, row in grid["seeds"].items()
            for index in [("seen", "unseen").index(part)]
        ]
        entry = claim_entry(claim, metric, values, f"{metric} {assertion}")
        entries.append(entry)
        print(f"{metric:40s} {entry['min']:.4f} .. {entry['max']:.4f}")
    path = ROOT / "book" / "_data" / "spread" / "positions.json"
    document = json.loads(path.read_text())
    kept = [c for c in document["claims"] if not c["metric"].startswith("scaling")]
    document["claims"] = kept + entries
    path.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
