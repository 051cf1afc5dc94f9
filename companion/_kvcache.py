"""What the three backends' ``KVCache`` classes share: growth by doubling, checks, views.

Each backend subclasses :class:`KVCacheBase` and supplies four storage operations for its
own tensors (``_convert``, ``_empty``, ``_write``, ``_view``); the logic of appending,
growing and validating is written once, here.
"""

from __future__ import annotations

from companion import _checks

__all__ = ["KVCacheBase"]


class KVCacheBase:
    """Keys ``(B, H_kv, S, D)`` and values ``(B, H_kv, S, D_v)`` of the positions seen so far.

    :meth:`append` writes new positions into preallocated storage whose capacity along
    ``S`` doubles when it is full: appending ``n`` positions one at a time copies ``O(n)``
    elements in all (amortised ``O(1)`` per position), not the ``O(n^2)`` of
    re-concatenating the cache at every step.
    """

    MIN_CAPACITY = 16

    def __init__(self):
        self._key = None  # (B, H_kv, capacity, D)
        self._value = None  # (B, H_kv, capacity, D_v)
        self._length = 0
        # positions ever appended (== _length unless a cache drops some)
        self._seen = 0

    # --- what a backend supplies --------------------------------------------------------
    def _convert(self, name: str, x):
        """``x`` as this backend's tensor (or a ``TypeError``)."""
        raise NotImplementedError

    def _empty(self, like, capacity: int):
        """Storage shaped like ``like`` ``(B, H_kv, ., dim)`` but ``capacity`` long along S."""
        raise NotImplementedError

    def _write(self, storage, start: int, stop: int, x) -> None:
        """``storage[:, :, start:stop] = x``."""
        raise NotImplementedError

    def _view(self, storage, length: int):
        """``storage[:, :, :length]``, without copying."""
        raise NotImplementedError

    def _check_compatible(self, key) -> None:
        """Backend-specific checks against the stored tensors (e.g. the device)."""

    # --- shared -------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """``S``, the number of cached positions."""
        return self._length

    @property
    def seen(self) -> int:
        """Positions ever appended: the absolute position of the next token.

        Equals :attr:`length` for a cache that keeps everything; a cache that drops old
        positions (a rolling window) keeps counting, so positions stay absolute.
        """
        return self._seen

    @property
    def capacity(self) -> int:
        """Positions the current storage can hold before it grows."""
        return 0 if self._key is None else int(self._key.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes of storage held (the capacity, not only the filled part)."""
        if self._key is None:
            return 0
        itemsize = _itemsize(self._key.dtype)
        return itemsize * (_numel(self._key.shape) + _numel(self._value.shape))

    @property
    def key(self):
        """Cached keys ``(B, H_kv, S, D)`` (``None`` before the first append)."""
        return None if self._key is None else self._view(self._key, self._length)

    @property
    def value(self):
        """Cached values ``(B, H_kv, S, D_v)`` (``None`` before the first append)."""
        return None if self._value is None else self._view(self._value, self._length)

    def reset(self) -> None:
        """Forget everything and release the storage."""
        self._key = self._value = None
        self._length = 0
        self._seen = 0

    def append(self, key, value):
        """Append ``key (B, H_kv, S_new, D)`` and ``value (B, H_kv, S_new, D_v)``; return all cached."""
        key, value = self._convert("key", key), self._convert("value", value)
        stored = (
            (None, None, None)
            if self._key is None
            else (self._key.shape, self._value.shape, self._key.dtype)
        )
        _checks.check_cache_append(
            key.shape, value.shape, key.dtype, value.dtype, *stored
        )
        if self._key is not None:
            self._check_compatible(key)
        start, stop = self._length, self._length + int(key.shape[2])
        if stop > self.capacity:
            self._grow(stop, key, value)
        # (B, H_kv, S_new, D): only the new positions are written
        self._write(self._key, start, stop, key)
        self._write(self._value, start, stop, value)  # (B, H_kv, S_new, D_v)
        self._length = stop
        self._seen += stop - start
        return self.key, self.value  # (B, H_kv, S, D), (B, H_kv, S, D_v)

    def _grow(self, needed: int, key, value) -> None:
        # doubling: amortised O(1) per position
        capacity = max(needed, 2 * self.capacity, self.MIN_CAPACITY)
        new_key = self._empty(key, capacity)  # (B, H_kv, capacity, D)
        new_value = self._empty(value, capacity)  # (B, H_kv, capacity, D_v)
        if self._length:
            self._write(new_key, 0, self._length, self.key)
            self._write(new_value, 0, self._length, self.value)
        self._key, self._value = new_key, new_value


def _numel(shape) -> int:
    n = 1
    for size in tuple(shape):
        n *= int(size)
    return n


def _itemsize(dtype) -> int:
    """Bytes per element of a numpy, torch (``itemsize``) or TensorFlow (``size``) dtype."""
    size = getattr(dtype, "itemsize", None)
    return int(size if size is not None else dtype.size)
