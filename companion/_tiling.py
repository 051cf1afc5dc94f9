r"""Which tiles of the ``L x S`` score matrix a tiled attention kernel must compute.

Shared by the numpy, torch and TensorFlow ``attention_tiled``: plain Python on sizes, no
arrays. Positions follow :mod:`companion.conventions` (bottom-right alignment): query
``i`` sits at absolute position ``p = i + (S - L)`` and, with distance ``d = j - p`` to
key ``j``,

============================  =============================  ==========================
``causal``, ``window``        key ``j`` visible iff          picture (rows: queries)
============================  =============================  ==========================
``False``, ``None``           always                         full
``True``,  ``None``           ``d <= 0``                     lower triangle
``True``,  ``w``              ``-w < d <= 0``                the last ``w`` keys
``False``, ``w``              ``-w < d < w``                 a symmetric band
============================  =============================  ==========================

A tile is *skipped* when no entry is visible, *full* when every entry is (no mask is
built for it), and *partial* otherwise (the kernel masks it).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "check_window",
    "key_range",
    "tile_is_full",
    "QueryBlock",
    "plan",
    "visible_counts",
    "query_range",
    "full_rows",
    "KeyBlock",
    "key_plan",
]


# A window this wide sees every key of any sequence whose positions fit a signed
# 32-bit index: wider windows are clamped to it, so that the backends' index arithmetic
# (int32 in TensorFlow, int64 in torch) never wraps around.
WINDOW_LIMIT = 2**31 - 1


def check_window(window) -> int | None:
    """``window`` as a Python int ``>= 1`` or ``None``.

    ``TypeError`` for a non-integer (bools and floats too), ``ValueError`` below 1.
    Windows of :data:`WINDOW_LIMIT` or more give :data:`WINDOW_LIMIT`: the same keys
    for any sequence shorter than ``2**31 - 1`` positions.
    """
    if window is None:
        return None
    if isinstance(window, bool) or not hasattr(window, "__index__"):
        raise TypeError(
            f"window must be an int >= 1 (the number of keys a query sees) or None, "
            f"got {window!r}"
        )
    if int(window) < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    return min(int(window), WINDOW_LIMIT)


def key_range(
    i0: int, i1: int, L: int, S: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that at least one query of rows ``[i0, i1)`` may see.

    Every visible key of those rows lies in the range; ``lo == hi`` when none does.
    """
    first, last = i0 + (S - L), i1 - 1 + (S - L)  # positions of the first/last row
    lo, hi = 0, S
    if causal:
        hi = min(S, last + 1)  # d <= 0
    elif window is not None:
        hi = min(S, last + window)  # d < w
    if window is not None:
        lo = max(0, first - window + 1)  # d > -w
    lo = min(max(lo, 0), S)
    return lo, max(lo, min(hi, S))


def tile_is_full(
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    L: int,
    S: int,
    causal: bool,
    window: int | None,
) -> bool:
    """True when every query of ``[i0, i1)`` may see every key of ``[j0, j1)``."""
    first, last = i0 + (S - L), i1 - 1 + (S - L)
    if causal and j1 - 1 > first:  # the last key is past the first row's diagonal
        return False
    if window is not None:
        if j0 <= last - window:  # the first key is too far behind the last row
            return False
        if not causal and j1 - 1 >= first + window:  # too far ahead of the first row
            return False
    return True


class QueryBlock(NamedTuple):
    """Query rows ``[i0, i1)`` and their key tiles ``(j0, j1, full)``, in key order."""

    i0: int
    i1: int
    tiles: tuple[tuple[int, int, bool], ...]


def plan(
    L: int, S: int, block_q: int, block_k: int, causal: bool, window: int | None
) -> list[QueryBlock]:
    """The tiles to compute, query block by query block; skipped tiles are absent.

    For each block of ``block_q`` query rows the key tiles of ``block_k`` columns start
    at the first key any of its rows may see, so the work is ``O(L * S)`` for full
    attention, about half of it when causal, and ``O(L * (window + block_k))`` with a
    window::

        L = S = 8, block_q = block_k = 2, causal, window = 3   (/: a partial tile)
                   keys 0-1 2-3 4-5 6-7
        queries 0-1      /
                2-3      /   /
                4-5          /   /
                6-7              /   /
    """
    blocks = []
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        lo, hi = key_range(i0, i1, L, S, causal, window)
        tiles = []
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            tiles.append((j0, j1, tile_is_full(i0, i1, j0, j1, L, S, causal, window)))
        blocks.append(QueryBlock(i0, i1, tuple(tiles)))
    return blocks


def visible_counts(L: int, S: int, causal: bool, window: int | None) -> int:
    """How many ``(i, j)`` pairs are visible: the work a kernel cannot avoid."""
    total = 0
    for i0 in range(L):
        lo, hi = key_range(i0, i0 + 1, L, S, causal, window)
        total += hi - lo
    return total


def query_range(
    j0: int, j1: int, L: int, S: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Queries ``[lo, hi)`` of which at least one may see a key of ``[j0, j1)``."""
    off = S - L  # query i sits at position i + off
    lo, hi = 0, L
    if causal:
        lo = max(lo, j0 - off)  # p >= j0
    elif window is not None:
        lo = max(lo, j0 - window + 1 - off)  # p - j0 < w for the first key
    if window is not None:
        hi = min(hi, j1 - 1 + window - off)  # p - (j1 - 1) < w for the last key
    lo = min(max(lo, 0), L)
    return lo, max(lo, min(hi, L))


def full_rows(
    j0: int, j1: int, L: int, S: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Queries ``[lo, hi)`` that may see every key of ``[j0, j1)`` (none: lo >= hi)."""
    off = S - L
    lo, hi = 0, L
    if causal:
        lo = max(lo, j1 - 1 - off)  # the last key at or before p
    if window is not None:
        hi = min(hi, j0 + window - off)  # the first key within w behind p
        if not causal:
            lo = max(lo, j1 - window - off)  # the last key within w ahead of p
    return lo, hi


class KeyBlock(NamedTuple):
    """Keys ``[j0, j1)`` and the query row chunks ``(i0, i1, full)`` that see them."""

    j0: int
    j1: int
    chunks: tuple[tuple[int, int, bool], ...]


def key_plan(
    L: int, S: int, block_q: int, block_k: int, causal: bool, window: int | None
) -> list[KeyBlock]:
    """The work by key blocks: for each, the query rows that see it, in chunks.

    The rows of a key block are split where they change from partly to fully visible,
    so that a mask is built only for the rows that need one, and then into chunks of at
    most ``block_q`` rows. Kernels that keep running statistics for all query rows
    walk the key blocks once each; with ``block_q >= L`` every step is one large
    matmul over all the rows that need it::

        L = S = 8, block_k = 4, causal          keys 0-3          keys 4-7
                                                rows 0-2 partial  rows 4-6 partial
                                                rows 3-7 full     row  7   full
    """
    blocks = []
    for j0 in range(0, S, block_k):
        j1 = min(j0 + block_k, S)
        lo, hi = query_range(j0, j1, L, S, causal, window)
        if lo >= hi:
            continue
        f0, f1 = full_rows(j0, j1, L, S, causal, window)
        f0, f1 = max(f0, lo), min(f1, hi)
        if f0 >= f1:
            pieces = [(lo, hi, False)]
        else:
            pieces = [(lo, f0, False), (f0, f1, True), (f1, hi, False)]
        chunks = []
        for a, b, full in pieces:
            for i0 in range(a, b, block_q):
                chunks.append((i0, min(i0 + block_q, b), full))
        blocks.append(KeyBlock(j0, j1, tuple(chunks)))
    return blocks
