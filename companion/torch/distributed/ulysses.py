r"""Ulysses sequence parallelism (DeepSpeed-Ulysses): sequence shards become head
shards.

Each of the ``W`` ranks holds a shard of the sequence of the queries, keys and values,
as for :func:`~companion.torch.distributed.ring.ring_attention`. Instead of passing the
keys and values around a ring, Ulysses (Jacobs et al. 2023) swaps the axis that is
split: one all-to-all sends head group ``j`` of every rank's shard to rank ``j``, so
that rank ``j`` holds the *whole sequence* for ``H / W`` of the heads; attention is
then ordinary single-process attention (the package's
:func:`~companion.torch.attention.scaled_dot_product_attention_reference`), and a
second all-to-all sends each rank's sequence shard of the output home::

    rank r: q (..., H, L, D)  --all-to-all-->  rank j: (..., H/W, W L, D)
            attention over the gathered sequence, rank j's heads only
    rank r: o (..., H, L, D_v) <--all-to-all--  rank j: (..., H/W, W L, D_v)

The backward pass is the same two all-to-alls reversed (autograd through
:class:`AllToAll`). With ``layout="zigzag"`` the gathered shards are put back in
sequence order before attention (and taken out of it after), so the causal mask is
the ordinary one.

**Heads.** ``W`` must divide the query heads ``H`` (Ulysses' limit: at most ``H``
ranks). When ``W`` does not divide the key/value heads ``H_kv`` (grouped-query
attention with fewer key/value heads than ranks, or multi-query), each key/value head
is replicated ``r = lcm(H_kv, W) / H_kv`` times before the exchange (as the
tensor-parallel layer replicates them), so that every rank receives the key/value
heads its query heads read; autograd sums the replicas' gradients. The replicas cost
traffic: the keys and values travel ``r`` times.

**Communication** per call, per rank, counted as ``bytes["all_to_all"]`` (what this
rank sends to *other* ranks; the ``1/W`` it keeps is not sent), with ``q, k, v, o``
the bytes of the local shards (``k, v`` after replication):

* forward: :math:`\frac{W-1}{W}(q + k + v + o)`, four all-to-alls;
* backward: the same, :math:`\frac{W-1}{W}(o + q + k + v)`.

The ring sends :math:`(W-1)(k+v)` forward: it grows with ``W`` where Ulysses' traffic
per rank shrinks (shards are ``1/W`` of the sequence). :func:`ulysses_bytes` gives the
formula.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from companion import _checks
from companion.torch.attention import scaled_dot_product_attention_reference
from companion.torch.distributed.comm import _record, check_same_shapes, nbytes
from companion.torch.distributed.ring import (
    LAYOUTS,
    check_local_shards,
    shard_positions,
)

__all__ = ["ulysses_attention", "ulysses_bytes", "all_to_all", "AllToAll"]


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group):
    """Piece ``j`` of ``x`` along ``scatter_dim`` to rank ``j``; the pieces received
    from ranks ``0 .. W-1`` concatenated along ``gather_dim``."""
    W = dist.get_world_size(group)
    send = torch.stack(x.chunk(W, dim=scatter_dim)).contiguous()  # (W, ...piece)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    _record("all_to_all", nbytes(send) * (W - 1) // W)
    # received[i]: rank i's piece; gather_dim is one axis further in (leading W)
    return torch.cat(received.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """All-to-all as an autograd function: backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims = (scatter_dim, gather_dim, group)
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group = ctx.dims
        return _exchange(grad, gather_dim, scatter_dim, group), None, None, None


def all_to_all(x, scatter_dim: int, gather_dim: int, *, group=None):
    """Split ``x`` along ``scatter_dim`` into ``W`` pieces, piece ``j`` to rank ``j``;
    concatenate the pieces received along ``gather_dim``. Differentiable; counted."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    nd = x.dim()
    for name, d in (("scatter_dim", scatter_dim), ("gather_dim", gather_dim)):
        if not -nd <= d < nd:
            raise ValueError(f"{name}={d} is out of range for x of shape {x.shape}")
    W = dist.get_world_size(group)
    if x.shape[scatter_dim] % W:
        raise ValueError(
            f"all_to_all: x's axis {scatter_dim} has {x.shape[scatter_dim]} entries, "
            f"which do not split into world_size={W} equal pieces"
        )
    return AllToAll.apply(x, scatter_dim % nd, gather_dim % nd, group)


def _kv_replicas(H: int, H_kv: int, W: int) -> int:
    """How often each key/value head is copied so that ``W`` divides the heads."""
    if H % W:
        raise ValueError(
            f"ulysses_attention splits the heads over the ranks: world_size={W} must "
            f"divide the query heads H={H} (Ulysses runs on at most H ranks); use "
            f"ring_attention, or combine both, for more ranks"
        )
    return math.lcm(H_kv, W) // H_kv


def ulysses_bytes(q_shard, k_shard, v_shard, o_shard, world_size, *, heads=None):
    """Bytes one rank sends in one forward (and in one backward) pass.

    Arguments are the bytes of this rank's shards ``q, k, v, o``; with ``heads =
    (H, H_kv)`` the keys and values are counted with their replicas.
    """
    W = _checks.check_int("world_size", world_size)
    r = 1 if heads is None else _kv_replicas(heads[0], heads[1], W)
    total = q_shard + r * (k_shard + v_shard) + o_shard
    return total * (W - 1) // W


def _check_inputs(query, key, value, layout, group):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    H, H_kv, L, _ = check_local_shards("ulysses_attention", query, key, value, layout)
    # one small all-gather of the shapes (not counted): ranks that disagree raise
    # a ValueError each instead of an all-to-all of mismatched sizes
    tensors = {"query": query, "key": key, "value": value}
    check_same_shapes("ulysses_attention", tensors, group=group)
    return H, H_kv, L


def ulysses_attention(
    query, key, value, *, causal=False, scale=None, layout="contiguous", group=None
):
    r"""Attention over a sequence sharded along axis -2, by swapping to head shards.

    The contract of :func:`~companion.torch.distributed.ring.ring_attention`:
    ``query (..., H, L, D)``, ``key (..., H_kv, L, D)``, ``value (..., H_kv, L, D_v)``
    are this rank's shards (from
    :func:`~companion.torch.distributed.ring.shard_sequence` with the same
    ``layout``); the result ``(..., H, L, D_v)`` is this rank's shard of
    ``softmax(scale Q K^T + mask) V`` over the gathered sequence.
    ``world_size`` must divide ``H``; key/value heads are replicated when it does not
    divide ``H_kv`` (module docstring). Differentiable.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    H, H_kv, L = _check_inputs(query, key, value, layout, group)
    W = dist.get_world_size(group)
    scale = _checks.resolve_scale(scale, query.shape[-1])
    replicas = _kv_replicas(H, H_kv, W)
    if replicas > 1:  # kv head i -> copies r i .. r i + r - 1, read by the same queries
        key = key.repeat_interleave(replicas, dim=-3)
        value = value.repeat_interleave(replicas, dim=-3)
    # sequence shards -> head shards: (..., H/W, W L, D), the shards in rank order
    q, k, v = (all_to_all(t, -3, -2, group=group) for t in (query, key, value))
    order = None
    if layout == "zigzag":  # position of each gathered row; sort them into sequence
        held = torch.cat(
            [shard_positions(W * L, r, W, layout=layout) for r in range(W)]
        ).to(query.device)
        order = torch.argsort(held)
        q, k, v = (t.index_select(-2, order) for t in (q, k, v))
    out = scaled_dot_product_attention_reference(q, k, v, causal=causal, scale=scale)
    if order is not None:  # back to rank order: row i holds position held[i]
        out = out.index_select(-2, held)
    # head shards -> sequence shards: (..., H, L, D_v)
    return all_to_all(out, -2, -3, group=group)
