r"""A paged key/value cache in torch and batched attention through its block tables.

The same :class:`PagedKVCache` as :mod:`companion.numpy.paged`, its pool in torch
tensors (on any device). :func:`paged_attention` turns the block tables of a batch into
one index tensor ``(B, max_blocks)``, gathers the blocks with it (what vLLM's reference
path does before its fused kernel) and runs one masked attention call for the batch;
positions beyond a sequence's length are masked out.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import torch

from companion import _checks
from companion._paged import PagedKVCacheBase, PoolExhaustedError, visible_keys
from companion.torch.attention import (
    _check_flag,
    scaled_dot_product_attention_reference,
)

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
        storage[block, :, start:stop] = x

    def _copy_block(self, storage, source: int, target: int) -> None:
        storage[target] = storage[source]

    def _gather(self, storage, blocks, length: int) -> torch.Tensor:
        index = torch.as_tensor(blocks, dtype=torch.long, device=storage.device)
        # (n_blocks, H_kv, block_size, dim) -> (H_kv, n_blocks * block_size, dim)
        paged = storage.index_select(0, index)
        H_kv, dim = storage.shape[1], storage.shape[3]
        return paged.transpose(0, 1).reshape(H_kv, -1, dim)[:, :length]


def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    sequences,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Attention of ``query (B, H, L, D)`` over the cached keys of ``B`` sequences.

    The semantics of :func:`companion.numpy.paged_attention`. The block tables are
    padded to the longest and gathered in one ``index_select``; a boolean mask
    ``(B, 1, L, S_max)`` hides the padding and applies ``causal``/``window``.
    Returns ``(B, H, L, D_v)``.
    """
    causal = _check_flag("causal", causal)
    if window is not None:
        window = _checks.check_int("window", window)
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
    tables = [cache._table(seq) for seq in sequences]  # KeyError if freed
    lengths = [cache._lengths[seq] for seq in sequences]
    size, device = cache.block_size, cache._key.device
    width = max(1, max(len(table) for table in tables))
    # (B, max_blocks): padded with block 0, masked out below
    index = torch.zeros((B, width), dtype=torch.long, device=device)
    keep = torch.zeros((B, 1, L, width * size), dtype=torch.bool, device=device)
    j = torch.arange(width * size, device=device)  # (S_max,)
    for b, (table, length) in enumerate(zip(tables, lengths)):
        index[b, : len(table)] = torch.as_tensor(table, dtype=torch.long)
        lo, hi = visible_keys(length, L, causal=causal, window=window)
        lo = torch.as_tensor(lo, device=device)[:, None]  # (L, 1)
        hi = torch.as_tensor(hi, device=device)[:, None]
        keep[b, 0] = (lo <= j) & (j < hi)  # (L, S_max)
    H_kv = cache.num_kv_heads

    def gather(storage):
        # (B, max_blocks, H_kv, block_size, dim) -> (B, H_kv, S_max, dim)
        paged = storage[index]
        return paged.transpose(1, 2).reshape(B, H_kv, width * size, -1)

    key = gather(cache._key).to(query.dtype)  # (B, H_kv, S_max, D)
    value = gather(cache._value).to(query.dtype)  # (B, H_kv, S_max, D_v)
    # (B, H, L, D_v)
    return scaled_dot_product_attention_reference(
        query, key, value, mask=keep, scale=scale
    )
