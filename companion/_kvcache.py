"""What the backends' ``KVCache`` classes share: growth by doubling, checks, views.

Each backend subclasses :class:`KVCacheBase` and supplies four storage operations for
its own tensors (``_convert``, ``_empty``, ``_write``, ``_view``); the logic of
appending, growing and validating is written once, here.
"""

from __future__ import annotations

from companion import _checks
from companion._tiling import check_window

__all__ = ["KVCacheBase", "unchanged_on_error"]


class KVCacheBase:
    """Keys ``(B, H_kv, S, D)`` and values ``(B, H_kv, S, D_v)`` of the positions seen.

    :meth:`append` writes new positions into preallocated storage whose capacity along
    ``S`` doubles when it is full: appending ``n`` positions one at a time copies
    ``O(n)`` elements in all (amortised ``O(1)`` per position), not the ``O(n^2)`` of
    re-concatenating the cache at every step.

    A rolling cache, ``max_length=W``, keeps only the last ``W`` positions: all that
    sliding-window attention with window ``W`` can still see (Mistral 7B). Its storage
    stays ``O(W)`` however long the sequence; :attr:`seen` keeps counting, so positions
    (for a rotary embedding) stay absolute. When the storage is full, the positions
    still needed move to the front of a fresh buffer (``O(W)`` copied every ``~W``
    appends, so still amortised ``O(1)``); views returned earlier are never overwritten.
    Its capacity grows by doubling too, up to ``2 W``: a huge ``max_length`` reserves
    only what the positions appended so far need.

    A failed call leaves the cache as it was: :meth:`append` checks its inputs before
    it changes anything, and the attention functions that append and then fail (a
    mask of the wrong shape, say) put the cache back (:func:`unchanged_on_error`).
    """

    MIN_CAPACITY = 16

    def __init__(self, max_length: int | None = None):
        if max_length is not None:
            max_length = _checks.check_int("max_length", max_length)
        self._max_length = max_length
        self._key = None  # (B, H_kv, capacity, D)
        self._value = None  # (B, H_kv, capacity, D_v)
        # the kept positions are storage[:, :, _start:_start + _length]
        self._start = 0
        self._length = 0
        # positions ever appended (== _length unless a cache drops some)
        self._seen = 0

    # --- what a backend supplies ---------------------------------------------------
    def _convert(self, name: str, x):
        """``x`` as this backend's tensor (or a ``TypeError``)."""
        raise NotImplementedError

    def _empty(self, like, capacity: int):
        """Storage like ``like`` ``(B, H_kv, ., dim)``, ``capacity`` long along S."""
        raise NotImplementedError

    def _write(self, storage, start: int, stop: int, x) -> None:
        """``storage[:, :, start:stop] = x``."""
        raise NotImplementedError

    def _view(self, storage, length: int):
        """``storage[:, :, :length]``, without copying."""
        raise NotImplementedError

    def _check_compatible(self, key) -> None:
        """Backend-specific checks against the stored tensors (e.g. the device)."""

    def _slice(self, storage, start: int, stop: int):
        """``storage[:, :, start:stop]``, without copying."""
        return self._view(storage, stop)[:, :, start:]

    # --- shared --------------------------------------------------------------------
    @property
    def max_length(self) -> int | None:
        """``W`` for a rolling cache (keeps the last ``W`` positions), else ``None``."""
        return self._max_length

    @property
    def length(self) -> int:
        """``S``, the number of cached positions (at most :attr:`max_length`)."""
        return self._length

    @property
    def seen(self) -> int:
        """Positions ever appended, which is the absolute position of the next token.

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
        if self._key is None:
            return None
        return self._slice(self._key, self._start, self._start + self._length)

    @property
    def value(self):
        """Cached values ``(B, H_kv, S, D_v)`` (``None`` before the first append)."""
        if self._value is None:
            return None
        return self._slice(self._value, self._start, self._start + self._length)

    def _state(self) -> tuple:
        """What :meth:`_restore` needs to undo the appends made after this call.

        Appends never overwrite the kept positions (they write after them, or into a
        fresh buffer), so the storage references and the counters are the whole
        state."""
        return (self._key, self._value, self._start, self._length, self._seen)

    def _restore(self, state: tuple) -> None:
        self._key, self._value, self._start, self._length, self._seen = state

    def reset(self) -> None:
        """Forget everything and release the storage."""
        self._key = self._value = None
        self._start = self._length = 0
        self._seen = 0

    def append(self, key, value):
        """Append ``key (B, H_kv, S_new, D)``, ``value (B, H_kv, S_new, D_v)``; return
        keys and values for attention.

        A cache that keeps everything returns all cached positions. A rolling cache
        (``max_length=W``) returns the last ``W - 1`` positions before the new ones and
        the ``S_new`` new ones: exactly what the new queries can see through a window
        of ``W`` (with ``S_new = 1``, the window itself); it keeps the last ``W``.
        """
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
        # [book: cache append]
        new = int(key.shape[2])
        W = self._max_length
        # positions the new queries can still see: [first, stop) of the storage
        stop = self._start + self._length
        first = self._start if W is None else max(self._start, stop - (W - 1))
        if self._key is None or stop + new > self.capacity:
            # (an empty first append still fixes the shapes and the dtype)
            first, stop = self._grow(first, stop, new, key, value)
        # (B, H_kv, S_new, D): only the new positions are written
        self._write(self._key, stop, stop + new, key)
        self._write(self._value, stop, stop + new, value)  # (B, H_kv, S_new, D_v)
        stop += new
        self._seen += new
        # keep the last W (an empty append drops nothing)
        self._start = self._start if W is None else max(self._start, stop - W)
        self._length = stop - self._start
        # (B, H_kv, S, D), (B, H_kv, S, D_v)
        return (
            self._slice(self._key, first, stop),
            self._slice(self._value, first, stop),
        )
        # [/book: cache append]

    def _grow(self, first: int, stop: int, new: int, key, value) -> tuple[int, int]:
        """A fresh buffer holding positions ``[first, stop)`` at its front, with room
        for ``new`` more; returns their new ``(first, stop)``."""
        kept = stop - first
        # doubling: amortised O(1) per position
        doubled = 2 * self.capacity
        if self._max_length is not None:
            # up to room for W more positions before the next move (still amortised
            # O(1)); never more than the positions seen need, however large W is
            doubled = min(doubled, 2 * self._max_length)
        capacity = max(kept + new, doubled, self.MIN_CAPACITY)
        new_key = self._empty(key, capacity)  # (B, H_kv, capacity, D)
        new_value = self._empty(value, capacity)  # (B, H_kv, capacity, D_v)
        if kept:
            self._write(new_key, 0, kept, self._slice(self._key, first, stop))
            self._write(new_value, 0, kept, self._slice(self._value, first, stop))
        self._key, self._value = new_key, new_value
        self._start = 0
        return 0, kept


def _numel(shape) -> int:
    n = 1
    for size in tuple(shape):
        n *= int(size)
    return n


def _itemsize(dtype) -> int:
    """Bytes per element of a numpy, torch (``itemsize``) or TensorFlow (``size``)
    dtype."""
    size = getattr(dtype, "itemsize", None)
    return int(size if size is not None else dtype.size)


class unchanged_on_error:  # lower case: used like a function in a with
    """Put every cache given (``None`` skipped) back as it was if the body raises.

    For the attention functions: they append the new keys and values before the
    kernel checks the mask against every cached position, so an error there would
    otherwise leave positions in the cache that the caller never got outputs for.
    A class rather than a generator: it runs once per decoded token, and this costs
    about half as much per ``with``.
    """

    __slots__ = ("_saved",)

    def __init__(self, *caches):
        self._saved = [(cache, cache._state()) for cache in caches if cache is not None]

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if kind is not None:
            for cache, state in self._saved:
                cache._restore(state)
        return False  # the error goes on


def check_some_keys(name: str, new: int, cache) -> None:
    """Attention needs at least one key: ``new`` positions from ``name`` and none
    cached is a ``ValueError`` naming ``name`` (checked before the cache changes;
    the caller has refused any other kind of cache)."""
    if new == 0 and (cache is None or cache.length == 0):
        held = "no cache" if cache is None else "an empty cache"
        raise ValueError(
            f"{name} has no positions and there is {held}: attention needs at least "
            "one key"
        )


def window_for_cache(window, cache) -> int | None:
    """The attention window to use with ``cache``; checked before the cache changes.

    A rolling cache (``max_length=W``) has dropped what lies further back than ``W``
    positions, so it needs a window of at most ``W``, and ``W`` is the default; any
    other cache (or none) leaves ``window`` as given.
    """
    checked = check_window(window)  # as the kernels check it
    W = getattr(cache, "max_length", None)
    if W is None:
        return checked
    if checked is None:
        return W
    if isinstance(checked, tuple):  # (left, right): it looks back `left` positions
        if checked[0] is None or checked[0] >= W:
            raise ValueError(
                f"window={window} looks further back than the rolling cache holds "
                f"(max_length={W}): its left side must be at most {W - 1}"
            )
        return checked
    if checked > W:
        raise ValueError(
            f"window={window} is wider than the rolling cache (max_length={W}): the "
            "cache no longer holds positions such a window would see"
        )
    return checked
