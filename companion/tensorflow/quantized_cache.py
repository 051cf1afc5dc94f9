"""Quantised KV caches for TensorFlow: the classes of
:mod:`companion.numpy.quantized_cache` for TensorFlow tensors (codes are
``tf.uint8``).

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import tensorflow as tf

from companion import _quantized_cache
from companion.tensorflow.multihead import KVCache

__all__ = ["QuantizedKVCache", "KIVICache"]

_DTYPES = {"int32": tf.int32, "uint8": tf.uint8}


class _Ops:
    @staticmethod
    def amin(x, axis):
        return tf.reduce_min(x, axis=axis, keepdims=True)

    @staticmethod
    def amax(x, axis):
        return tf.reduce_max(x, axis=axis, keepdims=True)

    abs = staticmethod(tf.abs)
    round = staticmethod(tf.round)  # half to even
    where = staticmethod(tf.where)

    @staticmethod
    def clip(x, lo, hi):
        return tf.clip_by_value(x, tf.cast(lo, x.dtype), tf.cast(hi, x.dtype))

    @staticmethod
    def cast(x, dtype):
        return tf.cast(x, _DTYPES[dtype] if isinstance(dtype, str) else dtype.dtype)

    @staticmethod
    def reshape(x, shape):
        return tf.reshape(x, shape)

    @staticmethod
    def concat(parts, axis):
        return tf.concat(parts, axis=axis)


class QuantizedKVCache(_quantized_cache.QuantizedCacheMixin, KVCache):
    """``bits``-bit codes with a scale (and zero point) per group, TensorFlow
    tensors; see :class:`companion.numpy.quantized_cache.QuantizedKVCache`."""

    _ops = _Ops


class KIVICache(QuantizedKVCache):
    """KIVI's layout, TensorFlow tensors; see
    :class:`companion.numpy.quantized_cache.KIVICache`."""

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128):
        super().__init__(
            bits, group_size, residual=residual, keys="channel", symmetric=False
        )
