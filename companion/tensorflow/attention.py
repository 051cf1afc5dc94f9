r"""Scaled dot-product attention for TensorFlow tensors: the readable reference and the tiled version.

The same functions, names and semantics as :mod:`companion.numpy.attention`; the
conventions (layouts, ``True`` = attend, bottom-right causal, the grouped-query head map,
fully masked rows giving exactly 0) are those of :mod:`companion.conventions`.

Everything is written in TensorFlow ops on static shapes, so it runs eagerly and inside
``tf.function``; float16/bfloat16 inputs are computed in float32 and returned in their
own dtype.

Explained in the book chapter *Attention: algorithm and math*; the tiled version in
*Making it fast*.
"""

from __future__ import annotations

import math

import tensorflow as tf

from companion import _checks

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
    """``value`` as a Python bool; ``TypeError`` for anything else (a tensor flag cannot pick a code path)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------------------------
# softmax and masks
# ---------------------------------------------------------------------------------------


def softmax(x, axis=-1, mask=None):
    r"""Numerically stable softmax along ``axis``, with an optional boolean ``mask``.

    .. math:: \operatorname{softmax}(x)_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}},
              \qquad m = \max_k x_k

    Entries where ``mask`` is ``False`` (and entries equal to ``-inf``) get exactly 0; a
    row with nothing left gives all zeros, never NaN (``tf.nn.softmax`` of an all ``-inf``
    row is NaN). ``mask`` must broadcast to ``x.shape`` without growing it.
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
                f"mask must be boolean (True = keep), got dtype {_checks.dtype_name(mask.dtype)}"
            )
        try:
            grown = _checks.broadcast_shape(tuple(mask.shape), shape) != shape
        except ValueError:
            grown = True
        if grown:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {shape}"
            )
        # masked -> -inf
        work = tf.where(mask, work, tf.constant(-math.inf, work.dtype))
    row_max = tf.reduce_max(work, axis=axis, keepdims=True)  # m, keeps a size-1 axis
    # empty row: 0, not -inf
    row_max = tf.where(tf.math.is_finite(row_max), row_max, tf.zeros_like(row_max))
    exp = tf.exp(work - row_max)  # e^{x_j - m}; masked entries exp(-inf) = 0
    total = tf.reduce_sum(exp, axis=axis, keepdims=True)  # sum_k e^{x_k - m}
    return tf.cast(tf.math.divide_no_nan(exp, total), x.dtype)  # empty rows 0 / 0 -> 0


def causal_mask(L, S):
    """Boolean ``(L, S)`` mask, bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (S - L)``.

    See the drawing in :mod:`companion.conventions`; for ``L == S`` it is the lower triangle.
    """
    L = _checks.check_int("L", L, minimum=0)
    S = _checks.check_int("S", S, minimum=0)
    rows = tf.range(L)[:, None]  # (L, 1)
    cols = tf.range(S)[None, :]  # (1, S)
    return cols <= rows + (S - L)  # (L, S)


def padding_mask(lengths, S):
    """Boolean ``(B, 1, 1, S)`` mask, ``True`` at positions ``< lengths[b]`` (the real tokens).

    ``lengths`` is a 1-D integer tensor (or list) of ``B`` lengths in ``[0, S]``.
    """
    S = _checks.check_int("S", S, minimum=0)
    lengths = tf.convert_to_tensor(lengths)
    if lengths.shape.rank != 1:
        raise ValueError(
            f"lengths must be 1-D (one length per sequence), got shape {tuple(lengths.shape)}"
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


# ---------------------------------------------------------------------------------------
# shared preparation: checks, dtypes, the grouped-query layout of masks
# ---------------------------------------------------------------------------------------


def _check_inputs(query, key, value):
    """Convert, check dtypes and shapes; return tensors, shapes and the input dtype name."""
    query, key = tf.convert_to_tensor(query), tf.convert_to_tensor(key)
    value = key if value is None else tf.convert_to_tensor(value)
    names = [
        _checks.check_float(name, t.dtype)
        for name, t in (("query", query), ("key", key), ("value", value))
    ]
    if len(set(names)) != 1:
        raise TypeError(
            f"query, key and value must have the same dtype, got {names[0]}, {names[1]} and {names[2]}"
        )
    dtype = names[0]
    shapes = _checks.attention_shapes(
        tuple(query.shape), tuple(key.shape), tuple(value.shape)
    )
    return query, key, value, shapes, dtype


def _grouped_mask(mask, shapes, compute_dtype):
    """The mask as ``(..., H_kv or 1, group or 1, L or 1, S or 1)``, without copying it to full size.

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
            f"mask must be boolean (True = attend) or floating (added to the scaled scores), "
            f"got dtype {_checks.dtype_name(mask.dtype)} with shape {tuple(mask.shape)}"
        )
    _checks.check_mask_shape(tuple(mask.shape), shapes)
    # padded to (..., H, L, S)
    m = (1,) * (len(shapes.scores) - mask.shape.rank) + tuple(mask.shape)
    heads = (shapes.H_kv, shapes.group) if m[-3] != 1 else (1, 1)
    # (..., H_kv, group, L, S), 1s kept
    return tf.reshape(mask, (*m[:-3], *heads, *m[-2:])), boolean


def _apply_mask(scores, mask, boolean):
    """Masked scores: ``-inf`` where a boolean mask is False, ``+ mask`` for a float mask."""
    if boolean:
        return tf.where(mask, scores, tf.constant(-math.inf, scores.dtype))
    return scores + mask


def _grouped_query(query, shapes):
    """``(..., H, L, D)`` -> ``(..., H_kv, group, L, D)``: query head ``h`` sits under k/v head ``h // group``."""
    q = tuple(query.shape)
    # (..., H_kv, G, L, D)
    return tf.reshape(query, (*q[:-3], shapes.H_kv, shapes.group, shapes.L, shapes.D))


# ---------------------------------------------------------------------------------------
# reference: the formula, written plainly
# ---------------------------------------------------------------------------------------


def attention_weights(query, key, *, mask=None, causal=False, scale=None):
    r"""The attention weights ``softmax(scale * Q K^T + mask)``, shape ``(..., H, L, S)``.

    .. math:: P = \operatorname{softmax}_\text{rows}\!\left(\frac{Q K^\top}{\sqrt{D}} + M\right)

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``; ``mask`` boolean (``True`` =
    attend) or float (added to the scaled scores), broadcastable to ``(..., H, L, S)``;
    ``causal`` adds the bottom-right causal mask; ``scale`` defaults to ``1 / sqrt(D)``.
    A row with nothing to attend to is all zeros. Conventions: :mod:`companion.conventions`.
    """
    causal = _check_flag("causal", causal)
    query, key, _, shapes, dtype = _check_inputs(query, key, None)
    weights = _grouped_weights(
        query, key, shapes, dtype, mask=mask, causal=causal, scale=scale
    )
    return tf.cast(tf.reshape(weights, shapes.scores), query.dtype)  # (..., H, L, S)


def _grouped_weights(query, key, shapes, dtype, *, mask, causal, scale):
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
    if causal:
        # bottom-right causal
        scores = _apply_mask(scores, causal_mask(shapes.L, shapes.S), True)
    return softmax(scores, axis=-1)  # (..., H_kv, G, L, S)


def scaled_dot_product_attention_reference(
    query, key, value, *, mask=None, causal=False, scale=None
):
    r"""Scaled dot-product attention, written as the formula: output ``(..., H, L, D_v)``.

    .. math:: \operatorname{Attention}(Q, K, V) =
              \operatorname{softmax}_\text{rows}\!\left(\frac{Q K^\top}{\sqrt{D}} + M\right) V

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S, D_v)``;
    grouped-query when ``H_kv < H`` (query head ``h`` reads key/value head
    ``h // (H // H_kv)``). ``mask``, ``causal`` and ``scale`` as in
    :func:`attention_weights`. Conventions: :mod:`companion.conventions`.
    """
    output, _ = _attention_and_weights(
        query, key, value, mask=mask, causal=causal, scale=scale
    )
    return output


def _attention_and_weights(query, key, value, *, mask=None, causal=False, scale=None):
    """The reference's ``(output (..., H, L, D_v), weights (..., H, L, S))``, both in the input dtype."""
    causal = _check_flag("causal", causal)
    query, key, value, shapes, dtype = _check_inputs(query, key, value)
    # (..., H_kv, G, L, S)
    weights = _grouped_weights(
        query, key, shapes, dtype, mask=mask, causal=causal, scale=scale
    )
    v = tf.cast(value, weights.dtype)[..., None, :, :]  # (..., H_kv, 1, S, D_v)
    output = tf.linalg.matmul(weights, v)  # P V: (..., H_kv, G, L, D_v)
    # (..., H, L, D_v)
    output = tf.reshape(output, (*shapes.batch, shapes.H, shapes.L, shapes.D_v))
    weights = tf.reshape(weights, shapes.scores)  # (..., H, L, S)
    return tf.cast(output, query.dtype), tf.cast(weights, query.dtype)


# ---------------------------------------------------------------------------------------
# tiled: FlashAttention-2 forward, blockwise online softmax
# ---------------------------------------------------------------------------------------


def _block_of(mask, rows, cols):
    """The part of a grouped mask for query rows ``rows`` and key columns ``cols`` (size-1 axes stay)."""
    m = tuple(mask.shape)
    r = slice(None) if m[-2] == 1 else rows
    c = slice(None) if m[-1] == 1 else cols
    return mask[..., r, c]


def attention_tiled(
    query, key, value, *, mask=None, causal=False, scale=None, block_q=64, block_k=64
):
    r"""Scaled dot-product attention by blocks (FlashAttention-2 forward); never holds an ``L x S`` matrix.

    The same result as :func:`scaled_dot_product_attention_reference`. For each block of
    ``block_q`` query rows, walk the key/value blocks of ``block_k`` positions keeping a
    running row maximum ``m``, normaliser ``l`` and unnormalised output ``O~``:

    .. math::
        S_{ij} &= t\, Q_i K_j^\top\ (+M_{ij}), \qquad m' = \max(m, \operatorname{rowmax} S_{ij}),
        \qquad \tilde P = e^{S_{ij} - m'}, \qquad c = e^{m - m'} \\
        l &\leftarrow c\, l + \operatorname{rowsum} \tilde P, \qquad
        \tilde O \leftarrow c\, \tilde O + \tilde P V_j, \qquad m \leftarrow m'
        \qquad\text{and finally}\qquad O_i = \tilde O / l.

    Where ``m'`` is ``-inf`` (nothing seen yet) 0 is used inside the exponentials, and rows
    with ``l = 0`` (fully masked) give 0. With ``causal``, key blocks entirely above the
    bottom-right diagonal are skipped and the mask is built only for blocks that straddle
    it. Arguments as in :func:`scaled_dot_product_attention_reference`; ``block_q`` and
    ``block_k`` need not divide ``L`` and ``S``. A Python loop over blocks: it runs eagerly
    and unrolls inside ``tf.function``. Derivation: ``REFERENCE.md``, *Making it fast*.
    """
    causal = _check_flag("causal", causal)
    query, key, value, shapes, dtype = _check_inputs(query, key, value)
    block_q = _checks.check_int("block_q", block_q)
    block_k = _checks.check_int("block_k", block_k)
    scale = _checks.resolve_scale(scale, shapes.D)
    work = _compute_dtype(dtype)
    # query i sees key j iff j <= i + offset
    L, S, offset = shapes.L, shapes.S, shapes.S - shapes.L
    if L == 0:
        # (..., H, 0, D_v)
        return tf.zeros((*shapes.batch, shapes.H, 0, shapes.D_v), query.dtype)

    # t Q: (..., H_kv, G, L, D)
    q = _grouped_query(tf.cast(query, work), shapes) * tf.constant(scale, work)
    k = tf.cast(key, work)[..., None, :, :]  # (..., H_kv, 1, S, D)
    v = tf.cast(value, work)[..., None, :, :]  # (..., H_kv, 1, S, D_v)
    grouped, boolean = (
        _grouped_mask(mask, shapes, work) if mask is not None else (None, True)
    )
    out_lead = (*shapes.batch, shapes.H_kv, shapes.group)  # (..., H_kv, G)
    minus_inf = tf.constant(-math.inf, work)

    output_blocks = []
    for r0 in range(0, L, block_q):
        r1 = min(r0 + block_q, L)
        q_i = q[..., r0:r1, :]  # (..., H_kv, G, bq, D)
        # running row max: (..., H_kv, G, bq, 1)
        m = tf.fill((*out_lead, r1 - r0, 1), minus_inf)
        # running normaliser: (..., H_kv, G, bq, 1)
        l = tf.zeros((*out_lead, r1 - r0, 1), work)
        # O~: (..., H_kv, G, bq, D_v)
        acc = tf.zeros((*out_lead, r1 - r0, shapes.D_v), work)
        # the last key any row of this block sees
        last_visible = r1 - 1 + offset if causal else S - 1
        # causal: later key blocks are skipped
        for c0 in range(0, min(S, last_visible + 1), block_k):
            c1 = min(c0 + block_k, S)
            # S_ij: (..., H_kv, G, bq, bk)
            s_ij = tf.linalg.matmul(q_i, k[..., c0:c1, :], transpose_b=True)
            if grouped is not None:
                # + M_ij
                s_ij = _apply_mask(
                    s_ij, _block_of(grouped, slice(r0, r1), slice(c0, c1)), boolean
                )
            if causal and c1 - 1 > r0 + offset:  # the block straddles the diagonal
                rows = tf.range(r0, r1)[:, None]  # (bq, 1)
                cols = tf.range(c0, c1)[None, :]  # (1, bk)
                # (..., H_kv, G, bq, bk)
                s_ij = _apply_mask(s_ij, cols <= rows + offset, True)
            # m' = max(m, rowmax S_ij)
            m_new = tf.maximum(m, tf.reduce_max(s_ij, axis=-1, keepdims=True))
            # -inf -> 0 inside exp
            m_safe = tf.where(m_new == minus_inf, tf.zeros_like(m_new), m_new)
            # P~ = exp(S_ij - m'): (..., H_kv, G, bq, bk)
            p_tilde = tf.exp(s_ij - m_safe)
            correction = tf.exp(m - m_safe)  # c = exp(m - m')
            # l = c l + rowsum P~
            l = correction * l + tf.reduce_sum(p_tilde, axis=-1, keepdims=True)
            # O~ = c O~ + P~ V_j
            acc = correction * acc + tf.linalg.matmul(p_tilde, v[..., c0:c1, :])
            m = m_new
        # O_i = O~ / l, 0 where l = 0
        output_blocks.append(tf.math.divide_no_nan(acc, l))
    output = tf.concat(output_blocks, axis=-2)  # (..., H_kv, G, L, D_v)
    # (..., H, L, D_v)
    return tf.cast(
        tf.reshape(output, (*shapes.batch, shapes.H, L, shapes.D_v)), query.dtype
    )
