r"""Attention sinks (StreamingLLM) in TensorFlow: see :mod:`companion.numpy.sinks`."""

from __future__ import annotations

import tensorflow as tf

from companion import _checks, _positions, _sinks
from companion.tensorflow.multihead import KVCache

__all__ = ["SinkCache", "sink_mask"]


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
    return (p <= q) & ((p < sinks) | (q - p < window))  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, TensorFlow tensors.

    See :class:`companion._sinks.SinkCacheBase`."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return tf.concat([a, b], axis=2)

    def _integers(self, values, like):
        return tf.constant(values, dtype=tf.int64, shape=[len(values)])
