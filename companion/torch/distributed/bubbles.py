r"""The pipeline's bubble, measured: per-stage timelines of GPipe and 1F1B.

With ``P`` stages and ``m`` microbatches of equal work (forward ``f``, backward ``b``
per microbatch and stage), both schedules keep each stage busy ``m (f + b)`` of a
step that lasts ``(m + P - 1)(f + b)``: the idle share, the *bubble*, is

.. math:: \frac{P - 1}{m + P - 1}

(GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2019, has the same bubble and holds
at most ``P`` microbatches' activations instead of ``m``). :func:`measure` runs one
step of each schedule asked for on ``P`` spawned processes with
:func:`~companion.torch.distributed.examples_axes.pipeline_timeline` (each stage's
forward and backward spans per microbatch, wall clock) and returns the timelines, the
measured bubble (:func:`~companion.torch.distributed.examples_axes.bubble_fraction`)
and the formula's. The measured bubble is larger: the loss, the messages between
stages and the schedule's own bookkeeping are idle time for the stages' spans.

``python -m companion.torch.distributed.bubbles OUT.json`` measures both schedules on 2
stages for ``m`` in 1, 2, 4, 8 (1F1B needs ``m >= P``: from 2), three repeats each,
and writes the timelines with a description of the machine (the book stores one such
run in ``book/_data/pipeline_bubbles.json``). Times are the machine's; nothing
asserts them.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

from companion.torch.distributed.examples_axes import bubble_fraction, pipeline_timeline
from companion.torch.distributed.launch import launch

__all__ = ["ideal_bubble", "measure", "run_timelines", "machine", "main"]


def ideal_bubble(num_stages: int, microbatches: int) -> float:
    """``(P - 1) / (m + P - 1)``: the idle share of equal stages."""
    if num_stages < 1 or microbatches < 1:
        raise ValueError(
            f"num_stages and microbatches must be >= 1, got {num_stages}, "
            f"{microbatches}"
        )
    return (num_stages - 1) / (microbatches + num_stages - 1)


def run_timelines(configs, layers=4, batch=32, embed_dim=128):
    """In each stage's process: :func:`pipeline_timeline` of every ``(schedule, m)``
    of ``configs``, in order (one launch for them all)."""
    return [
        pipeline_timeline(schedule, m, layers, batch, embed_dim=embed_dim)
        for schedule, m in configs
    ]


def measure(configs, num_stages, *, layers=4, batch=32, embed_dim=128):
    """One step of each ``(schedule, microbatches)`` of ``configs`` (``"gpipe"``,
    ``"1f1b"``) on ``num_stages`` processes, one launch.

    Returns per config ``{"timelines": [stage 0's spans, ...], "bubble": measured,
    "ideal": formula}``; a span is ``(kind, microbatch, start, end)`` in seconds from
    the step's first start, sorted by start.
    """
    per_stage = launch(
        run_timelines, num_stages, list(configs), layers, batch, embed_dim
    )
    results = []
    for index, (_, m) in enumerate(configs):
        timelines = [stage[index] for stage in per_stage]
        t0 = min(s for spans in timelines for _, _, s, _ in spans)
        timelines = [
            sorted(((kind, i, s - t0, e - t0) for kind, i, s, e in spans), key=_start)
            for spans in timelines
        ]
        results.append(
            {
                "timelines": timelines,
                "bubble": bubble_fraction(timelines),
                "ideal": ideal_bubble(num_stages, m),
            }
        )
    return results


def _start(span):
    return span[2]


def machine() -> dict:
    """What ran the measurement: processor, cores, load, torch and its threads."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        model = names[0] if names else model
    except OSError:
        pass
    return {
        "processor": model,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_stage": "cpu_count // stages (launch's default)",
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m companion.torch.distributed.bubbles OUT.json")
        return 2
    stages, repeats = 2, 3
    before = machine()
    configs = [
        (schedule, m)
        for schedule in ("gpipe", "1f1b")
        for m in ((1, 2, 4, 8) if schedule == "gpipe" else (2, 4, 8))
        for _ in range(repeats)
    ]
    runs = [
        {"schedule": schedule, "stages": stages, "microbatches": m, **result}
        for (schedule, m), result in zip(
            configs, measure(configs, stages, batch=64, embed_dim=384)
        )
    ]
    data = {
        "what": "one training step per run, spans per stage and microbatch "
        "(pipeline_timeline: TinyTransformerLM, 4 layers, E=384, batch 64 of 8 "
        "tokens, float64, the second step of two)",
        "machine": before,
        "load_average_after": machine()["load_average"],
        "runs": runs,
    }
    with open(argv[0], "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
