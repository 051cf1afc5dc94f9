"""Functions that run inside :func:`launch`'s processes, for the tests and the chapter.

Each builds its inputs from a seed (the same full tensors on every rank), runs the
distributed computation on this rank's part and returns what the caller checks:
gathered outputs and gradients as numpy arrays (from rank 0; ``None`` elsewhere) and
this rank's counts. They compute and report; the comparisons with the single-process
oracle are made by the caller, in the parent process.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from companion.torch.distributed.comm import counting
from companion.torch.distributed.ring import (
    gather_sequence,
    ring_attention,
    shard_sequence,
)

__all__ = ["attention_inputs", "run_ring_attention", "uneven_ring_attention"]


def attention_inputs(B, H, H_kv, length, D, D_v, *, seed=0, dtype=torch.float64):
    """Full ``query, key, value`` and an output gradient, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, D, generator=g, dtype=dtype)  # (B, H, N, D)
    k = torch.randn(B, H_kv, length, D, generator=g, dtype=dtype)  # (B, H_kv, N, D)
    v = torch.randn(B, H_kv, length, D_v, generator=g, dtype=dtype)
    grad_out = torch.randn(B, H, length, D_v, generator=g, dtype=dtype)
    return q, k, v, grad_out


def _numpy(x):
    return x.detach().cpu().numpy()


def run_ring_attention(cases, repeats: int = 0):
    """Ring attention forward and backward for each case of ``cases``.

    A case is a dict with ``B, H, H_kv, length, D, D_v, causal, layout`` (and
    ``seed``). Returns one dict per case: ``output``, ``grad_query``, ``grad_key``,
    ``grad_value`` (gathered, rank 0 only), ``forward`` and ``backward`` (this rank's
    counts) and, with ``repeats > 0``, ``seconds``: the best of ``repeats`` forward
    passes on this rank.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        case = dict(case)
        causal, layout = case.pop("causal"), case.pop("layout")
        q, k, v, grad_out = attention_inputs(**case)
        shards = [shard_sequence(t, rank, world_size, layout=layout) for t in (q, k, v)]
        q_s, k_s, v_s = (t.requires_grad_() for t in shards)
        with counting() as forward:
            out = ring_attention(q_s, k_s, v_s, causal=causal, layout=layout)
        with counting() as backward:
            out.backward(shard_sequence(grad_out, rank, world_size, layout=layout))
        result = {"forward": forward.as_dict(), "backward": backward.as_dict()}
        gathered = [
            gather_sequence(t.detach(), layout=layout)
            for t in (out, q_s.grad, k_s.grad, v_s.grad)
        ]
        if rank == 0:
            names = ("output", "grad_query", "grad_key", "grad_value")
            result.update(zip(names, map(_numpy, gathered)))
        if repeats:
            best = float("inf")
            with torch.no_grad():
                for _ in range(repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    ring_attention(q_s, k_s, v_s, causal=causal, layout=layout)
                    best = min(best, time.perf_counter() - start)
            result["seconds"] = best
        results.append(result)
    return results


def uneven_ring_attention():
    """Shards of different lengths on different ranks: ``ring_attention`` refuses."""
    rank = dist.get_rank()
    x = torch.zeros(1, 1, 4 + rank, 2, dtype=torch.float64)  # (B, H, L_r, D)
    return ring_attention(x, x, x)
