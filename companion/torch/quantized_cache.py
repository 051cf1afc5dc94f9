"""Quantised KV caches for torch: the classes of :mod:`companion.numpy.quantized_cache`
for torch tensors (on any device; codes are ``torch.uint8``).

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import torch

from companion import _quantized_cache
from companion.torch.multihead import KVCache

__all__ = ["QuantizedKVCache", "KIVICache"]

_DTYPES = {"int32": torch.int32, "uint8": torch.uint8}


class _Ops:
    @staticmethod
    def amin(x, axis):
        return x.amin(dim=axis, keepdim=True)

    @staticmethod
    def amax(x, axis):
        return x.amax(dim=axis, keepdim=True)

    abs = staticmethod(torch.abs)
    round = staticmethod(torch.round)  # half to even
    clip = staticmethod(torch.clamp)
    where = staticmethod(torch.where)

    @staticmethod
    def cast(x, dtype):
        return x.to(_DTYPES[dtype] if isinstance(dtype, str) else dtype.dtype)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def concat(parts, axis):
        return torch.cat(parts, dim=axis)


class QuantizedKVCache(_quantized_cache.QuantizedCacheMixin, KVCache):
    """``bits``-bit codes with a scale (and zero point) per group, torch tensors; see
    :class:`companion.numpy.quantized_cache.QuantizedKVCache`. Meant for inference
    (``torch.no_grad``)."""

    _ops = _Ops

    def _check_stored(self, key) -> None:
        if key.device != self._fkey.device:
            raise ValueError(
                f"key is on {key.device}, the cache on {self._fkey.device}"
            )


class KIVICache(QuantizedKVCache):
    """KIVI's layout, torch tensors; see
    :class:`companion.numpy.quantized_cache.KIVICache`."""

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128):
        super().__init__(
            bits, group_size, residual=residual, keys="channel", symmetric=False
        )
