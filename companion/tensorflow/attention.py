r"""Scaled dot-product attention for TensorFlow tensors: readable and tiled versions.

The same functions, names and semantics as :mod:`companion.numpy.attention`; the
conventions (layouts, ``True`` = attend, bottom-right causal, the grouped-query head
map, fully masked rows giving exactly 0) are those of :mod:`companion.conventions`.

Everything is written in TensorFlow ops on static shapes, so it runs eagerly and inside
``tf.function``; float16/bfloat16 inputs are computed in float32 and returned in their
own dtype.

Explained in the book chapter *Attention: algorithm and math*; the tiled version in
*Making it fast*.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import tensorflow as tf

from companion import _checks, _tiling

__all__ = [
    "softmax",
    "causal_mask",
    "padding_mask",
    "attention_weights",
    "scaled_dot_product_attention_reference",
    "attention_tiled",
]

_HALF_PRECISION = ("float16", "bfloat16")


def _compute_dtype(dtype_name: str):
    """float32 for float16/bfloat16 (accumulate in float32), else the dtype itself."""
    return tf.float32 if dtype_name in _HALF_PRECISION else tf.as_dtype(dtype_name)


def _check_flag(name: str, value) -> bool:
    """``value`` as a Python bool, ``TypeError`` otherwise (no tensor flags)."""
    return _checks.check_flag(name, value)


# --------------------------------------------------------------------------------------
# softmax and masks
# --------------------------------------------------------------------------------------


def softmax(x, axis=-1, mask=None):
    r"""Numerically stable softmax along ``axis``, with an optional boolean ``mask``.

    .. math:: \operatorname{softmax}(x)_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}},
              \qquad m = \max_k x_k

    Entries where ``mask`` is ``False`` (and entries equal to ``-inf``) get exactly 0; a
    row with nothing left gives all zeros, never NaN (``tf.nn.softmax`` of an all
    ``-inf`` row is NaN). ``mask`` must broadcast to ``x.shape`` without growing it.
    """
    x = tf.convert_to_tensor(x)
    x_dtype = _checks.check_float("x", x.dtype)
    shape = tuple(x.shape)
    if not isinstance(axis, int) or not -len(shape) <= axis < max(len(shape), 1):
        raise ValueError(f"axis {axis!r} is out of range for x of shape {shape}")
    work = tf.cast(x, _compute_dtype(x_dtype))
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            raise TypeError(
                "mask must be boolean (True = keep), got dtype "
                f"{_checks.dtype_name(mask.dtype)}"
            )
        try:
            grown = _checks.broadcast_shape(tuple(mask.shape), shape) != shape
        except ValueError:
            grown = True
        if grown:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
                f"{shape}"
            )
        # masked -> -inf
        work = tf.where(mask, work, tf.constant(-math.inf, work.dtype))
    row_max = tf.reduce_max(work, axis=axis, keepdims=True)  # m, keeps a size-1 axis
    # empty row: 0, not -inf
    row_max = tf.where(tf.math.is_finite(row_max), row_max, tf.zeros_like(row_max))
    exp = tf.exp(work - row_max)  # e^{x_j - m}; masked entries exp(-inf) = 0
    total = tf.reduce_sum(exp, axis=axis, keepdims=True)  # sum_k e^{x_k - m}
    return tf.cast(tf.math.divide_no_nan(exp, total), x.dtype)  # empty rows 0 / 0 -> 0


def causal_mask(L, S, *, window=None):
    """Bool ``(L, S)``, bottom-right aligned: query ``i`` sees key ``j <= i + (S - L)``.

    See the drawing in :mod:`companion.conventions`; for ``L == S`` it is the lower
    triangle. With ``window = w``, query ``i`` (position ``p = i + (S - L)``) sees only
    the last ``w`` keys, ``p - w < j <= p``::

        L = S = 5, window = 2     1 0 0 0 0
                                  1 1 0 0 0
                                  0 1 1 0 0
                                  0 0 1 1 0
                                  0 0 0 1 1
    """
    L = _checks.check_int("L", L, minimum=0)
    S = _checks.check_int("S", S, minimum=0)
    window = _tiling.check_window(window)
    return _band(0, L, 0, S, L, S, True, window)  # (L, S)


def _band(i0, i1, j0, j1, L, S, causal, window):
    """Bool ``(i1 - i0, j1 - j0)``: which keys each query may see (``_tiling``).

    With ``d = j - p``, ``p = i + (S - L)``: ``d <= 0`` if causal, ``-w < d`` with a
    window ``w``, and ``d < w`` with a window but not causal.
    """
    # d = j - p: (bq, bk)
    d = tf.range(j0, j1)[None, :] - (tf.range(i0, i1)[:, None] + (S - L))
    return _visible(d, causal, window)


def _visible(d, causal, window):
    """Bool like ``d``: which distances ``d = j - p`` are visible (:func:`_band`)."""
    left, right = _tiling.bounds(causal, window)  # -left <= d <= right
    visible = tf.ones(tf.shape(d), tf.bool)
    if right is not None:
        visible &= d <= right
    if left is not None:
        visible &= d >= -left
    return visible


def padding_mask(lengths, S):
    """Boolean ``(B, 1, 1, S)`` mask, ``True`` at positions ``< lengths[b]``.

    ``lengths`` is a 1-D integer tensor (or list) of ``B`` lengths in ``[0, S]``.
    """
    S = _checks.check_int("S", S, minimum=0)
    lengths = tf.convert_to_tensor(lengths)
    if lengths.shape.rank != 1:
        raise ValueError(
            "lengths must be 1-D (one length per sequence), got shape "
            f"{tuple(lengths.shape)}"
        )
    if not lengths.dtype.is_integer:
        raise TypeError(
            f"lengths must be integers, got dtype {_checks.dtype_name(lengths.dtype)}"
        )
    if tf.executing_eagerly() and lengths.shape[0]:
        low, high = int(tf.reduce_min(lengths)), int(tf.reduce_max(lengths))
        if low < 0 or high > S:
            raise ValueError(
                f"lengths must lie in [0, S={S}], got values from {low} to {high}"
            )
    positions = tf.range(S, dtype=lengths.dtype)  # (S,)
    mask = positions[None, :] < lengths[:, None]  # (B, S)
    return mask[:, None, None, :]  # (B, 1, 1, S)


# --------------------------------------------------------------------------------------
# shared preparation: checks, dtypes, the grouped-query layout of masks
# --------------------------------------------------------------------------------------


def _check_inputs(query, key, value):
    """Convert, check dtypes and shapes; return tensors, shapes and the dtype name."""
    query, key = tf.convert_to_tensor(query), tf.convert_to_tensor(key)
    value = key if value is None else tf.convert_to_tensor(value)
    names = [
        _checks.check_float(name, t.dtype)
        for name, t in (("query", query), ("key", key), ("value", value))
    ]
    if len(set(names)) != 1:
        raise TypeError(
            "query, key and value must have the same dtype, got "
            f"{names[0]}, {names[1]} and {names[2]}"
        )
    dtype = names[0]
    shapes = _checks.attention_shapes(
        tuple(query.shape), tuple(key.shape), tuple(value.shape)
    )
    return query, key, value, shapes, dtype


def _grouped_mask(mask, shapes, compute_dtype):
    """The mask as ``(..., H_kv|1, group|1, L|1, S|1)``, never copied to full size.

    Returns ``(mask, is_boolean)``; float masks are cast to ``compute_dtype``.
    """
    mask = tf.convert_to_tensor(mask)
    if mask.dtype == tf.bool:
        boolean = True
    elif mask.dtype.is_floating:
        boolean = False
        mask = tf.cast(mask, compute_dtype)
    else:
        raise TypeError(
            "mask must be boolean (True = attend) or floating (added to the scaled "
            "scores), "
            f"got dtype {_checks.dtype_name(mask.dtype)} with shape {tuple(mask.shape)}"
        )
    _checks.check_mask_shape(tuple(mask.shape), shapes)
    # padded to (..., H, L, S)
    m = (1,) * (len(shapes.scores) - mask.shape.rank) + tuple(mask.shape)
    heads = (shapes.H_kv, shapes.group) if m[-3] != 1 else (1, 1)
    # (..., H_kv, group, L, S), 1s kept
    return tf.reshape(mask, (*m[:-3], *heads, *m[-2:])), boolean


def _apply_mask(scores, mask, boolean):
    """Masked scores: ``-inf`` where a boolean mask is False, ``+ mask`` for a float."""
    if boolean:
        return tf.where(mask, scores, tf.constant(-math.inf, scores.dtype))
    return scores + mask


def _grouped_query(query, shapes):
    """``(..., H, L, D)`` -> ``(..., H_kv, group, L, D)``: ``h`` in ``h // group``."""
    q = tuple(query.shape)
    # (..., H_kv, G, L, D)
    return tf.reshape(query, (*q[:-3], shapes.H_kv, shapes.group, shapes.L, shapes.D))


# --------------------------------------------------------------------------------------
# reference: the formula, written plainly
# --------------------------------------------------------------------------------------


def attention_weights(query, key, *, mask=None, causal=False, scale=None, window=None):
    r"""The attention weights ``softmax(scale * Q K^T + mask)``, ``(..., H, L, S)``.

    .. math:: P = \operatorname{softmax}_\text{rows}\!\left(
              \frac{Q K^\top}{\sqrt{D}} + M\right)

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``; ``mask`` boolean (``True`` =
    attend) or float (added to the scaled scores), broadcastable to ``(..., H, L, S)``;
    ``causal`` adds the bottom-right causal mask; ``scale`` defaults to ``1 / sqrt(D)``;
    ``window = w`` keeps keys ``p - w < j <= p`` (causal) or ``|p - j| < w`` (not),
    ``p = i + (S - L)``.
    A row with nothing to attend to is all zeros. Conventions:
    :mod:`companion.conventions`.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    query, key, _, shapes, dtype = _check_inputs(query, key, None)
    weights = _grouped_weights(
        query, key, shapes, dtype, mask=mask, causal=causal, scale=scale, window=window
    )
    return tf.cast(tf.reshape(weights, shapes.scores), query.dtype)  # (..., H, L, S)


def _grouped_weights(query, key, shapes, dtype, *, mask, causal, scale, window=None):
    """Weights in the compute dtype, laid out ``(..., H_kv, group, L, S)``."""
    scale = _checks.resolve_scale(scale, shapes.D)
    work = _compute_dtype(dtype)
    q = _grouped_query(tf.cast(query, work), shapes)  # (..., H_kv, G, L, D)
    # (..., H_kv, 1, S, D): shared by the group, not copied
    k = tf.cast(key, work)[..., None, :, :]
    # scale Q K^T: (..., H_kv, G, L, S)
    scores = tf.linalg.matmul(q, k, transpose_b=True) * tf.constant(scale, work)
    if mask is not None:
        grouped, boolean = _grouped_mask(mask, shapes, work)
        scores = _apply_mask(scores, grouped, boolean)  # + M
    if causal or window is not None:
        # bottom-right causal and/or the window's band
        L, S = shapes.L, shapes.S
        scores = _apply_mask(scores, _band(0, L, 0, S, L, S, causal, window), True)
    return softmax(scores, axis=-1)  # (..., H_kv, G, L, S)


def scaled_dot_product_attention_reference(
    query, key, value, *, mask=None, causal=False, scale=None, window=None
):
    r"""Scaled dot-product attention, written as the formula: ``(..., H, L, D_v)``.

    .. math:: \operatorname{Attention}(Q, K, V) =
              \operatorname{softmax}_\text{rows}\!\left(
              \frac{Q K^\top}{\sqrt{D}} + M\right) V

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S, D_v)``;
    grouped-query when ``H_kv < H`` (query head ``h`` reads key/value head
    ``h // (H // H_kv)``). ``mask``, ``causal``, ``scale`` and ``window`` as in
    :func:`attention_weights`. Conventions: :mod:`companion.conventions`.
    """
    output, _ = _attention_and_weights(
        query, key, value, mask=mask, causal=causal, scale=scale, window=window
    )
    return output


def _attention_and_weights(
    query, key, value, *, mask=None, causal=False, scale=None, window=None
):
    """The reference's ``(output (..., H, L, D_v), weights (..., H, L, S))``.

    Both in the input dtype.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    query, key, value, shapes, dtype = _check_inputs(query, key, value)
    # (..., H_kv, G, L, S)
    weights = _grouped_weights(
        query, key, shapes, dtype, mask=mask, causal=causal, scale=scale, window=window
    )
    v = tf.cast(value, weights.dtype)[..., None, :, :]  # (..., H_kv, 1, S, D_v)
    output = tf.linalg.matmul(weights, v)  # P V: (..., H_kv, G, L, D_v)
    # (..., H, L, D_v)
    output = tf.reshape(output, (*shapes.batch, shapes.H, shapes.L, shapes.D_v))
    weights = tf.reshape(weights, shapes.scores)  # (..., H, L, S)
    return tf.cast(output, query.dtype), tf.cast(weights, query.dtype)


# --------------------------------------------------------------------------------------
# tiled: FlashAttention-2 forward on large tiles, all heads at once
# --------------------------------------------------------------------------------------

# One tile of scores holds at most this many numbers for all heads together (1 MiB of
# float32): each TensorFlow op does real work, and a Python loop over a few dozen tiles
# costs little next to it.
_TILE_NUMBERS = 1 << 18


def _default_blocks(rows_per_query: int, L: int, S: int) -> tuple[int, int]:
    """``(block_q, block_k)`` from the shapes: ``rows_per_query`` = heads x group rows.

    Keys in blocks of 512 (fewer when ``S`` is shorter); queries in blocks of at most
    512 rows that keep one tile of all heads within :data:`_TILE_NUMBERS` numbers, at
    least 16 rows.
    """
    block_k = max(1, min(S, 512))
    block_q = min(512, _TILE_NUMBERS // max(1, rows_per_query * block_k))
    return max(1, min(L, max(16, block_q))), block_k


def attention_tiled(
    query,
    key,
    value,
    *,
    mask=None,
    causal=False,
    scale=None,
    window=None,
    block_q=None,
    block_k=None,
):
    r"""Scaled dot-product attention by FlashAttention-2 tiles; no ``L x S`` matrix.

    The same result as :func:`scaled_dot_product_attention_reference`. For each block of
    ``block_q`` query rows (of all batch elements and heads at once), walk the key/value
    blocks of ``block_k`` positions keeping a running row maximum ``m``, normaliser
    ``l`` and unnormalised output ``O~``:

    .. math::
        S_{ij} &= t\, Q_i K_j^\top\ (+M_{ij}), \qquad
        m' = \max(m, \operatorname{rowmax} S_{ij}),
        \qquad \tilde P = e^{S_{ij} - m'}, \qquad c = e^{m - m'} \\
        l &\leftarrow c\, l + \operatorname{rowsum} \tilde P, \qquad
        \tilde O \leftarrow c\, \tilde O + \tilde P V_j, \qquad m \leftarrow m'
        \qquad\text{and finally}\qquad O_i = \tilde O / l.

    The running maximum starts at the lowest finite number, not ``-inf``, so the
    exponentials need no guard for rows that have seen nothing yet, and rows with
    ``l = 0`` (fully masked) give 0. Tiles that ``causal`` (bottom-right) or
    ``window`` hide entirely are skipped (``companion._tiling``), and a mask is built
    only for tiles that straddle the edge. Arguments as in
    :func:`scaled_dot_product_attention_reference`; ``block_q`` and ``block_k`` need not
    divide ``L`` and ``S`` and by default are chosen from the shapes (512 x 512 for one
    head; fewer query rows when many heads share a tile). Grouped query heads become
    rows of one matmul against their key/value head, which is never copied. A few
    tiles run as an eager Python loop; many run in a ``tf.while_loop`` compiled by XLA,
    so one tile is alive at a time and the extra memory is
    ``O(L * D_v + block_q * block_k)`` per head, eagerly and inside ``tf.function``.
    Under a gradient tape (or in a caller's graph) that loop also saves the
    log-sum-exp of each row, and the gradient is FlashAttention-2's backward pass,
    compiled by XLA too: it recomputes each tile's probabilities from the saved
    log-sum-exp and never holds a tile for later; that gradient flows to ``query``,
    ``key`` and ``value``, not to a float ``mask`` (as in the torch namespace).
    Derivation: ``REFERENCE.md``, *Making it fast*.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    query, key, value, shapes, dtype = _check_inputs(query, key, value)
    scale = _checks.resolve_scale(scale, shapes.D)
    work = _compute_dtype(dtype)
    batch, H_kv, G, L, S = shapes.batch, shapes.H_kv, shapes.group, shapes.L, shapes.S
    D, D_v = shapes.D, shapes.D_v
    N = H_kv * math.prod(batch)
    default_q, default_k = _default_blocks(N * G, L, S)
    block_q = default_q if block_q is None else _checks.check_int("block_q", block_q)
    block_k = default_k if block_k is None else _checks.check_int("block_k", block_k)
    grouped, boolean = (
        _grouped_mask(mask, shapes, work) if mask is not None else (None, True)
    )
    if L == 0 or N == 0:
        return tf.zeros((*batch, shapes.H, L, D_v), query.dtype)  # (..., H, L, D_v)

    # t Q: (..., H, L, D) -> (N, G, L, D) -> (N, L, G, D) -> (N, L * G, D)
    q = tf.broadcast_to(tf.cast(query, work), (*batch, shapes.H, L, D))
    q = tf.reshape(q * tf.constant(scale, work), (N, G, L, D))
    q = tf.reshape(tf.transpose(q, (0, 2, 1, 3)), (N, L * G, D))
    k = tf.reshape(tf.broadcast_to(tf.cast(key, work), (*batch, H_kv, S, D)), (N, S, D))
    k_t = tf.transpose(k, (0, 2, 1))  # K^T (N, D, S): plain matmuls, no transpose_b
    v = tf.reshape(
        tf.broadcast_to(tf.cast(value, work), (*batch, H_kv, S, D_v)), (N, S, D_v)
    )
    plan = tuple(_tiling.plan(L, S, block_q, block_k, causal, window))
    sizes = (tuple(batch), H_kv, G, L, S, causal, window, boolean)
    tiles = sum(len(block.tiles) for block in plan)
    if tiles >= _GRAPH_TILES and L * S >= _GRAPH_SCORES:
        # many tiles: a tf.while_loop, traced once per shape when called eagerly
        bq, bk = min(block_q, L), min(block_k, S)
        fixed = _fixed_size_plan(L, S, bq, bk, causal, window)
        if tf.executing_eagerly() and not _recording():
            output = _tiled_compiled(q, k_t, v, grouped, fixed, sizes)  # XLA
        else:  # a tape or the caller's graph may differentiate it
            by_keys = _fixed_key_plan(L, S, bq, bk, causal, window)
            output = _tiled_differentiable(q, k, v, grouped, fixed, by_keys, sizes)
    else:
        output = _tiled_loop(q, k_t, v, grouped, plan, sizes)  # (N, L * G, D_v)
    # (N, L, G, D_v) -> (N, G, L, D_v) -> (..., H, L, D_v)
    output = tf.transpose(tf.reshape(output, (N, L, G, D_v)), (0, 2, 1, 3))
    output = tf.reshape(output, (*batch, shapes.H, L, D_v))
    return tf.cast(output, query.dtype)


def _tiled_loop(q, k_t, v, grouped, plan, sizes):
    """The FlashAttention-2 forward over the planned tiles: ``O (N, L * G, D_v)``.

    ``q (N, L * G, D)`` scaled queries (row ``i * G + g`` is query ``i`` of group member
    ``g``), ``k_t (N, D, S)``, ``v (N, S, D_v)``, ``grouped`` the mask or ``None``,
    ``plan`` from ``companion._tiling.plan``, ``sizes`` the static sizes and flags.
    """
    batch, H_kv, G, L, S, causal, window, boolean = sizes
    N, D_v, work = q.shape[0], v.shape[-1], q.dtype
    # the running max starts at the lowest finite number, not -inf, so that
    # exp(S - m) and exp(m_old - m) need no guard for rows that saw nothing yet
    lowest = tf.constant(work.min, work)
    output_blocks = []
    for i0, i1, tiles in plan:
        rows = (i1 - i0) * G
        q_i = q[:, i0 * G : i1 * G]  # (N, bq * G, D)
        m = tf.fill((N, rows, 1), lowest)  # running row max
        l = tf.zeros((N, rows, 1), work)  # running normaliser
        acc = tf.zeros((N, rows, D_v), work)  # O~
        for j0, j1, full in tiles:
            s_ij = tf.linalg.matmul(q_i, k_t[:, :, j0:j1])  # S_ij: (N, bq * G, bk)
            if grouped is not None:
                # (..., H_kv, bq, G, bk): rows split by position and group member
                split = tf.reshape(s_ij, (*batch, H_kv, i1 - i0, G, j1 - j0))
                tile = _block_of(grouped, slice(i0, i1), slice(j0, j1))
                # + M_ij, (..., H_kv|1, bq|1, G|1, bk|1)
                split = _apply_mask(split, _swap_rows_and_group(tile), boolean)
                s_ij = tf.reshape(split, (N, rows, j1 - j0))
            if not full:  # the tile straddles the causal diagonal or the window edge
                band = _band(i0, i1, j0, j1, L, S, causal, window)  # (bq, bk)
                split = tf.reshape(s_ij, (N, i1 - i0, G, j1 - j0))
                split = _apply_mask(split, band[:, None, :], True)
                s_ij = tf.reshape(split, (N, rows, j1 - j0))
            # m' = max(m, rowmax S_ij)
            m_new = tf.maximum(m, tf.reduce_max(s_ij, axis=-1, keepdims=True))
            p_tilde = tf.exp(s_ij - m_new)  # P~ = exp(S_ij - m'): (N, bq * G, bk)
            correction = tf.exp(m - m_new)  # c = exp(m - m')
            # l = c l + rowsum P~
            l = correction * l + tf.reduce_sum(p_tilde, axis=-1, keepdims=True)
            # O~ = c O~ + P~ V_j
            acc = correction * acc + tf.linalg.matmul(p_tilde, v[:, j0:j1])
            m = m_new
        output_blocks.append(tf.math.divide_no_nan(acc, l))  # O_i = O~ / l, 0 if l = 0
    if not output_blocks:
        return tf.zeros((N, 0, D_v), work)
    return tf.concat(output_blocks, axis=1)  # (N, L * G, D_v)


# From this many tiles and scores on, the tiles run in a tf.while_loop (traced once per
# shape when called eagerly): eager dispatch would cost more than the tiles' work, and a
# graph of the unrolled Python loop would let the executor start every tile's matmul at
# once, holding O(L * S) scores. Small calls stay the eager Python loop.
_GRAPH_TILES = 16
_GRAPH_SCORES = 1 << 18


class _FixedPlan(NamedTuple):
    """The tiles as slices of one size ``bq x bk``, for :func:`_tiled_while`.

    ``blocks[b] = (r0, t0, t1)``: query rows ``[r0, r0 + bq)``, tiles ``t0 .. t1 - 1``.
    ``tiles[t] = (c0, j0, j1, masked)``: key columns ``[c0, c0 + bk)``, of which only
    ``[j0, j1)`` are the tile's; ``masked`` when some entry must be hidden. The last
    block's first ``repeat`` rows are rows of the block before it.
    """

    bq: int
    bk: int
    blocks: tuple[tuple[int, int, int], ...]
    tiles: tuple[tuple[int, int, int, bool], ...]
    repeat: int


def _fixed_size_plan(L, S, bq, bk, causal, window) -> _FixedPlan:
    """The tiles of ``companion._tiling.plan`` with one shape: ``bq <= L``, ``bk <= S``.

    A short last query block moves back to end at ``L`` (its key range is that of its
    rows); a short key tile keeps its start unless it would pass ``S``, then moves back
    to end at ``S``; columns outside ``[j0, j1)`` are masked. Every slice then has a
    static shape, as a ``tf.while_loop`` (and XLA) wants::

        L = 5, bq = 2     rows 0-1, rows 2-3, rows 3-4 (row 3 repeated, kept once)
    """
    blocks, tiles = [], []
    for i0 in range(0, L, bq):
        r0 = min(i0, L - bq)
        lo, hi = _tiling.key_range(r0, r0 + bq, L, S, causal, window)
        t0 = len(tiles)
        for j0 in range(lo, hi, bk):
            j1 = min(j0 + bk, hi)
            c0 = min(j0, S - bk)
            full = c0 == j0 and j1 == c0 + bk
            full = full and _tiling.tile_is_full(
                r0, r0 + bq, j0, j1, L, S, causal, window
            )
            tiles.append((c0, j0, j1, not full))
        blocks.append((r0, t0, len(tiles)))
    repeat = (L - 1) // bq * bq - blocks[-1][0]
    return _FixedPlan(bq, bk, tuple(blocks), tuple(tiles), repeat)


def _tiled_while(q, k_t, v, grouped, fixed, sizes, fused=False, with_lse=False):
    """:func:`_tiled_loop` as nested ``tf.while_loop`` s: ``O (N, L * G, D_v)``.

    The outer loop walks the query blocks of ``fixed`` (a :class:`_FixedPlan`), the
    inner one their key tiles with the running ``m``, ``l`` and ``O~`` as loop
    variables; one iteration at a time, so one tile's scores are alive at once and the
    extra memory is ``O(bq * bk + L * D_v)`` per batch element and head, not
    ``O(L * S)``. ``fused``: mask every tile (all visible in a full one), which XLA
    fuses into the exponentials; otherwise a ``tf.cond`` masks only the partial tiles.
    ``with_lse``: return ``(O, LSE (N, L * G))`` with the log-sum-exp ``m + log(l)``
    of each row (0 for a row that sees no key). Same arguments as :func:`_tiled_loop`
    otherwise.
    """
    batch, H_kv, G, L, S, causal, window, boolean = sizes
    N, D, D_v, work = q.shape[0], q.shape[-1], v.shape[-1], q.dtype
    bq, bk, rows = fixed.bq, fixed.bk, fixed.bq * G
    lowest = tf.constant(work.min, work)  # as in _tiled_loop: no -inf guards
    r0s, t0s, t1s = (tf.constant(column, tf.int32) for column in zip(*fixed.blocks))
    if fixed.tiles:
        c0s, j0s, j1s, masks = (tf.constant(c) for c in zip(*fixed.tiles))
    offsets = tf.range(bq)[:, None] - tf.range(bk)[None, :] + (S - L)  # p - j - c0 + r0

    def tile_step(q_i, r0, t, m, l, acc):
        c0, j0, j1 = c0s[t], j0s[t], j1s[t]
        k_j = tf.slice(k_t, [0, 0, c0], [N, D, bk])  # K_j^T: (N, D, bk)
        s_ij = tf.linalg.matmul(q_i, k_j)  # S_ij: (N, bq * G, bk)
        if grouped is not None:
            # (..., H_kv, bq, G, bk): rows split by position and group member
            split = tf.reshape(s_ij, (*batch, H_kv, bq, G, bk))
            tile = _slice_of(grouped, r0, c0, bq, bk)
            # + M_ij, (..., H_kv|1, bq|1, G|1, bk|1)
            split = _apply_mask(split, _swap_rows_and_group(tile), boolean)
            s_ij = tf.reshape(split, (N, rows, bk))

        def hide(s_ij):  # the tile's own columns, causal and window: (bq, bk)
            cols = c0 + tf.range(bk)
            own = (cols >= j0) & (cols < j1)
            visible = _visible((c0 - r0) - offsets, causal, window) & own[None, :]
            if fused:  # all of a full tile visible (XLA cannot differentiate a cond)
                visible |= tf.logical_not(masks[t])
            split = tf.reshape(s_ij, (N, bq, G, bk))
            split = _apply_mask(split, visible[:, None, :], True)
            return tf.reshape(split, (N, rows, bk))

        if fused:
            s_ij = hide(s_ij)
        else:
            s_ij = tf.cond(masks[t], lambda: hide(s_ij), lambda: s_ij)
        # m' = max(m, rowmax S_ij)
        m_new = tf.maximum(m, tf.reduce_max(s_ij, axis=-1, keepdims=True))
        p_tilde = tf.exp(s_ij - m_new)  # P~ = exp(S_ij - m'): (N, bq * G, bk)
        correction = tf.exp(m - m_new)  # c = exp(m - m')
        # l = c l + rowsum P~
        l = correction * l + tf.reduce_sum(p_tilde, axis=-1, keepdims=True)
        v_j = tf.slice(v, [0, c0, 0], [N, bk, D_v])  # V_j: (N, bk, D_v)
        acc = correction * acc + tf.linalg.matmul(p_tilde, v_j)  # O~ = c O~ + P~ V_j
        return t + 1, m_new, l, acc

    def block_step(b, out, lse):
        r0 = r0s[b]
        q_i = tf.slice(q, [0, r0 * G, 0], [N, rows, D])  # (N, bq * G, D)
        start = (
            t0s[b],
            tf.fill((N, rows, 1), lowest),  # running row max m
            tf.zeros((N, rows, 1), work),  # running normaliser l
            tf.zeros((N, rows, D_v), work),  # O~
        )
        _, m, l, acc = tf.while_loop(
            lambda t, *_: t < t1s[b],
            lambda t, m, l, acc: tile_step(q_i, r0, t, m, l, acc),
            start,
            parallel_iterations=1,
            maximum_iterations=longest,  # XLA's gradient needs a bound
        )
        out = out.write(b, tf.math.divide_no_nan(acc, l))  # O~ / l, 0 if l = 0
        if with_lse:  # LSE = m + log(l); 0 where l = 0
            seen = l[..., 0] > 0
            log_l = tf.math.log(tf.where(seen, l[..., 0], tf.ones_like(l[..., 0])))
            lse = lse.write(b, tf.where(seen, m[..., 0] + log_l, tf.zeros_like(log_l)))
        return b + 1, out, lse

    blocks = len(fixed.blocks)
    longest = max(t1 - t0 for _, t0, t1 in fixed.blocks)  # tiles of one block
    out = tf.TensorArray(work, size=blocks, element_shape=(N, rows, D_v))
    lse = tf.TensorArray(work, size=blocks, element_shape=(N, rows))
    _, out, lse = tf.while_loop(
        lambda b, *_: b < blocks,
        block_step,
        (0, out, lse),
        parallel_iterations=1,
        maximum_iterations=blocks,
    )
    # (N, L * G, D_v)
    output = _merge_blocks(out.stack(), fixed.repeat * G)
    if with_lse:
        # (N, L * G)
        return output, _merge_blocks(lse.stack()[..., None], fixed.repeat * G)[..., 0]
    return output


def _merge_blocks(stacked, repeat):
    """``(blocks, N, rows, C)`` -> ``(N, blocks * rows - repeat, C)``.

    The blocks' rows in order, without the ``repeat`` rows at the start of the last
    block that repeat rows of the block before it.
    """
    blocks, N, rows, C = stacked.shape
    # (blocks, N, rows, C) -> (N, blocks * rows, C)
    merged = tf.reshape(tf.transpose(stacked, (1, 0, 2, 3)), (N, blocks * rows, C))
    if repeat:
        cut = (blocks - 1) * rows
        merged = tf.concat([merged[:, :cut], merged[:, cut + repeat :]], 1)
    return merged


# Compiled by XLA, each tile's mask, max, subtraction, exp and sum fuse into one pass
# over the scores: about 1.3x faster than the plain graph at n = 4096 on 2 cores. XLA
# cannot hand the loop's saved intermediates to a gradient: where a tape records the
# call, the loop with the log-sum-exp runs under a hand-written gradient
# (_tiled_differentiable).
_tiled_compiled = tf.function(
    functools.partial(_tiled_while, fused=True), jit_compile=True
)
_tiled_compiled_lse = tf.function(
    functools.partial(_tiled_while, fused=True, with_lse=True), jit_compile=True
)


def _fixed_key_plan(L, S, bq, bk, causal, window) -> _FixedPlan:
    """:func:`_fixed_size_plan` by key blocks, for the backward pass's ``dK, dV``.

    ``blocks[b] = (c0, t0, t1)``: keys ``[c0, c0 + bk)`` (a short last block moves back
    to end at ``S``; ``repeat`` of its keys belong to the block before it), tiles
    ``t0 .. t1 - 1``; ``tiles[t] = (r0, i0, i1, masked)``: query rows
    ``[r0, r0 + bq)`` of which only ``[i0, i1)`` are the tile's (so that no row counts
    twice), ``masked`` when some entry must be hidden.
    """
    blocks, tiles = [], []
    for j0 in range(0, S, bk):
        c0 = min(j0, S - bk)
        lo, hi = _tiling.query_range(c0, c0 + bk, L, S, causal, window)
        t0 = len(tiles)
        for i0 in range(lo, hi, bq):
            i1 = min(i0 + bq, hi)
            r0 = min(i0, L - bq)
            full = r0 == i0 and i1 == r0 + bq
            full = full and _tiling.tile_is_full(
                r0, r0 + bq, c0, c0 + bk, L, S, causal, window
            )
            tiles.append((r0, i0, i1, not full))
        blocks.append((c0, t0, len(tiles)))
    repeat = (S - 1) // bk * bk - blocks[-1][0]
    return _FixedPlan(bq, bk, tuple(blocks), tuple(tiles), repeat)


def _tiled_differentiable(q, k, v, grouped, fixed, by_keys, sizes):
    """The XLA-compiled forward with FlashAttention-2's backward as its gradient.

    ``q (N, L * G, D)`` (scaled), ``k (N, S, D)``, ``v (N, S, D_v)``; ``fixed`` and
    ``by_keys`` the tiles by query and by key blocks. The forward saves the output and
    the log-sum-exp (``O(L)``), never a tile; the gradient recomputes each tile's
    probabilities from them (:func:`_tiled_backward`). No gradient flows to ``grouped``
    (the mask).
    """

    @tf.custom_gradient
    def attend(q, k, v):
        # no tape may record the compiled loops (XLA cannot hand a loop's
        # TensorArrays to a gradient: UnimplementedError); `gradient` is their gradient
        q, k, v = (tf.stop_gradient(x) for x in (q, k, v))
        k_t = tf.transpose(k, (0, 2, 1))  # K^T (N, D, S)
        output, lse = _tiled_compiled_lse(q, k_t, v, grouped, fixed, sizes)

        def gradient(grad_output):
            do = tf.stop_gradient(grad_output)
            return _tiled_backward_compiled(
                q, k_t, v, grouped, output, lse, do, by_keys, sizes
            )

        return output, gradient

    return attend(q, k, v)


def _tiled_backward(q, k_t, v, grouped, output, lse, grad_output, by_keys, sizes):
    r"""FlashAttention-2's backward over fixed-size tiles: ``(dQ, dK, dV)``.

    One pass by key blocks (``by_keys``), a pair of ``tf.while_loop`` s as in
    FlashAttention-2: for key block ``j`` and each query tile ``i`` that sees it,
    :math:`P_{ij} = \exp(Q_i K_j^\top - \mathrm{LSE}_i)` (masked: 0),
    :math:`dV_j \mathrel{+}= P_{ij}^\top dO_i`,
    :math:`dS_{ij} = P_{ij} \circ (dO_i V_j^\top - \Delta_i)` with
    :math:`\Delta_i = \mathrm{rowsum}(dO_i \circ O_i)`,
    :math:`dK_j \mathrel{+}= dS_{ij}^\top Q_i` and
    :math:`dQ_i \mathrel{+}= dS_{ij} K_j`, the last into rows of ``dQ`` in place
    (XLA's dynamic update slice). Entries that are not the tile's (rows or keys
    repeated by the fixed-size slices) are masked, so nothing counts twice. Extra
    memory ``O((L + S) D)``.
    """
    # XLA's in-place update of a slice (the module TensorFlow's own XLA code uses)
    from tensorflow.compiler.tf2xla.python import xla

    batch, H_kv, G, L, S, causal, window, boolean = sizes
    N, D, D_v, work = q.shape[0], q.shape[-1], v.shape[-1], q.dtype
    bq, bk, rows = by_keys.bq, by_keys.bk, by_keys.bq * G
    do = tf.cast(grad_output, work)  # dO (N, L * G, D_v)
    delta = tf.reduce_sum(do * output, axis=-1, keepdims=True)  # Delta (N, L * G, 1)
    lse = lse[..., None]  # (N, L * G, 1)
    # p - j - c0 + r0 of a tile's entries: (bq, bk)
    offsets = tf.range(bq)[:, None] - tf.range(bk)[None, :] + (S - L)
    c0s, t0s, t1s = (tf.constant(c, tf.int32) for c in zip(*by_keys.blocks))
    j0s = tf.constant([j0 for j0 in range(0, S, bk)], tf.int32)  # first own key
    if by_keys.tiles:
        r0s, i0s, i1s = (
            tf.constant(c, tf.int32) for c in list(zip(*by_keys.tiles))[:3]
        )

    def rows_of(x, r0, width):  # rows [r0, r0 + bq) of an (N, L * G, width) tensor
        return tf.slice(x, [0, r0 * G, 0], [N, rows, width])

    def key_block(b, dq, out_k, out_v):
        c0 = c0s[b]
        k_j = tf.slice(k_t, [0, 0, c0], [N, D, bk])  # K_j^T (N, D, bk)
        v_j = tf.slice(v, [0, c0, 0], [N, bk, D_v])  # (N, bk, D_v)
        own_cols = c0 + tf.range(bk) >= j0s[b]  # keys of the block before: not ours

        def tile(t, dq, dk_j, dv_j):
            r0 = r0s[t]
            positions = r0 + tf.range(bq)
            own_rows = (positions >= i0s[t]) & (positions < i1s[t])
            q_i, do_i = rows_of(q, r0, D), rows_of(do, r0, D_v)
            lse_i, delta_i = rows_of(lse, r0, 1), rows_of(delta, r0, 1)
            s_ij = tf.linalg.matmul(q_i, k_j)  # S_ij: (N, bq * G, bk)
            if grouped is not None:
                split = tf.reshape(s_ij, (*batch, H_kv, bq, G, bk))
                piece = _slice_of(grouped, r0, c0, bq, bk)
                split = _apply_mask(split, _swap_rows_and_group(piece), boolean)
                s_ij = tf.reshape(split, (N, rows, bk))
            visible = _visible((c0 - r0) - offsets, causal, window)
            visible &= own_rows[:, None] & own_cols[None, :]  # (bq, bk)
            split = tf.reshape(s_ij, (N, bq, G, bk))
            split = _apply_mask(split, visible[:, None, :], True)
            p = tf.exp(tf.reshape(split, (N, rows, bk)) - lse_i)  # P_ij
            dv_j += tf.linalg.matmul(p, do_i, transpose_a=True)  # P^T dO_i
            dp = tf.linalg.matmul(do_i, v_j, transpose_b=True)  # dO_i V_j^T
            ds = p * (dp - delta_i)  # dS = P * (dP - Delta)
            dk_j += tf.linalg.matmul(ds, q_i, transpose_a=True)  # dS^T (t Q_i)
            dq_i = rows_of(dq, r0, D) + tf.linalg.matmul(ds, k_j, transpose_b=True)
            dq = xla.dynamic_update_slice(dq, dq_i, tf.stack([0, r0 * G, 0]))
            return t + 1, dq, dk_j, dv_j

        _, dq, dk_j, dv_j = tf.while_loop(
            lambda t, *_: t < t1s[b],
            tile,
            (t0s[b], dq, tf.zeros((N, bk, D), work), tf.zeros((N, bk, D_v), work)),
            parallel_iterations=1,
            maximum_iterations=max(1, *(t1 - t0 for _, t0, t1 in by_keys.blocks)),
        )
        return b + 1, dq, out_k.write(b, dk_j), out_v.write(b, dv_j)

    key_blocks = len(by_keys.blocks)
    dk = tf.TensorArray(work, size=key_blocks, element_shape=(N, bk, D))
    dv = tf.TensorArray(work, size=key_blocks, element_shape=(N, bk, D_v))
    _, dq, dk, dv = tf.while_loop(
        lambda b, *_: b < key_blocks,
        key_block,
        (0, tf.zeros_like(q), dk, dv),
        parallel_iterations=1,
    )
    dk = _merge_blocks(dk.stack(), by_keys.repeat)  # (N, S, D)
    dv = _merge_blocks(dv.stack(), by_keys.repeat)  # (N, S, D_v)
    return dq, dk, dv


_tiled_backward_compiled = tf.function(_tiled_backward, jit_compile=True)


def _recording() -> bool:
    """Whether a gradient tape may record the current eager call."""
    try:
        from tensorflow.python.eager import record
    except ImportError:  # not in this TensorFlow: assume a tape, take the plain graph
        return True
    return bool(record.could_possibly_record())


def _block_of(mask, rows, cols):
    """The part of a grouped mask for ``rows`` and ``cols`` (size-1 axes stay)."""
    m = tuple(mask.shape)
    r = slice(None) if m[-2] == 1 else rows
    c = slice(None) if m[-1] == 1 else cols
    return mask[..., r, c]


def _slice_of(mask, r0, c0, bq, bk):
    """Rows ``[r0, r0 + bq)`` and columns ``[c0, c0 + bk)`` of a grouped mask.

    Size-1 axes stay; ``r0`` and ``c0`` may be tensors, the sizes are static.
    """
    m = tuple(mask.shape)
    lead = len(m) - 2
    begin = [0] * lead + [0 if m[-2] == 1 else r0, 0 if m[-1] == 1 else c0]
    size = [-1] * lead + [1 if m[-2] == 1 else bq, 1 if m[-1] == 1 else bk]
    return tf.slice(mask, tf.stack(begin), size)


def _swap_rows_and_group(tile):
    """A grouped mask tile ``(..., G|1, bq|1, bk|1)`` as ``(..., bq|1, G|1, bk|1)``."""
    rank = len(tile.shape)
    order = list(range(rank))
    order[-3], order[-2] = order[-2], order[-3]
    return tf.transpose(tile, order)
