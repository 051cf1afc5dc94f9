r"""A paged key/value cache in numpy and attention that reads through its block tables.

:class:`PagedKVCache` keeps the keys and values of many sequences in one pool of
fixed-size blocks (vLLM's PagedAttention, Kwon et al. 2023); the bookkeeping (block
tables, reference counts, copy on write, clear errors) lives in
:mod:`companion._paged`. :func:`paged_attention` runs attention for a batch of
sequences tile by tile, with the online softmax of the tiled kernel: a run of
consecutive blocks of a sequence's table is one key tile read in place (the pool is
head-major, so a run is a strided view, as a contiguous cache is), the blocks of short
runs are gathered into one small tile, and no sequence's keys are ever gathered into
one array.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import numpy as np

from companion import _checks, _tiling
from companion._paged import (
    PagedKVCacheBase,
    PoolExhaustedError,
    seen_tiles,
)
from companion.numpy.attention import _check_flag, _compute_dtype, _float_array

__all__ = ["PagedKVCache", "PoolExhaustedError", "paged_attention"]


class PagedKVCache(PagedKVCacheBase):
    r"""Keys and values of many sequences in one pool of blocks (numpy).

    ``PagedKVCache(num_blocks, block_size, num_kv_heads, head_dim, value_head_dim=None,
    *, dtype="float32", max_blocks=None)``. Pool storage ``(H_kv, num_blocks,
    block_size, D)`` for keys and ``(..., D_v)`` for values is allocated once. A
    sequence is an integer id: ``new_sequence()``, ``fork()`` (shares the blocks,
    copy on write), ``free()``; ``append()`` takes ``key (H_kv, S_new, D)`` and
    ``value (H_kv, S_new, D_v)``.
    """

    def _convert(self, name: str, x) -> np.ndarray:
        return np.asarray(x)

    def _zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, np.dtype("float32" if dtype is None else dtype))

    def _write(self, storage, block: int, start: int, stop: int, x) -> None:
        storage[:, block, start:stop] = x

    def _copy_block(self, storage, source: int, target: int) -> None:
        storage[:, target] = storage[:, source]

    def _gather(self, storage, blocks, length: int) -> np.ndarray:
        # (H_kv, n_blocks, block_size, dim) -> (H_kv, n_blocks * block_size, dim)
        paged = storage[:, np.asarray(blocks, dtype=np.intp)]
        H_kv, dim = storage.shape[0], storage.shape[3]
        return paged.reshape(H_kv, -1, dim)[:, :length]  # (H_kv, S, dim)


def _tile_keys(cache, tile, dtype):
    """A tile's ``(key (H_kv, n, D), value (H_kv, n, D_v))``: a view of the pool for
    a run, a small gathered copy otherwise."""
    if tile.blocks is None:
        H_kv = cache.num_kv_heads
        rows = slice(tile.row, tile.row + tile.n)
        k = cache._key.reshape(H_kv, -1, cache.head_dim)[:, rows]  # (H_kv, n, D)
        v = cache._value.reshape(H_kv, -1, cache.value_head_dim)[:, rows]
    else:
        k = cache._gather(cache._key, tile.blocks, tile.n)  # (H_kv, n, D)
        v = cache._gather(cache._value, tile.blocks, tile.n)  # (H_kv, n, D_v)
    return k.astype(dtype, copy=False), v.astype(dtype, copy=False)


def _paged_one(q, cache, seq, causal, window, t, dtype):
    """One sequence by tiles: ``q (H_kv, group, L, D)`` -> ``(H_kv, group, L, D_v)``.

    The online softmax of :func:`companion.numpy.attention_tiled` over the tiles of
    :func:`companion._paged.read_plan` (runs of blocks read in place): for each tile
    ``b``, ``m_new = max(m, rowmax(S_b))``, ``c = exp(m - m_new)``,
    ``l = c l + rowsum(P_b)``, ``O = c O + P_b V_b``; at the end ``O / l`` (0 where
    ``l = 0``). The group is folded into the rows: each key is read once per step.
    """
    H_kv, group, L, D = q.shape
    rows = q.reshape(H_kv, group * L, D) * np.asarray(t, dtype)  # (H_kv, G L, D)
    m = np.full((H_kv, group * L, 1), -np.inf, dtype)
    l = np.zeros((H_kv, group * L, 1), dtype)  # noqa: E741
    o = np.zeros((H_kv, group * L, cache.value_head_dim), dtype)
    if L == 0:
        return o.reshape(H_kv, group, L, cache.value_head_dim)  # no queries: no reads
    for tile, seen in seen_tiles(cache, seq, L, group, causal=causal, window=window):
        k, v = _tile_keys(cache, tile, dtype)
        scores = rows @ k.swapaxes(-1, -2)  # t Q K_b^T: (H_kv, G L, n)
        if seen is not True:  # (L, n), the same for every head of the group
            scores = np.where(seen, scores.reshape(H_kv, group, L, -1), -np.inf)
            scores = scores.reshape(H_kv, group * L, -1)
        m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
        safe = np.where(np.isinf(m_new), 0.0, m_new)  # -inf rows: exp(-inf - 0) = 0
        p = np.exp(scores - safe)  # (H_kv, G L, n)
        c = np.exp(m - safe)  # rescales what was accumulated
        l = c * l + p.sum(axis=-1, keepdims=True)  # noqa: E741
        o = c * o + p @ v  # (H_kv, G L, D_v)
        m = m_new
    positive = l > 0
    out = np.where(positive, o / np.where(positive, l, 1), 0)
    return out.reshape(H_kv, group, L, -1)  # (H_kv, group, L, D_v)


def paged_attention(
    query,
    cache: PagedKVCache,
    sequences,
    *,
    causal: bool = False,
    window: int | tuple | None = None,
    scale: float | None = None,
) -> np.ndarray:
    r"""Attention of ``query (B, H, L, D)`` over the cached keys of ``B`` sequences.

    Query row ``b`` attends to the positions of ``sequences[b]`` read through its block
    table; each sequence may have its own length ``S_b``, and the ``L`` queries are its
    last ``L`` positions (bottom-right), so decoding appends the new keys first, then
    calls this with ``L = 1``. ``causal`` and ``window`` mean what they mean for
    :func:`companion.numpy.scaled_dot_product_attention_reference`: query position
    ``p`` sees ``p - window < j <= p``. Grouped-query when ``H > H_kv``.

    Returns ``(B, H, L, D_v)`` in the query's dtype (float16 computed in float32).
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(
            f"cache must be a companion.numpy.PagedKVCache, got {type(cache).__name__}"
        )
    query = _float_array("query", query)
    sequences = list(sequences)
    if query.ndim != 4 or query.shape[0] != len(sequences):
        raise ValueError(
            f"query must have shape (B, H, L, D) with B = len(sequences) = "
            f"{len(sequences)}, got shape {query.shape}"
        )
    B, H, L, D = query.shape
    if D != cache.head_dim or H % cache.num_kv_heads:
        raise ValueError(
            f"query {query.shape} does not fit the cache: D must be {cache.head_dim} "
            f"and H a multiple of H_kv = {cache.num_kv_heads}"
        )
    for seq in sequences:
        cache._table(seq)  # KeyError for a freed or unknown sequence
    dtype = _compute_dtype(query.dtype)
    t = _checks.resolve_scale(scale, D)
    group = H // cache.num_kv_heads
    # (B, H_kv, group, L, D)
    q = query.astype(dtype).reshape(B, cache.num_kv_heads, group, L, D)
    if B == 0:  # no sequences
        return np.zeros((0, H, L, cache.value_head_dim), query.dtype)
    out = np.stack(
        [
            _paged_one(q[b], cache, seq, causal, window, t, dtype)
            for b, seq in enumerate(sequences)
        ]
    )  # (B, H_kv, group, L, D_v)
    return out.reshape(B, H, L, cache.value_head_dim).astype(query.dtype)
