r"""Paged key/value caches: one pool of fixed-size blocks, a block table per sequence.

What vLLM's PagedAttention (Kwon et al. 2023) does with memory, written once for every
backend. The pool holds ``num_blocks`` blocks of ``block_size`` positions each; a
sequence owns a *block table*, the list of its blocks in order, so that position ``j``
lives in block ``table[j // block_size]`` at slot ``j % block_size``::

    pool (key or value)          sequence A: 21 positions    sequence B = fork(A)
    +----+----+----+----+----+   table [0, 3]                + 6 of its own
    | b0 | b1 | b2 | b3 | b4 |   b0: 0..15, b3: 16..20       table [0, 4]
    +----+----+----+----+----+                               b0 shared (ref count 2),
                                                             b4 = copy of b3, + 6

:meth:`PagedKVCacheBase.fork` shares every block of a sequence with a new one (a prompt
with several continuations): reference counts go up, nothing is copied. The first
append to a shared block that is only partly filled copies it first (copy on write);
full shared blocks are never written again. :meth:`~PagedKVCacheBase.free` drops a
sequence; a block goes back to the pool when its count reaches zero.

Every operation checks first and changes nothing when it fails: reading a freed
sequence, appending when the pool is exhausted, appending beyond ``max_blocks`` of a
block table.

The pool is stored head-major, ``(H_kv, num_blocks, block_size, D)``, so that a run of
consecutive blocks is one strided view ``(H_kv, n, D)`` of the pool: the layout of a
contiguous cache. :func:`read_plan` turns a block table into such runs (read in place,
no copy) plus the few blocks of short runs (gathered into one small tile), and
:func:`tile_visibility` says which tiles the queries see; the backends' attention
(vLLM's paged attention, conceptually) runs the online softmax over those tiles, so a
paged step costs what a contiguous step costs.

Backends subclass :class:`PagedKVCacheBase` and supply the storage operations for
their tensors (``_convert``, ``_zeros``, ``_write``, ``_copy_block``, ``_gather``).
Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import numpy as np

from companion import _checks, _tiling
from companion._kvcache import _itemsize

__all__ = [
    "BlockPool",
    "PagedKVCacheBase",
    "PoolExhaustedError",
    "Tile",
    "read_plan",
    "seen_tiles",
    "tile_visibility",
    "visible_keys",
]

# a run of at least this many consecutive blocks is read in place; shorter runs (the
# private tails of forked sequences, say) are gathered into one small tile
MIN_RUN_BLOCKS = 4
# the most scores one key tile holds per key/value head (rows x keys): long runs are
# cut so that prefill through the cache stays O(rows) in memory, as the tiled kernel
TILE_SCORES = 1 << 20


class PoolExhaustedError(RuntimeError):
    """Raised when a cache operation needs more free blocks than the pool has."""


class BlockPool:
    """Which blocks are free and how many block tables hold each (reference counts).

    Bookkeeping only, no tensors: ``allocate`` hands out the lowest free block with
    count 1, ``share`` adds a holder, ``release`` removes one and frees the block at 0.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = _checks.check_int("num_blocks", num_blocks)
        self._refcount = [0] * self.num_blocks
        # popped from the end: the lowest block number first
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhaustedError(
                f"the block pool is exhausted: all {self.num_blocks} blocks are in use"
            )
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        if self._refcount[block] < 1:
            raise RuntimeError(f"block {block} is free; it cannot be shared")
        self._refcount[block] += 1

    def release(self, block: int) -> None:
        if self._refcount[block] < 1:
            raise RuntimeError(f"block {block} is already free")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)
            self._free.sort(reverse=True)


class PagedKVCacheBase:
    r"""Keys ``(H_kv, S, D)`` and values ``(H_kv, S, D_v)`` of many sequences, paged.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool; the memory is allocated once, up front.
    block_size : int
        Positions per block (vLLM's default is 16).
    num_kv_heads, head_dim : int
        ``H_kv`` and ``D``.
    value_head_dim : int, optional
        ``D_v`` (default ``D``).
    dtype : optional
        The backend's dtype (or its name); default float32.
    max_blocks : int, optional
        The most blocks one block table may hold (default: the whole pool).

    Sequences are named by the integers :meth:`new_sequence` and :meth:`fork` return.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        value_head_dim: int | None = None,
        *,
        dtype=None,
        max_blocks: int | None = None,
    ):
        self.pool = BlockPool(num_blocks)
        self.block_size = _checks.check_int("block_size", block_size)
        self.num_kv_heads = _checks.check_int("num_kv_heads", num_kv_heads)
        self.head_dim = _checks.check_int("head_dim", head_dim)
        self.value_head_dim = (
            self.head_dim
            if value_head_dim is None
            else _checks.check_int("value_head_dim", value_head_dim)
        )
        self.max_blocks = (
            self.pool.num_blocks
            if max_blocks is None
            else _checks.check_int("max_blocks", max_blocks)
        )
        _check_dtype(self, dtype)  # before the pool is allocated
        # head-major: a run of consecutive blocks is one strided (H_kv, n, D) view
        dims = (self.num_kv_heads, self.pool.num_blocks, self.block_size)
        # (H_kv, num_blocks, block_size, D)
        self._key = self._zeros((*dims, self.head_dim), dtype)
        # (H_kv, num_blocks, block_size, D_v)
        self._value = self._zeros((*dims, self.value_head_dim), dtype)
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    # --- what a backend supplies ----------------------------------------------------
    def _convert(self, name: str, x):
        """``x`` as this backend's tensor (or a ``TypeError``)."""
        raise NotImplementedError

    def _zeros(self, shape: tuple[int, ...], dtype):
        """A zero tensor of ``shape`` and ``dtype`` (a name, or None for float32)."""
        raise NotImplementedError

    def _write(self, storage, block: int, start: int, stop: int, x) -> None:
        """``storage[:, block, start:stop] = x`` for ``x (H_kv, stop - start, dim)``."""
        raise NotImplementedError

    def _copy_block(self, storage, source: int, target: int) -> None:
        """``storage[:, target] = storage[:, source]``."""
        raise NotImplementedError

    def _gather(self, storage, blocks: list[int], length: int):
        """The first ``length`` positions via ``blocks``: ``(H_kv, length, dim)``."""
        raise NotImplementedError

    # --- sequences ------------------------------------------------------------------
    def new_sequence(self) -> int:
        """An empty sequence (no blocks yet); returns its id."""
        seq = self._next_id
        self._next_id += 1
        self._tables[seq], self._lengths[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence sharing every block of ``seq`` (no copy); returns its id."""
        table = self._table(seq)
        for block in table:
            self.pool.share(block)
        child = self.new_sequence()
        self._tables[child], self._lengths[child] = list(table), self._lengths[seq]
        return child

    def free(self, seq: int) -> None:
        """Drop ``seq``; its blocks held by no other sequence return to the pool."""
        for block in self._table(seq):
            self.pool.release(block)
        del self._tables[seq], self._lengths[seq]

    @property
    def sequences(self) -> tuple[int, ...]:
        """The ids of the live sequences."""
        return tuple(self._tables)

    def length(self, seq: int) -> int:
        """Positions stored for ``seq``."""
        self._table(seq)
        return self._lengths[seq]

    def block_table(self, seq: int) -> tuple[int, ...]:
        """The blocks of ``seq``, in order."""
        return tuple(self._table(seq))

    def _table(self, seq) -> list[int]:
        if isinstance(seq, bool):  # True would name sequence 1
            raise TypeError(f"a sequence id is an int, got {seq!r}")
        table = self._tables.get(seq) if isinstance(seq, int) else None
        if table is None:
            raise KeyError(
                f"sequence {seq!r} does not exist (freed, or never created); "
                f"live sequences: {sorted(self._tables)}"
            )
        return table

    # --- writing --------------------------------------------------------------------
    def append(self, seq: int, key, value) -> None:
        """Append ``key (H_kv, S_new, D)`` and ``value (H_kv, S_new, D_v)`` to ``seq``.

        Needs ``ceil`` of the new positions beyond the last block's free slots in new
        blocks, plus one for a copy on write when that last block is shared. If the pool
        (or ``max_blocks``) cannot supply them, raises and changes nothing.
        """
        table = self._table(seq)
        key, value = self._convert("key", key), self._convert("value", value)
        self._check_append(key, value)
        # [book: paged count]
        new, length, size = int(key.shape[1]), self._lengths[seq], self.block_size
        used = -(-length // size)  # blocks holding positions
        needed = -(-(length + new) // size) - used
        partial = length % size != 0
        copy = partial and new > 0 and self.pool.refcount(table[-1]) > 1
        # [/book: paged count]
        if used + needed > self.max_blocks:
            raise ValueError(
                f"appending {new} positions to sequence {seq} (length {length}) needs "
                f"{used + needed} blocks of {size}, beyond max_blocks={self.max_blocks}"
            )
        if needed + copy > self.pool.num_free:
            raise PoolExhaustedError(
                f"appending {new} positions to sequence {seq} needs {needed + copy} "
                f"free blocks; the pool of {self.pool.num_blocks} has "
                f"{self.pool.num_free} left"
            )
        # [book: paged write]
        if copy:
            # copy on write: the shared partial block gets a private copy
            private = self.pool.allocate()
            for storage in (self._key, self._value):
                self._copy_block(storage, table[-1], private)
            self.pool.release(table[-1])
            table[-1] = private
        table.extend(self.pool.allocate() for _ in range(needed))
        done = 0
        while done < new:
            position = length + done
            block, slot = table[position // size], position % size
            n = min(size - slot, new - done)
            # (H_kv, n, D) and (H_kv, n, D_v) into one block
            self._write(self._key, block, slot, slot + n, key[:, done : done + n])
            self._write(self._value, block, slot, slot + n, value[:, done : done + n])
            done += n
        self._lengths[seq] = length + new
        # [/book: paged write]

    def _check_append(self, key, value) -> None:
        k, v = tuple(key.shape), tuple(value.shape)
        expected = (self.num_kv_heads, self.head_dim, self.value_head_dim)
        if len(k) != 3 or len(v) != 3 or (k[0], k[2], v[2]) != expected or k[1] != v[1]:
            raise ValueError(
                f"key must be (H_kv, S_new, D) = ({expected[0]}, S_new, {expected[1]}) "
                f"and value (H_kv, S_new, D_v) = ({expected[0]}, S_new, {expected[2]}) "
                f"with the same S_new, got key {k} and value {v}"
            )
        names = (_checks.check_float("key", key.dtype),)
        names += (_checks.check_float("value", value.dtype),)
        stored = _checks.dtype_name(self._key.dtype)
        if names != (stored, stored):
            raise TypeError(
                f"key and value must have the cache's dtype {stored}, got {names}"
            )

    # --- reading --------------------------------------------------------------------
    def gather(self, seq: int):
        """``(key (H_kv, S, D), value (H_kv, S, D_v))`` of ``seq``, read through its
        block table (a copy)."""
        table, length = self._table(seq), self._lengths[seq]
        return (
            self._gather(self._key, table, length),
            self._gather(self._value, table, length),
        )

    # --- memory ---------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        """Bytes of keys and values one block holds."""
        per_position = self.num_kv_heads * (self.head_dim + self.value_head_dim)
        return _itemsize(self._key.dtype) * per_position * self.block_size

    @property
    def blocks_in_use(self) -> int:
        """Distinct blocks held by at least one sequence."""
        return self.pool.num_blocks - self.pool.num_free

    @property
    def blocks_unshared(self) -> int:
        """Blocks the live sequences would hold if each had its own copy."""
        size = self.block_size
        return sum(-(-n // size) for n in self._lengths.values())

    @property
    def nbytes_in_use(self) -> int:
        """Bytes of the blocks in use."""
        return self.blocks_in_use * self.bytes_per_block

    @property
    def nbytes_saved(self) -> int:
        """Bytes that sharing saves, (unshared - in use) blocks of them."""
        return (self.blocks_unshared - self.blocks_in_use) * self.bytes_per_block


def _check_dtype(cache: PagedKVCacheBase, dtype) -> None:
    """``dtype`` must name a floating type of the cache's backend: a ``TypeError``
    naming ``dtype`` otherwise (an integer pool could store no key)."""
    message = (
        "dtype must be a floating-point dtype (float16, bfloat16, float32 or "
        f"float64) or its name, got {dtype!r}"
    )
    try:
        probe = cache._zeros((0,), dtype)  # an empty tensor: nothing allocated
    except (TypeError, ValueError, AttributeError, RuntimeError):
        raise TypeError(message) from None
    if _checks.dtype_name(probe.dtype) not in _checks._FLOAT_NAMES:
        raise TypeError(message)


def visible_keys(length: int, L: int, *, causal: bool, window):
    """For the ``L`` last positions of a sequence of ``length``: ``(lo, hi)`` per query.

    Query ``i`` sits at absolute position ``p = i + length - L`` (bottom-right) and
    sees keys ``lo[i] <= j < hi[i]``: all of them without ``causal``/``window``;
    ``j <= p`` with ``causal``; ``p - window < j`` (and ``j < p + window`` without
    ``causal``) with a window; ``p - left <= j <= p + right`` with a pair
    (``companion._tiling.bounds``). Integer arrays ``(L,)``.
    """
    left, right = _tiling.bounds(causal, window)
    p = np.arange(L) + (length - L)  # (L,)
    lo = np.zeros(L, np.int64) if left is None else np.maximum(0, p - left)
    hi = (
        np.full(L, length, np.int64)
        if right is None
        else np.minimum(length, p + right + 1)
    )
    return lo, np.maximum(lo, hi)


class Tile:
    """``n`` keys of one sequence as attention reads them from the pool.

    ``blocks is None``: a run of consecutive blocks, rows ``row .. row + n`` of the
    pool's flat ``(H_kv, num_blocks * block_size, D)`` view (read in place).
    Otherwise: the listed blocks, gathered in order and cut to ``n`` positions.
    ``positions`` ``(n,)``: the sequence positions of the keys, increasing.
    """

    __slots__ = ("blocks", "row", "n", "positions")

    def __init__(self, blocks, row: int, n: int, positions: np.ndarray):
        self.blocks, self.row, self.n, self.positions = blocks, row, n, positions

    def __repr__(self) -> str:
        where = f"row {self.row}" if self.blocks is None else f"blocks {self.blocks}"
        return f"Tile({where}, n={self.n}, positions {self.positions[0]}..)"


def read_plan(table, length: int, block_size: int, rows: int = 1) -> list[Tile]:
    """The tiles that cover positions ``0 .. length`` of a sequence with ``table``.

    Runs of at least ``MIN_RUN_BLOCKS`` consecutive blocks (a whole table that is
    one run, too) become in-place tiles; the blocks of shorter runs are gathered, in
    table order, into tiles of their own. No tile holds more than
    ``max(block_size, TILE_SCORES // rows)`` keys, ``rows`` being the query rows per
    key/value head.
    """
    used = -(-length // block_size)  # blocks holding positions
    most = max(block_size, TILE_SCORES // max(1, rows))
    tiles, scattered = [], []
    i = 0
    while i < used:
        j = i + 1
        while j < used and table[j] == table[j - 1] + 1:
            j += 1
        start, stop = i * block_size, min(j * block_size, length)
        if j - i >= MIN_RUN_BLOCKS or j - i == used:
            row = table[i] * block_size
            for a in range(start, stop, most):  # cut long runs
                n = min(most, stop - a)
                tiles.append(Tile(None, row + a - start, n, np.arange(a, a + n)))
        else:
            scattered.extend(range(i, j))  # places in the table
        i = j
    per_tile = max(1, most // block_size)
    for k in range(0, len(scattered), per_tile):
        places = scattered[k : k + per_tile]
        positions = np.concatenate(
            [
                np.arange(p * block_size, min((p + 1) * block_size, length))
                for p in places
            ]
        )
        blocks = tuple(table[p] for p in places)
        tiles.append(Tile(blocks, -1, len(positions), positions))
    return tiles


def tile_visibility(lo, hi, positions: np.ndarray):
    """What queries with visible keys ``lo[i] <= j < hi[i]`` see of a tile.

    Returns ``None`` when no query sees any of its keys (the tile is skipped),
    ``True`` when every query sees every key (no mask), else the boolean mask
    ``(L, n)``. ``lo``, ``hi``: integer arrays ``(L,)``; ``positions`` increasing.
    """
    first, last = positions[0], positions[-1]
    if first >= hi.max() or last < lo.min():
        return None
    if first >= lo.max() and last < hi.min():
        return True
    return (lo[:, None] <= positions) & (positions < hi[:, None])  # (L, n)


def seen_tiles(cache: PagedKVCacheBase, seq, L: int, group: int, *, causal, window):
    """The tiles of sequence ``seq``'s keys that ``L`` queries see, in order, each with
    its :func:`tile_visibility` (``True`` or a mask ``(L, n)``); tiles no query sees
    are skipped. The loop of every backend's paged attention: the
    :func:`read_plan` of ``group * L`` rows (the group folded into the rows) under
    the :func:`visible_keys` of the queries."""
    table, length = cache._table(seq), cache._lengths[seq]
    lo, hi = (
        np.asarray(x) for x in visible_keys(length, L, causal=causal, window=window)
    )
    for tile in read_plan(table, length, cache.block_size, group * L):
        seen = tile_visibility(lo, hi, tile.positions)
        if seen is not None:
            yield tile, seen
