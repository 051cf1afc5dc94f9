r"""Quantised KV caches in numpy: int8 per token, int4 per group, KIVI's layout.

:class:`QuantizedKVCache` stores keys and values as ``b``-bit codes with a scale (and
a zero point) per group; :class:`KIVICache` quantises keys per channel and values per
token and keeps the most recent positions in full precision (Liu et al. 2024). Both
are ``KVCache`` objects: :func:`companion.numpy.multihead.multi_head_attention` takes
them as ``cache=``. The formulas, the layout and the byte counts live in
:mod:`companion._quantized_cache`; these numpy versions are the oracle for the torch
and TensorFlow namespaces.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import numpy as np

from companion import _quantized_cache
from companion.numpy.multihead import KVCache

__all__ = ["QuantizedKVCache", "KIVICache"]


class _Ops:
    @staticmethod
    def amin(x, axis):
        return x.min(axis=axis, keepdims=True)

    @staticmethod
    def amax(x, axis):
        return x.max(axis=axis, keepdims=True)

    abs = staticmethod(np.abs)
    round = staticmethod(np.round)  # half to even, as torch and TensorFlow
    clip = staticmethod(np.clip)
    where = staticmethod(np.where)

    @staticmethod
    def cast(x, dtype):
        dtype = dtype if isinstance(dtype, str) else dtype.dtype
        return np.asarray(x).astype(dtype)

    @staticmethod
    def reshape(x, shape):
        return np.reshape(x, shape)

    @staticmethod
    def concat(parts, axis):
        return np.concatenate(parts, axis=axis)


class QuantizedKVCache(_quantized_cache.QuantizedCacheMixin, KVCache):
    r"""A KV cache of ``bits``-bit codes with a scale (and zero point) per group.

    ``QuantizedKVCache(8)``: int8 per token, symmetric (one scale per position and
    head: at 8 bits the error ``max|x| / 254`` is already small, and a zero point
    would add a number per group for little); ``QuantizedKVCache(4, group_size=32)``:
    int4 in groups of 32 channels, asymmetric (scale and zero point: at 4 bits the
    range matters). ``symmetric`` overrides the default (``bits == 8``);
    ``residual=R`` keeps the last ``R`` positions in full precision; ``keys="channel"``
    groups keys along positions (see :class:`KIVICache`). The formulas and their
    error bound are in :mod:`companion._quantized_cache`.
    """

    _ops = _Ops


class KIVICache(QuantizedKVCache):
    """KIVI (Liu et al. 2024): keys per channel and values per token, in groups of
    ``group_size``, asymmetric; the last ``residual`` positions in full precision
    (keys also until their group of ``group_size`` positions is complete). KIVI's own
    code quantises keys ``residual`` positions at a time instead, so that it holds
    ``n mod residual`` full-precision keys; this cache keeps one residual rule for keys
    and values."""

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128):
        super().__init__(
            bits, group_size, residual=residual, keys="channel", symmetric=False
        )
