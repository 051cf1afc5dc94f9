"""Measure the spread of the trained models' results in *positions* and *language*.

Issue 21: a claim about a trained model holds with a margin that was measured. This
script runs the chapters' own training code (the notebook cells, executed from the
notebook file, so the measurement follows the chapter) for several seeds, on this
machine ("host") and in a child process that behaves like another machine
("avx2-1thread": torch, oneDNN, MKL and numpy limited to AVX2, one thread, another L2
size), and writes ``book/_data/spread/<chapter>.json``:

    {"chapter": str, "claims": [{"claim": str, "metric": str,
      "values": [{"seed": int, "machine": "host" | "avx2-1thread", "value": float}],
      "min": float, "max": float, "assert": str}]}

Usage (from the repository root; a few minutes on two cores)::

    python tools/spread/positions_language.py positions language --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from _collect import (  # tools/spread/_collect.py, beside this script
    claim_entry,
    run_on_both_machines,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The claims each chapter asserts, as (claim, metric, assert written on the metric).
CLAIMS = {
    "positions": [
        ("learned solves the trained lengths", "learned seen", "> 0.95"),
        ("sinusoidal solves the trained lengths", "sinusoidal seen", "> 0.95"),
        ("rope solves the trained lengths", "rope seen", "> 0.95"),
        ("rope carries the solution to unseen lengths", "rope unseen", "> 0.95"),
        ("learned fails beyond the trained lengths", "learned unseen", "< 0.25"),
        ("sinusoidal fails beyond the trained lengths", "sinusoidal unseen", "< 0.25"),
        ("alibi learns more slowly in this budget", "alibi seen", "< 0.8"),
        ("alibi: well above chance on unseen lengths", "alibi unseen", "> 0.4"),
        ("alibi: most of what it learns carries over", "alibi unseen / seen", "> 0.75"),
        ("no positions: the causal mask alone is not enough", "None seen", "< 0.4"),
    ],
    "language": [
        ("the tied model reverses the test sequences", "tied token", ">= 0.99"),
        ("the untied model reverses the test sequences", "untied token", ">= 0.99"),
        ("tied: whole answers right", "tied whole", ">= 0.99"),
        ("untied: whole answers right", "untied whole", ">= 0.99"),
        ("tied: loss fell more than a hundredfold", "tied loss drop", "> 100"),
        ("untied: loss fell more than a hundredfold", "untied loss drop", "> 100"),
        ("one head looks at the mirrored digit", "best head hits", ">= 0.99"),
    ],
}


def _cells(notebook: str, ids: list[str], namespace: dict) -> None:
    import nbformat

    cells = {c.get("id"): c for c in nbformat.read(ROOT / notebook, 4).cells}
    for cell_id in ids:
        lines = cells[cell_id].source.splitlines()
        source = "\n".join(line for line in lines if not line.startswith("%"))
        exec(compile(source, f"{notebook}:{cell_id}", "exec"), namespace)


def _positions(seed: int) -> dict[str, float]:
    ns: dict = {}
    _cells("book/positions.ipynb", ["37818ef2", "7036b94e"], ns)
    metrics = {}
    for scheme in ("learned", "sinusoidal", "rope", "alibi", None):
        seen, unseen = ns["lag_accuracy"](scheme, seed=seed)
        metrics[f"{scheme} seen"], metrics[f"{scheme} unseen"] = seen, unseen
    metrics["alibi unseen / seen"] = metrics["alibi unseen"] / metrics["alibi seen"]
    return metrics


class _Losses:
    def __init__(self):
        self.values = []

    def add_scalar(self, tag, value, step):
        self.values.append(value)


def _language(seed: int) -> dict[str, float]:
    import numpy as np

    ns: dict = {}
    _cells("book/language.ipynb", ["95930eab", "faf9ee74", "689d5e52"], ns)
    metrics = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        model, losses = ns["make"](tied, seed=seed), _Losses()
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                ns["train_lm"](model, ns["train"], seed=seed, writer=losses)
            finally:
                sys.stdout = stdout
        curve = np.array(losses.values)
        metrics[f"{name} loss drop"] = float(curve[:10].mean() / curve[-10:].mean())
        token, whole = ns["answer_accuracy"](model, ns["test"])
        metrics[f"{name} token"], metrics[f"{name} whole"] = token, whole
        if tied:
            ns["tied_model"] = model
            _cells("book/language.ipynb", ["d3ac84af"], ns)
            metrics["best head hits"] = max(ns["hits"].values())
    return metrics


def measure(chapter: str, seeds: list[int]) -> dict:
    run = {"positions": _positions, "language": _language}[chapter]
    return {str(seed): run(seed) for seed in seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="+", choices=sorted(CLAIMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one machine setting: print the raw metrics as JSON
        import torch

        torch.set_num_threads(1)
        out = {c: measure(c, args.seeds) for c in args.chapters}
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        print(json.dumps(out))
        return
    command = [sys.executable, __file__, *args.chapters, "--child", "--seeds"]
    command += [str(s) for s in args.seeds]
    raw = run_on_both_machines(command, env={"MPLBACKEND": "Agg"})
    for chapter in args.chapters:
        claims = []
        for claim, metric, condition in CLAIMS[chapter]:
            values = [
                {"seed": int(seed), "machine": machine, "value": metrics[metric]}
                for machine in raw
                for seed, metrics in raw[machine][chapter].items()
            ]
            claims.append(claim_entry(claim, metric, values, f"{metric} {condition}"))
        path = ROOT / "book" / "_data" / "spread" / f"{chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # keep the RoPE scaling claims of positions_scaling.py (metrics "scaling ...")
        old = json.loads(path.read_text()) if path.exists() else {"claims": []}
        kept = [c for c in old["claims"] if c["metric"].startswith("scaling")]
        document = {"chapter": chapter, "claims": claims + kept}
        path.write_text(json.dumps(document, indent=1) + "\n")
        for c in claims:
            print(f"{chapter}: {c['metric']:18s} {c['min']:.4f} .. {c['max']:.4f}")


if __name__ == "__main__":
    main()
