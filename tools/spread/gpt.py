"""The spread of the GPT chapter's live training run across seeds and CPUs.

Issue 21: the notebook's assert on the live run (``book/gpt.ipynb``, cell ``gpt-09``)
takes its margin from a measured spread. This script runs what that cell runs (the
experiments' ``base`` model at their budget, float32, one thread) for each seed, on
this machine ("host") and in a child process that behaves like another machine
("avx2-1thread": torch, oneDNN, MKL and numpy limited to AVX2, one thread, one core,
another L2 size), checks that the host runs equal the ``base`` rows that
``python -m companion.experiments gpt`` stored in ``book/_data/gpt_experiments.json``
(the same training, so the same numbers on the machine that made that record), and
writes ``book/_data/spread/gpt.json`` in the schema of the other spread files::

    {"chapter": "gpt", "claims": [{"claim": str, "metric": str,
      "values": [{"seed": int, "machine": "host" | "avx2-1thread", "value": float}],
      "min": float, "max": float, "assert": str}]}

Usage (from the repository root; one or two minutes per run on a busy core)::

    python tools/spread/gpt.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from _collect import (  # tools/spread/_collect.py, beside this script
    claim_entry,
    run_on_both_machines,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (claim, metric, the assert written on the metric) of cell gpt-09
CLAIMS = [
    ("the live run starts near ln 512", "first training loss", "> 5.0"),
    (
        "the live run's validation loss ends below 5 nats per token",
        "final validation loss",
        "< 5.0",
    ),
    (
        "the same, in bits per byte (the prose's range)",
        "final validation bits per byte",
        "none (stated in the prose)",
    ),
]


def run(seed: int) -> dict[str, float]:
    """The notebook's live run for one seed: its first and final losses."""
    import torch

    from companion.experiments import BASE_MODEL, BUDGET
    from companion.train import TrainConfig, train

    torch.set_num_threads(1)
    config = TrainConfig(**BUDGET, eval_every=100, seed=seed, model=BASE_MODEL)
    result = train(config)
    return {
        "first training loss": result.losses[0],
        "final validation loss": result.evaluations[-1][1],
        "final validation bits per byte": result.evaluations[-1][2],
    }


def _stored_base_rows() -> dict[int, dict[str, float]]:
    record = json.loads((ROOT / "book/_data/gpt_experiments.json").read_text())
    return {
        r["seed"]: {
            "first training loss": r["first_train_loss"],
            "final validation loss": r["validation_loss"],
            "final validation bits per byte": r["bits_per_byte"],
        }
        for r in record["runs"]
        if r["name"] == "base"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one machine setting: print the raw metrics as JSON
        import torch

        out = {str(seed): run(seed) for seed in args.seeds}
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        print(json.dumps(out))
        return
    command = [sys.executable, __file__, "--child", "--seeds"]
    raw = run_on_both_machines(command + [str(s) for s in args.seeds])
    for metrics in raw.values():
        del metrics["cpu_capability"]
    stored = _stored_base_rows()
    for seed, metrics in raw["host"].items():
        if int(seed) in stored:
            gap = max(abs(metrics[m] - stored[int(seed)][m]) for m in metrics)
            print(f"host seed {seed}: largest gap to the stored base run {gap:.2g}")
    claims = []
    for claim, metric, condition in CLAIMS:
        values = [
            {"seed": int(seed), "machine": machine, "value": metrics[metric]}
            for machine in raw
            for seed, metrics in raw[machine].items()
        ]
        entry = claim_entry(claim, metric, values, f"{metric} {condition}")
        claims.append(entry)
        print(f"{metric:32s} {entry['min']:.6f} .. {entry['max']:.6f}")
    path = ROOT / "book" / "_data" / "spread" / "gpt.json"
    path.write_text(json.dumps({"chapter": "gpt", "claims": claims}, indent=1) + "\n")


if __name__ == "__main__":
    main()
