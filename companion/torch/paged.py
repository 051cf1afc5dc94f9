r"""A paged key/value cache in torch and batched attention through its block tables.

The same :class:`PagedKVCache` as :mod:`companion.numpy.paged`, its pool in torch
tensors (on any device), head-major ``(H_kv, num_blocks, block_size, D)``.
:func:`paged_attention` reads each sequence through its block table as vLLM's kernel
does, without copying the cache: runs of consecutive blocks are strided views of the
pool (the layout of a contiguous cache), the few blocks of short runs are gathered into
one small tile, and the online softmax merges the tiles.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import torch

from companion import _checks, _tiling
from companion._paged import (
    PagedKVCacheBase,
    PoolExhaustedError,
    seen_tiles,
)
from companion.torch.attention import _check_flag, _compute_dtype

__all__ = ["PagedKVCache", "PoolExhaustedError", "paged_attention"]


class PagedKVCache(PagedKVCacheBase):
    r"""Keys and values of many sequences in one pool of blocks (torch).

    ``PagedKVCache(num_blocks, block_size, num_kv_heads, head_dim, value_head_dim=None,
    *, dtype="float32", max_blocks=None, device=None)``; see
    :class:`companion._paged.PagedKVCacheBase`. Meant for inference: storage is
    written in place.
    """

    def __init__(self, *args, device=None, **kwargs):
        self._device = torch.device("cpu") if device is None else torch.device(device)
        super().__init__(*args, **kwargs)

    def _convert(self, name: str, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != self._device:
            raise ValueError(f"{name} is on {x.device}, the cache on {self._device}")
        return x

    def _zeros(self, shape, dtype) -> torch.Tensor:
        if dtype is None:
            dtype = torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
        return torch.zeros(shape, dtype=dtype, device=self._device)

    def _write(self, storage, block: int, start: int, stop: int, x) -> None:
        storage[:, block, start:stop] = x

    def _copy_block(self, storage, source: int, target: int) -> None:
        storage[:, target] = storage[:, source]

    def _gather(self, storage, blocks, length: int) -> torch.Tensor:
        index = torch.as_tensor(blocks, dtype=torch.long, device=storage.device)
        # (H_kv, n_blocks, block_size, dim) -> (H_kv, n_blocks * block_size, dim)
        paged = storage.index_select(1, index)
        H_kv, dim = storage.shape[0], storage.shape[3]
        return paged.reshape(H_kv, -1, dim)[:, :length]


def _tile_keys(cache, tile, dtype):
    """A tile's ``(key (H_kv, n, D), value (H_kv, n, D_v))``: a view of the pool for
    a run, a small gathered copy otherwise."""
    if tile.blocks is None:
        H_kv, rows = cache.num_kv_heads, slice(tile.row, tile.row + tile.n)
        k = cache._key.view(H_kv, -1, cache.head_dim)[:, rows]  # (H_kv, n, D)
        v = cache._value.view(H_kv, -1, cache.value_head_dim)[:, rows]
    else:
        k = cache._gather(cache._key, tile.blocks, tile.n)  # (H_kv, n, D)
        v = cache._gather(cache._value, tile.blocks, tile.n)  # (H_kv, n, D_v)
    return k.to(dtype), v.to(dtype)


def _paged_one(q, cache, seq, causal, window, t):
    """One sequence by tiles: ``q (H_kv, group, L, D)`` -> ``(H_kv, group, L, D_v)``.

    The online softmax of :func:`companion.numpy.paged_attention` over the tiles of
    :func:`companion._paged.read_plan`: runs of blocks are strided views of the
    pool, read in place; the group is folded into the rows, so each key is read once.
    """
    H_kv, group, L, D = q.shape
    dtype, device = q.dtype, q.device
    rows = q.reshape(H_kv, group * L, D) * t  # (H_kv, G L, D)
    differentiable = torch.is_grad_enabled() and rows.requires_grad
    m = torch.full((H_kv, group * L, 1), float("-inf"), dtype=dtype, device=device)
    l = torch.zeros((H_kv, group * L, 1), dtype=dtype, device=device)  # noqa: E741
    o = torch.zeros((H_kv, group * L, cache.value_head_dim), dtype=dtype, device=device)
    if L == 0:
        return o.reshape(H_kv, group, L, cache.value_head_dim)  # no queries: no reads
    for tile, seen in seen_tiles(cache, seq, L, group, causal=causal, window=window):
        k, v = _tile_keys(cache, tile, dtype)
        scores = rows @ k.transpose(-1, -2)  # t Q K_b^T: (H_kv, G L, n)
        if seen is not True:  # (L, n), the same for every head of the group
            keep = torch.from_numpy(seen).to(device)
            scores = scores.view(H_kv, group, L, -1).masked_fill(~keep, float("-inf"))
            scores = scores.view(H_kv, group * L, -1)
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        # -inf rows: exp(-inf - 0) = 0
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        if differentiable:
            p = torch.exp(scores - safe)  # (H_kv, G L, n)
        else:  # inference: in place of the scores, one buffer fewer per tile
            p = scores.sub_(safe).exp_()
        c = torch.exp(m - safe)  # rescales what was accumulated
        l = c * l + p.sum(dim=-1, keepdim=True)  # noqa: E741
        o = torch.baddbmm(o * c, p, v)  # c O + P_b V_b: (H_kv, G L, D_v)
        m = m_new
    positive = l > 0
    out = torch.where(positive, o / torch.where(positive, l, torch.ones_like(l)), 0)
    return out.reshape(H_kv, group, L, -1)  # (H_kv, group, L, D_v)


def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    sequences,
    *,
    causal: bool = False,
    window: int | tuple | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Attention of ``query (B, H, L, D)`` over the cached keys of ``B`` sequences.

    The semantics of :func:`companion.numpy.paged_attention`: the query row of each
    sequence runs the online softmax over the tiles of its block table (in place, no
    gather of the cache); float16/bfloat16 accumulate in float32.
    Returns ``(B, H, L, D_v)`` in the query's dtype.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(
            f"cache must be a companion.torch.PagedKVCache, got {type(cache).__name__}"
        )
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    _checks.check_float("query", query.dtype)
    sequences = list(sequences)
    if query.ndim != 4 or query.shape[0] != len(sequences):
        raise ValueError(
            f"query must have shape (B, H, L, D) with B = len(sequences) = "
            f"{len(sequences)}, got shape {tuple(query.shape)}"
        )
    B, H, L, D = query.shape
    if D != cache.head_dim or H % cache.num_kv_heads:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit the cache: D must be "
            f"{cache.head_dim} and H a multiple of H_kv = {cache.num_kv_heads}"
        )
    for seq in sequences:
        cache._table(seq)  # KeyError for a freed or unknown sequence
    dtype = _compute_dtype(query.dtype)
    t = _checks.resolve_scale(scale, D)
    H_kv, D_v = cache.num_kv_heads, cache.value_head_dim
    if B == 0:  # no sequences
        return query.new_zeros((0, H, L, D_v))
    # (B, H_kv, group, L, D)
    q = query.to(dtype).reshape(B, H_kv, H // H_kv, L, D)
    out = torch.stack(
        [
            _paged_one(q[b], cache, seq, causal, window, t)
            for b, seq in enumerate(sequences)
        ]
    )  # (B, H_kv, group, L, D_v)
    return out.reshape(B, H, L, D_v).to(query.dtype)
