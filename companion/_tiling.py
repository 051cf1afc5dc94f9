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
any,       ``(left, right)``  ``-left <= d <= right``        FlashAttention's window
============================  =============================  ==========================

With a pair, ``causal`` caps ``right`` at 0; ``-1`` or ``None`` leaves a side
unbounded (:func:`bounds` turns every case into one ``(left, right)``).

A tile is *skipped* when no entry is visible, *full* when every entry is (no mask is
built for it), and *partial* otherwise (the kernel masks it).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "bounds",
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


def _check_side(window, side: str, value) -> int | None:
    """One side of a ``(left, right)`` window: an int ``>= 0``, or ``None``/``-1``
    (unbounded, FlashAttention's spelling)."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"window must be an int >= 1, a pair (left, right) of ints >= 0 (-1 or "
            f"None: unbounded) or None; its {side} is {value!r} in {window!r}"
        )
    if int(value) < -1:
        raise ValueError(
            f"window (left, right) takes ints >= 0, or -1 / None for unbounded; its "
            f"{side} is {value!r} in {window!r}"
        )
    return None if int(value) == -1 else min(int(value), WINDOW_LIMIT)


def check_window(window) -> int | tuple[int | None, int | None] | None:
    """``window`` as a Python int ``>= 1``, a pair ``(left, right)`` or ``None``.

    An int ``w`` is the number of keys a query sees (Mistral's sliding window); a
    pair is FlashAttention's ``window_size``: query ``p`` sees keys
    ``p - left <= j <= p + right``, ``-1`` or ``None`` for an unbounded side. The
    pair comes back with ``None`` for an unbounded side; see :func:`bounds`.
    ``TypeError`` for a non-integer (bools and floats too), ``ValueError`` below 1
    (an int) or below -1 (a side). Windows of :data:`WINDOW_LIMIT` or more give
    :data:`WINDOW_LIMIT`: the same keys for any sequence shorter than ``2**31 - 1``
    positions.
    """
    if window is None:
        return None
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(
                f"a window pair is (left, right), got {len(window)} values: {window!r}"
            )
        left = _check_side(window, "left", window[0])
        right = _check_side(window, "right", window[1])
        return (left, right)
    if isinstance(window, bool) or not hasattr(window, "__index__"):
        raise TypeError(
            f"window must be an int >= 1 (the number of keys a query sees), a pair "
            f"(left, right) or None, got {window!r}"
        )
    if int(window) < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    return min(int(window), WINDOW_LIMIT)


def bounds(causal: bool, window) -> tuple[int | None, int | None]:
    """``(left, right)``: key ``j`` visible from position ``p`` iff
    ``-left <= j - p <= right`` (``None``: that side unbounded).

    ``causal`` caps ``right`` at 0; an int window ``w`` is ``(w - 1, w - 1)``, so
    ``causal=True, window=w`` is FlashAttention's ``(w - 1, 0)`` and
    ``causal=False, window=w`` its ``(w - 1, w - 1)``. ``window`` as
    :func:`check_window` returns it.
    """
    if window is None:
        left = right = None
    elif isinstance(window, tuple):
        left, right = window
    else:
        left = right = window - 1
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def key_range(
    i0: int, i1: int, L: int, S: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that at least one query of rows ``[i0, i1)`` may see.

    Every visible key of those rows lies in the range; ``lo == hi`` when none does.
    """
    first, last = i0 + (S - L), i1 - 1 + (S - L)  # positions of the first/last row
    left, right = bounds(causal, window)
    lo = 0 if left is None else max(0, first - left)  # d >= -left
    hi = S if right is None else min(S, last + right + 1)  # d <= right
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
    left, right = bounds(causal, window)
    if right is not None and j1 - 1 - first > right:  # last key past the first row
        return False
    if left is not None and j0 - last < -left:  # first key too far behind the last row
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
    left, right = bounds(causal, window)
    lo, hi = 0, L
    if right is not None:
        lo = max(lo, j0 - right - off)  # j0 - p <= right for the first key
    if left is not None:
        hi = min(hi, j1 - 1 + left - off + 1)  # p - (j1 - 1) <= left for the last key
    lo = min(max(lo, 0), L)
    return lo, max(lo, min(hi, L))


def full_rows(
    j0: int, j1: int, L: int, S: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Queries ``[lo, hi)`` that may see every key of ``[j0, j1)`` (none: lo >= hi)."""
    off = S - L
    left, right = bounds(causal, window)
    lo, hi = 0, L
    if right is not None:
        lo = max(lo, j1 - 1 - right - off)  # the last key within right ahead of p
    if left is not None:
        hi = min(hi, j0 + left - off + 1)  # the first key within left behind p
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
