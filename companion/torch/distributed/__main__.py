"""``python -m companion.torch.distributed``: ring attention against one process.

Runs :func:`~companion.torch.distributed.examples.run_ring_attention` (full and causal,
both layouts, grouped heads) on ``--world-size`` spawned gloo processes, or on the
processes ``torchrun`` started::

    python -m companion.torch.distributed --world-size 3
    torchrun --standalone --nproc-per-node 2 -m companion.torch.distributed

and prints the largest difference from single-process float64 attention (output and
gradients), and the bytes each rank sent. Exits 1 if a difference exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed

from companion.torch.attention import scaled_dot_product_attention_reference
from companion.torch.distributed.examples import attention_inputs, run_ring_attention
from companion.torch.distributed.launch import launch, under_torchrun


def _worst_error(case, result) -> float:
    case = dict(case)
    causal = case.pop("causal")
    del case["layout"]
    q, k, v, grad_out = attention_inputs(**case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention_reference(*leaves, causal=causal)
    out.backward(grad_out)
    expected = [out.detach()] + [t.grad for t in leaves]
    names = ("output", "grad_query", "grad_key", "grad_value")
    return max(
        float((torch.from_numpy(result[n]) - e).abs().max())
        for n, e in zip(names, expected)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size
    cases = [
        dict(B=1, H=4, H_kv=2, length=4 * world_size, D=8, D_v=8, causal=c, layout=lay)
        for lay in ("contiguous", "zigzag")
        for c in (False, True)
    ]
    per_rank = launch(run_ring_attention, world_size, cases)
    if under_torchrun():
        torch.distributed.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    worst = 0.0
    for case, result in zip(cases, per_rank[0]):
        error = _worst_error(case, result)
        worst = max(worst, error)
        sent = [
            r[cases.index(case)]["forward"]["bytes"].get("send", 0) for r in per_rank
        ]
        print(
            f"W={world_size} {case['layout']:<10} causal={case['causal']!s:<5} "
            f"max |error| {error:.1e}  forward bytes sent per rank {sent}"
        )
    print(f"ring attention: worst difference from one process {worst:.1e}")
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
