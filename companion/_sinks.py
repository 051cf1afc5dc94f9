"""What the backends' attention-sink caches share (StreamingLLM, Xiao et al. 2023).

A :class:`SinkCacheBase` keeps the first ``sinks`` positions (the "attention sinks")
plus the last ``window`` positions, built from two of the backend's own ``KVCache``
objects (one that keeps everything, for the sinks, and a rolling one of
``max_length=window``), so the cache logic of :mod:`companion._kvcache` is used as it
is. Backend-free: each backend names its ``KVCache`` class and supplies a
concatenation and an integer vector.
"""

from __future__ import annotations

from companion import _checks
from companion._kvcache import unchanged_on_error

__all__ = [
    "check_sinks",
    "sink_rule",
    "SinkCacheBase",
    "check_sink_attention",
    "check_mask",
    "check_sink_logits",
    "choose_with_sinks",
]


def check_sinks(sinks, window) -> tuple[int, int]:
    """``(sinks, window)`` as ints, ``0 <= sinks <= window``, ``window >= 1``;
    ``ValueError`` naming the argument otherwise."""
    window = _checks.check_int("window", window, 1)
    sinks = _checks.check_int("sinks", sinks, 0)
    if sinks > window:
        raise ValueError(
            f"sinks ({sinks}) must not be larger than the window ({window})"
        )
    return sinks, window


def sink_rule(q, p, sinks: int, window: int):
    """``sink_mask``'s rule, for every backend's arrays: True where key position
    ``p`` (1, S) is visible from query position ``q`` (L, 1), i.e. ``p <= q`` and
    ``p`` is a sink (``p < sinks``) or in the window (``q - p < window``)."""
    return (p <= q) & ((p < sinks) | (q - p < window))  # (L, S)


class SinkCacheBase:
    r"""Keys and values of the first ``sinks`` positions and of the last ``window``.

    StreamingLLM's cache: softmax attention puts much of its weight on the first
    tokens whatever they say, so a window that drops them breaks down; keeping a few
    (four in the paper) lets a model trained on short texts decode indefinitely with
    ``O(sinks + window)`` memory.

    :meth:`append` takes ``key (B, H_kv, S_new, D)`` and ``value (B, H_kv, S_new,
    D_v)`` and returns what the new queries can see: the sinks, then the last
    ``window - 1`` positions before the new ones and the new ones (with ``S_new = 1``,
    the sinks and the window itself). :attr:`key_positions` gives the absolute
    position of each key returned, for the mask of
    :func:`companion.numpy.sinks.sink_mask` (query ``q`` sees key ``p <= q`` when
    ``p < sinks`` or ``q - p < window``).

    Positions for a rotary embedding: either absolute (rotate before appending, the
    cache then equals full attention under
    :func:`companion.numpy.sinks.sink_mask`), or, as the paper does, the key's slot
    in the cache: store unrotated keys and rotate the keys returned at
    ``0 .. S - 1`` and the queries at the last ``L`` slots
    (:attr:`slot_positions`), so that no distance exceeds what training saw.
    """

    _cache_class = None  # the backend's KVCache

    def __init__(self, sinks: int, window: int):
        self._sinks, self._window = check_sinks(sinks, window)
        self._first = self._cache_class()  # keeps everything; at most `sinks`
        self._recent = self._cache_class(max_length=self._window)
        self._returned = (range(0), range(0))  # positions of the last keys returned

    # --- what a backend supplies ---------------------------------------------------
    def _concat(self, a, b):
        """``a`` and ``b`` joined along S (axis 2)."""
        raise NotImplementedError

    def _slice_new(self, x, start: int, stop: int):
        """``x[:, :, start:stop]``."""
        return x[:, :, start:stop]

    def _integers(self, values: list[int], like):
        """``values`` as an int64 vector (on the device of ``like``)."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------
    @property
    def sinks(self) -> int:
        return self._sinks

    @property
    def window(self) -> int:
        return self._window

    @property
    def seen(self) -> int:
        """The number of positions ever appended, which is the absolute position of the
        next token."""
        return self._first.seen + self._recent.seen

    @property
    def length(self) -> int:
        """Positions kept, at most ``sinks + window``."""
        return self._first.length + self._recent.length

    @property
    def nbytes(self) -> int:
        return self._first.nbytes + self._recent.nbytes

    def _joined(self, a, b):
        if a is None:
            return b
        if b is None:
            return a
        return self._concat(a, b)

    @property
    def key(self):
        """Kept keys ``(B, H_kv, S, D)``: the sinks, then the last ``window``."""
        return self._joined(self._first.key, self._recent.key)

    @property
    def value(self):
        """Kept values ``(B, H_kv, S, D_v)``."""
        return self._joined(self._first.value, self._recent.value)

    @property
    def key_positions(self):
        """Absolute positions ``(S,)`` of the keys the last :meth:`append` returned."""
        first, recent = self._returned
        return self._integers([*first, *recent], self.key)

    @property
    def slot_positions(self):
        """Their slots ``0 .. S - 1``: the positions StreamingLLM rotates keys at."""
        first, recent = self._returned
        return self._integers(list(range(len(first) + len(recent))), self.key)

    def reset(self) -> None:
        self._first.reset()
        self._recent.reset()
        self._returned = (range(0), range(0))

    def append(self, key, value):
        """Append the new positions; return ``(key, value)`` the new queries can see."""
        new = int(key.shape[2])
        to_first = min(new, self._sinks - self._first.length)
        with unchanged_on_error(self._first, self._recent):
            if to_first > 0 or self._first.key is None:
                self._first.append(
                    self._slice_new(key, 0, to_first),
                    self._slice_new(value, 0, to_first),
                )
            if new > to_first or self._recent.key is None:
                k, v = self._recent.append(
                    self._slice_new(key, to_first, new),
                    self._slice_new(value, to_first, new),
                )
            else:
                k, v = self._recent.key, self._recent.value
        seen = self.seen
        first = range(self._first.length)
        recent = range(seen - int(k.shape[2]), seen) if k.shape[2] else range(0)
        self._returned = (first, recent)
        return self._joined(self._first.key, k), self._joined(self._first.value, v)


def check_sink_attention(q_shape, k_shape, v_shape, sinks_shape) -> int:
    """The group size ``H // H_kv`` for :func:`companion.numpy.attention_with_sinks`;
    ``ValueError`` naming the argument whose shape does not fit."""
    q, k, v, s = (
        tuple(int(n) for n in x) for x in (q_shape, k_shape, v_shape, sinks_shape)
    )
    if len(q) < 3 or len(k) != len(q) or len(v) != len(q):
        raise ValueError(
            "query, key and value must have shapes (..., H, L, D), (..., H_kv, S, D) "
            f"and (..., H_kv, S, D_v) of the same rank >= 3, got {q}, {k} and {v}"
        )
    if k[-1] != q[-1]:
        raise ValueError(f"key's D ({k[-1]}) must equal query's D ({q[-1]})")
    if v[-2] != k[-2] or v[-3] != k[-3]:
        raise ValueError(f"value's (H_kv, S) = {v[-3:-1]} must equal key's {k[-3:-1]}")
    H, H_kv = q[-3], k[-3]
    if H_kv < 1 or H % H_kv:
        raise ValueError(
            f"key's H_kv ({H_kv}) must divide query's H ({H}) (grouped-query heads)"
        )
    if s != (H,):
        raise ValueError(f"sinks must have shape (H,) = ({H},), got {s}")
    return H // H_kv


def check_mask(mask_shape, scores_shape) -> None:
    """``ValueError`` naming ``mask`` unless it broadcasts to ``(..., H, L, S)``."""
    target = tuple(int(n) for n in scores_shape)
    try:
        result = _checks.broadcast_shape(tuple(int(n) for n in mask_shape), target)
    except ValueError:
        result = None
    if result != target:
        raise ValueError(
            f"mask of shape {tuple(mask_shape)} does not broadcast to the scores' "
            f"(..., H, L, S) = {target}"
        )


def check_sink_logits(sinks_shape, num_heads: int) -> None:
    """``ValueError`` naming ``sinks`` unless it is one logit per query head,
    ``(H,)``."""
    shape = tuple(int(n) for n in sinks_shape)
    if shape != (int(num_heads),):
        raise ValueError(
            f"sinks must have shape (H,) = ({num_heads},), one logit per query head, "
            f"got {shape}"
        )


def choose_with_sinks(implementation) -> str | None:
    """With learned sink logits, only the reference path forms the softmax whose
    denominator they join: ``"auto"`` takes it (returns ``"reference"``), the fused
    paths (``"tiled"``, ``"sdpa"``) are a ``ValueError`` naming ``sinks``; any other
    value is returned as it is for the backend's own check."""
    if isinstance(implementation, str) and implementation in ("tiled", "sdpa"):
        raise ValueError(
            "sinks add one logit per head to the softmax's denominator, and "
            f"implementation={implementation!r} never forms that softmax: use "
            "implementation='reference' or 'auto' (which then computes the reference)"
        )
    if isinstance(implementation, str) and implementation == "auto":
        return "reference"
    return implementation
