r"""Ring attention: the sequence split over ranks, keys and values passed around a ring.

Each of the ``W`` ranks of a process group holds a shard of the sequence (axis -2) of
the queries, keys and values. Its queries stay; the key/value shards travel around the
ring, one hop per step, so that after ``W`` steps every query shard has met every
key/value shard. Each meeting gives a block result and its row-wise log-sum-exp,
merged as in the tiled attention of *Making it fast*:

.. math::

    \ell = \log\!\big(e^{\ell_a} + e^{\ell_b}\big), \qquad
    O = e^{\ell_a - \ell}\, O_a + e^{\ell_b - \ell}\, O_b

(:math:`O_a = \mathrm{softmax}(S_a) V_a` with :math:`\ell_a = \mathrm{logsumexp}(S_a)`
over the keys of block ``a``). The merge is associative and commutative, so the order
in which the shards arrive does not matter: the result is attention over the whole
sequence. The backward pass runs the ring again: keys and values travel as before,
and the gradients ``dK, dV`` of each shard travel with it, each rank adding its
queries' share, until the last hop brings them home to the shard's owner.

Layouts of the sequence over ``W`` ranks (:func:`shard_sequence`), shown for ``W = 4``
with the sequence cut into chunks ``0 1 2 3`` (contiguous) or ``0 ... 7`` (zigzag)::

    contiguous   rank 0: [0]     rank 1: [1]     rank 2: [2]     rank 3: [3]
    zigzag       rank 0: [0, 7]  rank 1: [1, 6]  rank 2: [2, 5]  rank 3: [3, 4]

With a causal mask, contiguous rank ``r`` has queries that see ``r + 1`` of the ``W``
key shards: rank ``W - 1`` works ``W`` times as much as rank 0. Zigzag pairs an early
chunk with a late one, so every rank computes the same ``2 W + 1`` half-chunk tiles
(Brandon et al. 2023; zhuzilin/ring-flash-attention's ``zigzag_ring_flash_attn``).

Communication per call, per rank, with ``k`` and ``v`` the bytes of the local key and
value shards (float16/bfloat16 travel as float32, the dtype they are computed in):
forward ``(W - 1)(k + v)``; backward ``(W - 1)(k + v) + W (k + v)`` (the gradients
make ``W`` hops, the last one home). Each exchange is started before the block
computation it overlaps and waited for after it.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from companion import _checks
from companion.torch.distributed.comm import (
    _record,
    check_same_shapes,
    gather_shapes,
    nbytes,
    record_work,
    ring_exchange,
    wait_all,
)

__all__ = [
    "LAYOUTS",
    "shard_positions",
    "shard_sequence",
    "gather_sequence",
    "ring_attention",
    "RingAttentionFunction",
]

LAYOUTS = ("contiguous", "zigzag")
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# layouts: which chunks of the sequence each rank holds
# --------------------------------------------------------------------------------------


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chunks of the sequence that ``rank`` holds, in the order it holds them."""
    if layout == "contiguous":
        return (rank,)  # chunk r of W
    return (rank, 2 * world_size - 1 - rank)  # chunks r and 2W-1-r of 2W


def _chunk_length(length: int, world_size: int, layout: str, name: str) -> int:
    pieces = world_size if layout == "contiguous" else 2 * world_size
    if length % pieces:
        raise ValueError(
            f"{name}: sequence length {length} does not split into {pieces} equal "
            f"chunks (world_size={world_size}, layout={layout!r}); pad the sequence "
            f"to a multiple of {pieces} and mask the padding first"
        )
    return length // pieces


def _check_rank(rank, world_size) -> tuple[int, int]:
    world_size = _checks.check_int("world_size", world_size)
    rank = _checks.check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    return rank, world_size


def shard_positions(length: int, rank: int, world_size: int, *, layout="contiguous"):
    """The positions that ``rank`` holds: ``(length // world_size,)`` int64."""
    rank, world_size = _check_rank(rank, world_size)
    _check_layout(layout)
    length = _checks.check_int("length", length)
    c = _chunk_length(length, world_size, layout, "length")
    ids = _chunk_ids(rank, world_size, layout)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in ids])


def shard_sequence(x, rank, world_size, *, layout="contiguous", dim=-2):
    """The part of the sequence ``x`` that ``rank`` of ``world_size`` holds (a copy).

    ``contiguous``: chunk ``rank`` of ``world_size`` equal chunks along ``dim``.
    ``zigzag``: chunks ``rank`` and ``2 world_size - 1 - rank`` of ``2 world_size``,
    concatenated. A length that does not split evenly is a ``ValueError``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world_size = _check_rank(rank, world_size)
    _check_layout(layout)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}")
    c = _chunk_length(x.shape[dim], world_size, layout, "x")
    pieces = [x.narrow(dim, i * c, c) for i in _chunk_ids(rank, world_size, layout)]
    return torch.cat(pieces, dim=dim)  # a copy, even for one piece


def gather_sequence(x_shard, *, layout="contiguous", group=None, dim=-2):
    """The full sequence from every rank's shard (``dist.all_gather``), in order.

    Inverse of :func:`shard_sequence`: every rank of ``group`` receives the whole
    sequence. Not differentiable (for checks and outputs).
    """
    if not isinstance(x_shard, torch.Tensor):
        raise TypeError(f"x_shard must be a torch.Tensor, got {type(x_shard).__name__}")
    _check_layout(layout)
    world_size = dist.get_world_size(group)
    x_shard = x_shard.contiguous()
    if layout == "zigzag" and x_shard.shape[dim] % 2:
        raise ValueError(
            f"x_shard: a zigzag shard holds two equal chunks, got length "
            f"{x_shard.shape[dim]} along dim={dim}"
        )
    # the shapes first (a small all-gather, not counted): ranks holding shards of
    # different shapes get a ValueError each instead of a mismatched all-gather
    check_same_shapes("gather_sequence", {"x_shard": x_shard}, group=group)
    parts = [torch.empty_like(x_shard) for _ in range(world_size)]
    dist.all_gather(parts, x_shard, group=group)
    _record("all_gather", nbytes(x_shard))
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    chunks = [None] * (2 * world_size)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        chunks[rank], chunks[2 * world_size - 1 - rank] = first, second
    return torch.cat(chunks, dim=dim)


# --------------------------------------------------------------------------------------
# one block: a query chunk against a key/value chunk, forward and backward
# --------------------------------------------------------------------------------------


def _fold(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(..., H, L, X)`` -> ``(..., H_kv, G L, X)``: the group folded into the rows.

    Row ``g L + l`` of key/value head ``k`` is row ``l`` of query head ``k G + g``. One
    matmul of these rows with a key head reads its keys in place; splitting the
    queries as ``(..., H_kv, G, L, X)`` against ``k.unsqueeze(-3)`` would make
    ``torch.matmul`` expand and copy the keys ``G`` times (a key-sized allocation per
    query head of the group).
    """
    *lead, H, L, X = x.shape
    return x.reshape(*lead, num_kv_heads, (H // num_kv_heads) * L, X)


def _block_scores(q, k, scale, diagonal):
    """``scale q k^T`` of a block ``(..., H_kv, G L_c, S_c)``, causal if diagonal."""
    H_kv, L_c = k.shape[-3], q.shape[-2]
    # (..., H_kv, G L_c, D) @ (..., H_kv, D, S_c) -> (..., H_kv, G L_c, S_c)
    scores = scale * (_fold(q, H_kv) @ k.transpose(-1, -2))
    if diagonal:  # query chunk == key chunk: query i sees keys j <= i
        S_c = scores.shape[-1]
        keep = torch.ones(L_c, S_c, dtype=torch.bool, device=q.device).tril()
        # (..., H_kv, G, L_c, S_c): the same (L_c, S_c) triangle for every group row
        grouped = scores.view(*scores.shape[:-2], -1, L_c, S_c)
        scores = grouped.masked_fill(~keep, float("-inf")).view(scores.shape)
    return scores


def _block_forward(q, k, v, scale, diagonal):
    """One block: ``out (..., H, L_c, D_v)`` normalised in it, ``lse (..., H, L_c)``."""
    scores = _block_scores(q, k, scale, diagonal)  # (..., H_kv, G L_c, S_c)
    lse = torch.logsumexp(scores, dim=-1)  # (..., H_kv, G L_c)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # (..., H_kv, G L_c, S_c)
    out = probs @ v  # (..., H_kv, G L_c, D_v): each value read in place
    record_work(scores.numel())
    # (..., H, L_c, D_v), (..., H, L_c)
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial results over disjoint keys, merged by their log-sum-exp."""
    if out_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)  # (..., H, L_c)
    out = (
        torch.exp(lse_a - lse).unsqueeze(-1) * out_a
        + torch.exp(lse_b - lse).unsqueeze(-1) * out_b
    )  # (..., H, L_c, D_v)
    return out, lse


def _block_backward(dout, q, k, v, lse, delta, scale, diagonal):
    """Gradients of one block from the final ``lse`` and ``delta = rowsum(dO * O)``.

    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - delta)``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``; with the group folded into the rows,
    the products over them sum the group's gradients into their key head.
    """
    H_kv = k.shape[-3]
    scores = _block_scores(q, k, scale, diagonal)  # (..., H_kv, G L_c, S_c)
    # masked -> 0
    probs = torch.exp(scores - _fold(lse.unsqueeze(-1), H_kv))
    dout_f = _fold(dout, H_kv)  # (..., H_kv, G L_c, D_v)
    dv = probs.transpose(-1, -2) @ dout_f  # (..., H_kv, S_c, D_v)
    dprobs = dout_f @ v.transpose(-1, -2)  # (..., H_kv, G L_c, S_c)
    dscores = probs * (dprobs - _fold(delta.unsqueeze(-1), H_kv))
    dq = scale * (dscores @ k)  # (..., H_kv, G L_c, D)
    dk = scale * (dscores.transpose(-1, -2) @ _fold(q, H_kv))  # (..., H_kv, S_c, D)
    return dq.reshape(q.shape), dk, dv


def _pairs(rank, src, world_size, layout, causal):
    """The (query piece, key piece, diagonal) blocks rank computes with shard ``src``.

    Without a mask the shard is one piece; with one, the layout's chunks, and a key
    chunk after the query chunk is skipped, the same chunk is the diagonal block.
    """
    if not causal:
        return [(0, 0, False)]
    q_ids, k_ids = (
        _chunk_ids(rank, world_size, layout),
        _chunk_ids(src, world_size, layout),
    )
    return [
        (i, j, a == b)
        for i, a in enumerate(q_ids)
        for j, b in enumerate(k_ids)
        if b <= a
    ]


def _pieces(x: torch.Tensor, causal: bool, layout: str):
    """Views of a shard's chunks along -2 (one piece without a mask)."""
    return [x] if not causal or layout == "contiguous" else list(x.chunk(2, dim=-2))


# --------------------------------------------------------------------------------------
# the ring, forward and backward
# --------------------------------------------------------------------------------------


def _ring_forward(q, k, v, scale, causal, layout, group):
    """``out (..., H, L, D_v)`` and ``lse (..., H, L)`` of this rank's queries."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    q_pieces = _pieces(q, causal, layout)
    results = [(None, None)] * len(q_pieces)
    for step in range(world_size):
        src = (rank - step) % world_size  # whose keys and values we hold now
        if step + 1 < world_size:  # start passing them on before computing
            (next_k, next_v), requests = ring_exchange([k, v], group=group, tag=0)
        k_pieces, v_pieces = _pieces(k, causal, layout), _pieces(v, causal, layout)
        start = time.process_time()
        for i, j, diagonal in _pairs(rank, src, world_size, layout, causal):
            block = _block_forward(
                q_pieces[i], k_pieces[j], v_pieces[j], scale, diagonal
            )
            results[i] = _merge(*results[i], *block)
        record_work(seconds=time.process_time() - start)
        if step + 1 < world_size:
            wait_all(requests)
            k, v = next_k, next_v
    out = torch.cat([o for o, _ in results], dim=-2)  # (..., H, L, D_v)
    lse = torch.cat([s for _, s in results], dim=-1)  # (..., H, L)
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, scale, causal, layout, group):
    """``dq, dk, dv`` of this rank's shards; ``dk, dv`` come home after ``W`` hops."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    delta = (dout * out).sum(-1)  # (..., H, L): rowsum(dO * O)
    dq = torch.zeros_like(q)
    q_parts = [
        _pieces(t, causal, layout)
        for t in (q, dout, lse.unsqueeze(-1), delta.unsqueeze(-1))
    ]
    dq_pieces = _pieces(dq, causal, layout)
    grads_in_flight = None
    for step in range(world_size):
        src = (rank - step) % world_size
        if step + 1 < world_size:
            (next_k, next_v), requests = ring_exchange([k, v], group=group, tag=0)
        dk_here, dv_here = torch.zeros_like(k), torch.zeros_like(v)
        k_pieces, v_pieces = _pieces(k, causal, layout), _pieces(v, causal, layout)
        dk_pieces, dv_pieces = (
            _pieces(dk_here, causal, layout),
            _pieces(dv_here, causal, layout),
        )
        for i, j, diagonal in _pairs(rank, src, world_size, layout, causal):
            q_i, dout_i, lse_i, delta_i = (parts[i] for parts in q_parts)
            dq_i, dk_j, dv_j = _block_backward(
                dout_i,
                q_i,
                k_pieces[j],
                v_pieces[j],
                lse_i.squeeze(-1),
                delta_i.squeeze(-1),
                scale,
                diagonal,
            )
            dq_pieces[i] += dq_i
            dk_pieces[j] += dk_j
            dv_pieces[j] += dv_j
        if grads_in_flight is not None:  # shard src's gradients so far, from rank - 1
            (dk_so_far, dv_so_far), grad_requests = grads_in_flight
            wait_all(grad_requests)
            dk_here, dv_here = dk_so_far + dk_here, dv_so_far + dv_here
        if world_size > 1:  # pass them on; the last hop takes them home
            grads_in_flight = ring_exchange([dk_here, dv_here], group=group, tag=2)
        if step + 1 < world_size:
            wait_all(requests)
            k, v = next_k, next_v
    if world_size == 1:
        return dq, dk_here, dv_here
    (dk, dv), grad_requests = grads_in_flight
    wait_all(grad_requests)
    return dq, dk, dv


class RingAttentionFunction(torch.autograd.Function):
    """``torch.autograd`` glue: the ring forward, and the ring backward."""

    @staticmethod
    def forward(ctx, query, key, value, causal, scale, layout, group):
        compute = torch.float32 if query.dtype in _HALF else query.dtype
        q, k, v = (t.to(compute) for t in (query, key, value))
        out, lse = _ring_forward(q, k, v, scale, causal, layout, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (scale, causal, layout, group, query.dtype)
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, group, dtype = ctx.settings
        dout = grad_output.to(q.dtype)
        grads = _ring_backward(dout, q, k, v, out, lse, scale, causal, layout, group)
        dq, dk, dv = (g.to(dtype) for g in grads)
        return dq, dk, dv, None, None, None, None


def check_local_shards(caller: str, query, key, value, layout) -> tuple:
    """The checks of one rank's shards of a sharded self-attention (``caller`` is
    ``"ring_attention"`` or ``"ulysses_attention"``), before anything is sent;
    returns ``(H, H_kv, L, D)``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _checks.check_float(name, t.dtype)
        if t.dim() < 3:
            raise ValueError(
                f"{name} must have shape (..., heads, length, dim), "
                f"got {tuple(t.shape)}"
            )
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must have one dtype, got {query.dtype}, "
            f"{key.dtype} and {value.dtype}"
        )
    shapes = (
        f"query {tuple(query.shape)}, key {tuple(key.shape)}, "
        f"value {tuple(value.shape)}"
    )
    H, L, D = query.shape[-3:]
    H_kv, S, _ = key.shape[-3:]
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            f"query, key and value need the same leading axes, got {shapes}"
        )
    if key.shape[-1] != D or value.shape[-3:-1] != key.shape[-3:-1]:
        raise ValueError(
            f"key must match query's D and value key's (H_kv, S), got {shapes}"
        )
    if H % H_kv:
        raise ValueError(f"key/value heads H_kv={H_kv} must divide query heads H={H}")
    if S != L:
        raise ValueError(
            f"{caller} is self-attention over one sharded sequence: the query "
            f"and key shards must have the same length, got {shapes}"
        )
    if layout == "zigzag" and L % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks, got length {L}")
    return H, H_kv, L, D


def _check_ring_inputs(query, key, value, layout, group):
    H, H_kv, L, D = check_local_shards("ring_attention", query, key, value, layout)
    # one small all-gather of the shapes (not counted): an uneven split, or ranks
    # that disagree on any axis, raise on every rank instead of hanging the ring or
    # aborting it on messages of different sizes
    tensors = {"query": query, "key": key, "value": value}
    everyone = gather_shapes(tensors, group=group)
    seen = [shapes["query"][-2] for shapes in everyone]
    if len(set(seen)) > 1:
        raise ValueError(
            f"ring_attention needs the same shard length on every rank, got {seen}: "
            f"the sequence did not split evenly; pad it to a multiple of the number "
            f"of chunks (shard_sequence says how many) and mask the padding"
        )
    check_same_shapes("ring_attention", tensors, group=group, shapes=everyone)
    return D


def ring_attention(
    query, key, value, *, causal=False, scale=None, layout="contiguous", group=None
):
    r"""Attention over a sequence sharded along axis -2 across the ranks of ``group``.

    ``query (..., H, L, D)``, ``key (..., H_kv, L, D)``, ``value (..., H_kv, L, D_v)``
    are this rank's shards (from :func:`shard_sequence` with the same ``layout``); the
    result ``(..., H, L, D_v)`` is this rank's shard of
    ``softmax(scale Q K^T + mask) V`` over the gathered sequence. ``causal``: query
    position ``i`` sees keys ``j <= i`` (positions in the gathered sequence).
    Grouped-query heads as in the rest of the package (``H_kv`` divides ``H``).
    Differentiable: the backward pass is a second ring (see the module docstring).
    Every rank must call it with shards of one length; otherwise ``ValueError``.
    """
    _check_layout(layout)
    causal = bool(causal) if isinstance(causal, bool) else _bad_flag(causal)
    D = _check_ring_inputs(query, key, value, layout, group)
    scale = _checks.resolve_scale(scale, D)
    return RingAttentionFunction.apply(query, key, value, causal, scale, layout, group)


def _bad_flag(value):
    raise TypeError(f"causal must be a bool, got {type(value).__name__}")
