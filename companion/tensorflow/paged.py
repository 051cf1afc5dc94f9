r"""A paged key/value cache in TensorFlow and batched attention through block tables.

The same :class:`PagedKVCache` as :mod:`companion.numpy.paged`, its pool in
``tf.Variable`` storage written in place (eager decoding loops).
:func:`paged_attention` gathers the batch's blocks with one ``tf.gather`` over the
block tables padded to the longest, and runs one masked attention call, as the torch
version does.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from companion import _checks, _tiling
from companion._paged import PagedKVCacheBase, PoolExhaustedError, visible_keys
from companion.tensorflow.attention import (
    _check_flag,
    scaled_dot_product_attention_reference,
)

__all__ = ["PagedKVCache", "PoolExhaustedError", "paged_attention"]


class PagedKVCache(PagedKVCacheBase):
    r"""Keys and values of many sequences in one pool of blocks (TensorFlow).

    ``PagedKVCache(num_blocks, block_size, num_kv_heads, head_dim, value_head_dim=None,
    *, dtype="float32", max_blocks=None)``; the bookkeeping is
    :class:`companion._paged.PagedKVCacheBase`.
    """

    def _convert(self, name: str, x):
        try:
            return tf.convert_to_tensor(x)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be a tensor, got {type(x).__name__}"
            ) from error

    def _zeros(self, shape, dtype):
        dtype = tf.float32 if dtype is None else tf.as_dtype(dtype)
        return tf.Variable(tf.zeros(shape, dtype), trainable=False)

    def _write(self, storage, block: int, start: int, stop: int, x) -> None:
        storage[:, block, start:stop].assign(x)

    def _copy_block(self, storage, source: int, target: int) -> None:
        storage[:, target].assign(storage[:, source])

    def _gather(self, storage, blocks, length: int):
        # (H_kv, n_blocks, block_size, dim) -> (H_kv, n_blocks * block_size, dim)
        paged = tf.gather(storage, np.asarray(blocks, dtype=np.int64), axis=1)
        H_kv, dim = storage.shape[0], storage.shape[3]
        return tf.reshape(paged, (H_kv, -1, dim))[:, :length]


def paged_attention(
    query,
    cache: PagedKVCache,
    sequences,
    *,
    causal: bool = False,
    window: int | tuple | None = None,
    scale: float | None = None,
):
    r"""Attention of ``query (B, H, L, D)`` over the cached keys of ``B`` sequences.

    The semantics of :func:`companion.numpy.paged_attention`; returns
    ``(B, H, L, D_v)``.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(
            "cache must be a companion.tensorflow.PagedKVCache, got "
            f"{type(cache).__name__}"
        )
    query = tf.convert_to_tensor(query)
    _checks.check_float("query", query.dtype)
    sequences = list(sequences)
    if query.shape.rank != 4 or query.shape[0] != len(sequences):
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
    tables = [cache._table(seq) for seq in sequences]  # KeyError if freed
    lengths = [cache._lengths[seq] for seq in sequences]
    size, H_kv = cache.block_size, cache.num_kv_heads
    width = max(1, max(len(table) for table in tables))
    # (B, max_blocks): padded with block 0, masked out below
    index = np.zeros((B, width), dtype=np.int64)
    keep = np.zeros((B, 1, L, width * size), dtype=bool)
    j = np.arange(width * size)  # (S_max,)
    for b, (table, length) in enumerate(zip(tables, lengths)):
        index[b, : len(table)] = table
        lo, hi = visible_keys(length, L, causal=causal, window=window)
        lo, hi = np.asarray(lo)[:, None], np.asarray(hi)[:, None]  # (L, 1)
        keep[b, 0] = (lo <= j) & (j < hi)  # (L, S_max)

    def gather(storage):
        # (H_kv, B, max_blocks, block_size, dim) -> (B, H_kv, S_max, dim)
        paged = tf.transpose(tf.gather(storage, index, axis=1), (1, 0, 2, 3, 4))
        return tf.reshape(paged, (B, H_kv, width * size, -1))

    key = tf.cast(gather(cache._key), query.dtype)  # (B, H_kv, S_max, D)
    value = tf.cast(gather(cache._value), query.dtype)  # (B, H_kv, S_max, D_v)
    # (B, H, L, D_v)
    return scaled_dot_product_attention_reference(
        query, key, value, mask=tf.constant(keep), scale=scale
    )
