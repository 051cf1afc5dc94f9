"""The spread of the GPT chapter's live training run across seeds and CPUs.

Runs what ``book/gpt.ipynb`` runs live (the experiments' ``base`` model at their
budget, float32, one thread) for several seeds and prints one JSON line per seed::

    python tools/spread/gpt.py --seeds 0 1 2 --machine host

The second-machine settings (AVX2 kernels, one thread, another L2 size, one core) are
set by the caller in the environment, as ``make test-second-machine`` does;
``--collect`` merges the lines into ``book/_data/spread/gpt.json``. Issue 21: the
notebook's assert on the live run takes its margin from this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from companion.experiments import BASE_MODEL, BUDGET
from companion.train import TrainConfig, train


def run(seed: int) -> dict:
    torch.set_num_threads(1)
    config = TrainConfig(**BUDGET, eval_every=100, seed=seed, model=BASE_MODEL)
    result = train(config)
    return {
        "seed": seed,
        "first training loss": result.losses[0],
        "final validation loss": result.evaluations[-1][1],
        "final validation bits per byte": result.evaluations[-1][2],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--machine", default="host")
    parser.add_argument("--collect", nargs="*", help="JSON-lines files to merge")
    args = parser.parse_args()
    if args.collect is not None:
        values = [
            json.loads(line)
            for name in args.collect
            for line in Path(name).read_text().splitlines()
            if line.strip()
        ]
        out = {
            "chapter": "gpt",
            "claim": "the live run's validation loss ends below 5.0 nats per token, "
            "from a first training loss above 5.0",
            "values": values,
            "min final validation loss": min(
                v["final validation loss"] for v in values
            ),
            "max final validation loss": max(
                v["final validation loss"] for v in values
            ),
        }
        path = Path("book/_data/spread/gpt.json")
        path.write_text(json.dumps(out, indent=1) + "\n")
        return 0
    for seed in args.seeds:
        line = {"machine": args.machine, **run(seed)}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
