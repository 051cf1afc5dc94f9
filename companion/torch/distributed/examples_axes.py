"""Worker functions for Ulysses, vocabulary and expert parallelism, for the tests and
the chapter, run in the processes of :func:`~companion.torch.distributed.launch.launch`.

As in :mod:`companion.torch.distributed.examples`: each builds its inputs from a seed
(the same full tensors on every rank), runs the distributed computation on this rank's
part and returns what the caller checks; the comparisons with one process are made by
the caller, in the parent process.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from companion.torch.distributed.comm import counting
from companion.torch.distributed.examples import attention_inputs
from companion.torch.distributed.ring import (
    gather_sequence,
    ring_attention,
    shard_sequence,
)
from companion.torch.distributed.ulysses import ulysses_attention

__all__ = ["run_ulysses", "ulysses_refusals"]


def _numpy(x):
    return x.detach().cpu().numpy()


def run_ulysses(cases, refusals=False):
    """Ulysses and ring attention, forward and backward, on the same shards.

    A case: ``B, H, H_kv, length, D, D_v, causal, layout, seed``. Returns one dict
    per case with, for ``"ulysses"`` and ``"ring"``: the gathered ``output``,
    ``grad_query``, ``grad_key``, ``grad_value`` (rank 0 only) and this rank's
    ``forward``/``backward`` counts, and this rank's shard bytes ``q, k, v, o``.
    With ``refusals``, returns ``{"cases": ..., "refusals": ulysses_refusals()}``.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        case = dict(case)
        causal, layout = case.pop("causal"), case.pop("layout")
        q, k, v, grad_out = attention_inputs(**case)
        result = {}
        for name, fn in (("ulysses", ulysses_attention), ("ring", ring_attention)):
            shards = [
                shard_sequence(t, rank, world_size, layout=layout) for t in (q, k, v)
            ]
            q_s, k_s, v_s = (t.requires_grad_() for t in shards)
            with counting() as forward:
                out = fn(q_s, k_s, v_s, causal=causal, layout=layout)
            with counting() as backward:
                out.backward(shard_sequence(grad_out, rank, world_size, layout=layout))
            gathered = [
                gather_sequence(t.detach(), layout=layout)
                for t in (out, q_s.grad, k_s.grad, v_s.grad)
            ]
            part = {"forward": forward.as_dict(), "backward": backward.as_dict()}
            if rank == 0:
                names = ("output", "grad_query", "grad_key", "grad_value")
                part.update(zip(names, map(_numpy, gathered)))
            result[name] = part
            result["shard_bytes"] = {
                n: t.numel() * t.element_size()
                for n, t in (("q", q_s), ("k", k_s), ("v", v_s), ("o", out))
            }
        results.append(result)
    if refusals:
        return {"cases": results, "refusals": ulysses_refusals()}
    return results


def ulysses_refusals():
    """The messages of the errors ``ulysses_attention`` raises on bad input."""
    world_size = dist.get_world_size()
    messages = []
    x = torch.zeros(1, world_size + 1, 4, 2, dtype=torch.float64)  # H not split
    try:
        ulysses_attention(x, x, x)
    except ValueError as exc:
        messages.append(str(exc))
    y = torch.zeros(1, 2, 3, 2, dtype=torch.float64)  # odd zigzag shard
    try:
        ulysses_attention(y, y, y, layout="zigzag")
    except ValueError as exc:
        messages.append(str(exc))
    return messages
