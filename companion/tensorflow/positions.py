r"""Position information for attention in TensorFlow: sinusoidal, rotary (RoPE), ALiBi.

The same functions as :mod:`companion.numpy.positions` (the float64 oracle), for
TensorFlow tensors, eager or inside ``tf.function`` (static shapes). Default dtype
float32; everything is computed in float64 and cast once.

Explained in the book chapter *Positions and the transformer block*.
"""

from __future__ import annotations

import tensorflow as tf

from companion import _checks, _positions
from companion._positions import RopeScaling, RotaryConfig

__all__ = [
    "sinusoidal_positions",
    "rotary_embedding",
    "rotary_frequencies",
    "alibi_slopes",
    "alibi_bias",
    "t5_position_buckets",
    "t5_bias",
    "RotaryConfig",
    "RopeScaling",
]

_HALF = ("float16", "bfloat16")


def _output_dtype(dtype):
    dtype = tf.float32 if dtype is None else tf.as_dtype(dtype)
    _checks.check_float("dtype", dtype)
    return dtype


def sinusoidal_positions(length: int, dim: int, *, base: float = 10000.0, dtype=None):
    r"""Vaswani et al.'s table ``(length, dim)``, interleaved.

    ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.
    See :func:`companion.numpy.sinusoidal_positions`.
    """
    length = _positions.check_length("length", length, 0)
    dim = _positions.check_length("dim", dim, 1)
    base = _positions.check_base(base)
    dtype = _output_dtype(dtype)
    column = tf.range(dim)  # (dim,)
    exponent = tf.cast(-2 * (column // 2), tf.float64) / dim  # (dim,)
    frequency = tf.pow(tf.constant(base, tf.float64), exponent)  # (dim,)
    # (length, dim)
    angle = tf.cast(tf.range(length), tf.float64)[:, None] * frequency[None, :]
    even = tf.broadcast_to(column % 2 == 0, tf.shape(angle))  # (length, dim)
    table = tf.where(even, tf.sin(angle), tf.cos(angle))  # (length, dim)
    return tf.cast(table, dtype)


def rotary_embedding(
    x,
    positions,
    *,
    base: float = 10000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    scaling=None,
    seq_len: int | None = None,
):
    r"""Rotate pairs of features of ``x (..., L, D)`` by ``p * base^(-2i/d)``.

    ``interleaved=False`` pairs ``i`` with ``i + d/2`` (GPT-NeoX, HF Llama); ``True``
    pairs ``2i`` with ``2i + 1`` (RoFormer, GPT-J, Meta's Llama); ``rotary_dim``
    rotates only the first ``d`` features; ``scaling`` (a :class:`RopeScaling` or a
    dict) stretches it for texts longer than training (``seq_len``: the text's length
    for dynamic NTK and LongRoPE, default the largest position + 1, which inside a
    ``tf.function`` must be known when tracing). See
    :func:`companion.numpy.rotary_embedding`.
    """
    x = tf.convert_to_tensor(x)
    name = _checks.check_float("x", x.dtype)
    D, d = _positions.rotary_dims(x.shape, rotary_dim)
    _positions.check_position_values(positions)
    positions = tf.convert_to_tensor(positions)
    _positions.check_positions(
        positions.shape, _checks.dtype_name(positions.dtype), x.shape
    )
    base = _positions.check_base(base)
    interleaved = _positions.check_interleaved(interleaved)
    dtype = tf.float32 if name in _HALF else x.dtype
    scaling, factor = _positions.as_scaling(scaling), 1.0
    if scaling is None:
        exponent = -2.0 * tf.range(d // 2, dtype=tf.float64) / d  # (d/2,)
        theta = tf.pow(tf.constant(base, tf.float64), exponent)  # (d/2,)
    else:
        if seq_len is None and _positions.needs_length(scaling):
            seq_len = _largest_position(positions)
        theta, factor = _positions.scaled_frequencies(base, d, scaling, seq_len)
        theta = tf.constant(theta, tf.float64)  # (d/2,)
    # (..., L, d/2): p theta_i
    angle = tf.cast(positions, tf.float64)[..., None] * theta
    cos, sin = tf.cast(tf.cos(angle), dtype), tf.cast(tf.sin(angle), dtype)
    xc = tf.cast(x, dtype)
    if interleaved:
        x_a, x_b = xc[..., 0:d:2], xc[..., 1:d:2]  # (..., L, d/2) each
    else:
        x_a, x_b = xc[..., : d // 2], xc[..., d // 2 : d]  # (..., L, d/2) each
    y_a = x_a * cos - x_b * sin  # (..., L, d/2): Re(z e^{i p theta})
    y_b = x_b * cos + x_a * sin  # (..., L, d/2): Im(z e^{i p theta})
    if interleaved:
        stacked = tf.stack([y_a, y_b], axis=-1)  # (..., L, d/2, 2)
        rotated = tf.reshape(stacked, [*y_a.shape[:-1], d])  # (..., L, d)
    else:
        rotated = tf.concat([y_a, y_b], axis=-1)  # (..., L, d)
    if factor != 1.0:  # YaRN's and LongRoPE's attention factor: rotated features
        rotated = rotated * factor
    out = tf.concat([rotated, xc[..., d:]], axis=-1)  # (..., L, D)
    return tf.cast(out, x.dtype)


def _largest_position(positions) -> int | None:
    """The largest position + 1 (``None`` for no positions); ``ValueError`` when a
    ``tf.function`` does not know it while tracing."""
    if positions.shape.num_elements() == 0:
        return None
    value = tf.get_static_value(tf.reduce_max(positions))
    if value is None:
        raise ValueError(
            "seq_len must be given for dynamic NTK and LongRoPE scaling inside a "
            "tf.function (the positions are not known while tracing)"
        )
    return int(value) + 1


def rotary_frequencies(
    dim: int,
    *,
    base: float = 10000.0,
    scaling=None,
    seq_len: int | None = None,
    dtype=None,
):
    r"""``(theta (dim/2,), attention_factor)``: the rotary frequencies, scaled by
    ``scaling`` as Hugging Face's ``ROPE_INIT_FUNCTIONS`` do (computed in float64).
    See :func:`companion.numpy.rotary_frequencies`."""
    dim, base, scaling = _positions.check_frequencies(dim, base, scaling)
    dtype = _output_dtype(dtype)
    if scaling is None:
        exponent = -2.0 * tf.range(dim // 2, dtype=tf.float64) / dim
        theta = tf.pow(tf.constant(base, tf.float64), exponent)
        return tf.cast(theta, dtype), 1.0
    theta, factor = _positions.scaled_frequencies(base, dim, scaling, seq_len)
    return tf.cast(tf.constant(theta, tf.float64), dtype), float(factor)


def alibi_slopes(num_heads: int, *, dtype=None):
    r"""ALiBi's slope per head ``(H,)``; ``2^-1 .. 2^-8`` for 8 heads.

    See :func:`companion.numpy.alibi_slopes`."""
    slopes = tf.constant(_positions.alibi_slope_list(num_heads), tf.float64)
    return tf.cast(slopes, _output_dtype(dtype))


def alibi_bias(num_heads: int, L: int, S: int, *, dtype=None):
    r"""ALiBi's float mask ``(H, L, S)``: ``-m_h |i + (S - L) - j|`` (bottom-right).

    See :func:`companion.numpy.alibi_bias`."""
    L = _positions.check_length("L", L, 0)
    S = _positions.check_length("S", S, 0)
    slopes = alibi_slopes(num_heads, dtype=tf.float64)  # (H,)
    query = tf.range(L, dtype=tf.float64)[:, None] + (S - L)  # (L, 1)
    distance = tf.abs(query - tf.range(S, dtype=tf.float64)[None, :])  # (L, S)
    bias = slopes[:, None, None] * (0.0 - distance)  # (H, L, S), never -0.0
    return tf.cast(bias, _output_dtype(dtype))


def _rotate_queries_and_keys(q, k, rope: RotaryConfig, start: int):
    """``q (B, H, L, D)`` and new ``k (B, H_kv, S_new, D)`` rotated where they sit.

    The keys sit at ``start`` (``cache.seen``) on, the queries are the last ``L`` of
    them (see :func:`companion._positions.rotary_positions`).
    """
    queries, keys = _positions.rotary_positions(q.shape[-2], k.shape[-2], start)
    kwargs = dict(
        base=rope.base, interleaved=rope.interleaved, rotary_dim=rope.rotary_dim
    )
    if rope.scaling is not None:  # the length so far: dynamic NTK and LongRoPE
        kwargs.update(scaling=rope.scaling, seq_len=keys.stop)
    q = rotary_embedding(
        q, tf.range(queries.start, queries.stop, dtype=tf.int64), **kwargs
    )
    k = rotary_embedding(k, tf.range(keys.start, keys.stop, dtype=tf.int64), **kwargs)
    return q, k  # (B, H, L, D), (B, H_kv, S_new, D)


def t5_position_buckets(
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
):
    r"""T5's bucket of each (query, key) pair: int64 ``(L, S)``, queries bottom-right
    aligned. See :func:`companion.numpy.t5_position_buckets`."""
    buckets = _positions.t5_position_buckets(
        L, S, bidirectional, num_buckets, max_distance
    )
    return tf.constant(buckets, dtype=tf.int64)  # (L, S)


def t5_bias(
    table,
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
):
    r"""T5's relative position bias ``(H, L, S)`` from ``table (num_buckets, H)``:
    computed once, the float ``mask`` of every layer; in the dtype of ``table``. See
    :func:`companion.numpy.t5_bias`."""
    table = tf.convert_to_tensor(table)
    _checks.check_float("table", table.dtype)
    buckets = tf.constant(
        _positions.t5_table_buckets(table.shape, L, S, bidirectional, max_distance),
        dtype=tf.int64,
    )  # (L, S)
    return tf.transpose(tf.gather(table, buckets), [2, 0, 1])  # (H, L, S)
