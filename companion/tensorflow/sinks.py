r"""Attention sinks (StreamingLLM) in TensorFlow: see :mod:`companion.numpy.sinks`."""

from __future__ import annotations

import math

import tensorflow as tf

from companion import _checks, _positions, _sinks
from companion.tensorflow.multihead import KVCache

__all__ = ["SinkCache", "sink_mask", "attention_with_sinks"]


def _positions_tensor(name: str, positions) -> tf.Tensor:
    _positions.check_position_values(positions)
    positions = tf.convert_to_tensor(positions)
    name_ = _checks.dtype_name(positions.dtype)
    if positions.shape.rank != 1 or not name_.startswith(("int", "uint")):
        raise ValueError(
            f"{name} must be a vector of integer positions, got shape "
            f"{tuple(positions.shape)} and dtype {name_}"
        )
    return tf.cast(positions, tf.int64)


def sink_mask(query_positions, key_positions, *, sinks: int, window: int):
    r"""Bool ``(L, S)``, True = attend: key ``p <= q`` with ``p < sinks`` or
    ``q - p < window``. See :func:`companion.numpy.sink_mask`."""
    sinks, window = _sinks.check_sinks(sinks, window)
    q = _positions_tensor("query_positions", query_positions)[:, None]  # (L, 1)
    p = _positions_tensor("key_positions", key_positions)[None, :]  # (1, S)
    return _sinks.sink_rule(q, p, sinks, window)  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, TensorFlow tensors.

    See :class:`companion._sinks.SinkCacheBase`."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return tf.concat([a, b], axis=2)

    def _integers(self, values, like):
        return tf.constant(values, dtype=tf.int64, shape=[len(values)])


def attention_with_sinks(
    query,
    key,
    value,
    sinks,
    *,
    mask=None,
    causal: bool = False,
    scale=None,
    window=None,
):
    r"""Attention with a learned sink logit per head in the softmax's denominator
    (GPT-OSS): ``w = e^s / (e^sink_h + sum e^s)``. See
    :func:`companion.numpy.attention_with_sinks`; the same math is the ``sinks=``
    option of :func:`companion.tensorflow.multi_head_attention`."""
    tensors = [tf.convert_to_tensor(t) for t in (query, key, value, sinks)]
    names = [
        _checks.check_float(n, t.dtype)
        for n, t in zip(("query", "key", "value", "sinks"), tensors)
    ]
    q, k, v, s = tensors
    group = _sinks.check_sink_attention(q.shape, k.shape, v.shape, s.shape)
    dtype = tf.float64 if "float64" in names[:3] else tf.float32
    weights = _sink_weights(
        tf.cast(q, dtype),
        tf.cast(k, dtype),
        s,
        mask=mask,
        causal=causal,
        scale=scale,
        window=window,
    )
    v = tf.repeat(tf.cast(v, dtype), group, axis=-3)  # (..., H, S, D_v)
    return tf.cast(tf.matmul(weights, v), q.dtype)  # (..., H, L, D_v)


def _sink_weights(q, k, s, *, mask, causal, scale, window=None):
    """The weights ``(..., H, L, S)`` of :func:`attention_with_sinks`, the sink's share
    dropped, for checked ``q`` and ``k`` of one float dtype (the compute dtype)."""
    from companion import _tiling
    from companion.tensorflow.attention import _band

    dtype = q.dtype
    group = int(q.shape[-3]) // int(k.shape[-3])
    window = _tiling.check_window(window)
    scale = 1.0 / math.sqrt(int(q.shape[-1])) if scale is None else float(scale)
    k = tf.repeat(k, group, axis=-3)  # (..., H, S, D)
    scores = scale * tf.matmul(q, k, transpose_b=True)  # (..., H, L, S)
    L, S = int(scores.shape[-2]), int(scores.shape[-1])
    minus_inf = tf.constant(float("-inf"), dtype)
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        _sinks.check_mask(mask.shape, scores.shape)
        if mask.dtype == tf.bool:
            scores = tf.where(mask, scores, minus_inf)
        else:
            scores = scores + tf.cast(mask, dtype)
    causal = _positions.check_interleaved_like("causal", causal)
    if causal or window is not None:
        # bottom-right causal and/or the window's band: (L, S)
        scores = tf.where(_band(0, L, 0, S, L, S, causal, window), scores, minus_inf)
    sink = tf.broadcast_to(
        tf.cast(s, dtype)[:, None, None], [*scores.shape[:-1], 1]
    )  # (..., H, L, 1)
    logits = tf.concat([scores, sink], axis=-1)  # (..., H, L, S + 1)
    # shift by the row's largest logit; a row that sees no key and whose sink is -inf
    # has none finite: shift by 0 and divide by 1, so its weights are exactly 0
    peak = tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True))
    peak = tf.where(tf.math.is_finite(peak), peak, tf.zeros_like(peak))
    weights = tf.exp(logits - peak)
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    weights = weights / tf.where(total > 0, total, tf.ones_like(total))
    return weights[..., :-1]  # (..., H, L, S): the sink's share dropped
