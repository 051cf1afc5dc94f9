r"""What the backends' quantised KV caches share: the formulas, the layout, the bytes.

A quantised cache stores each group of ``G`` numbers as ``b``-bit integer codes plus
one scale (symmetric) or a scale and a zero point (asymmetric), in the dtype of the
keys:

.. code-block:: text

    asymmetric  s = (max - min) / (2^b - 1)    z = min
                q = clip(round((x - z) / s), 0, 2^b - 1)          x^ = q s + z
                |x - x^| <= s / 2
    symmetric   s = max|x| / (2^(b-1) - 1)     (no zero point)
                q = clip(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)  x^ = q s
                |x - x^| <= s / 2

(up to the rounding of ``s`` and ``z`` to the stored dtype). A group whose numbers
are all equal gets ``s = 0`` and is stored exactly. Codes are packed ``8 / b`` to a
byte along the head dimension, so a cache of ``n`` positions holds, per key/value
head, exactly :func:`cache_nbytes` bytes: codes, scales, zero points and the
full-precision recent positions, all counted.

Two layouts (Liu et al. 2024, KIVI):

* ``"token"``: each position's ``D`` numbers in ``D / G`` groups of ``G`` channels
  (``G = D``: one group per position, "per token");
* ``"channel"``: each channel's numbers in groups of ``G`` consecutive positions
  (keys have a few channels of large magnitude; grouping along the channel keeps
  their range out of the other channels' groups). A group can only be quantised
  once its ``G`` positions are there.

The last ``residual`` positions are kept in full precision; keys in the
``"channel"`` layout also keep the positions of the group not yet complete: of ``n``
positions, :func:`quantized_counts` gives how many are quantised. Backend-free:
each backend supplies its tensor operations (:class:`QuantizedCacheMixin`).
"""

from __future__ import annotations

from companion import _checks

__all__ = [
    "BITS",
    "LAYOUTS",
    "check_bits",
    "check_group_size",
    "check_residual",
    "levels",
    "quantized_counts",
    "bytes_per_token",
    "cache_nbytes",
    "QuantizedCacheMixin",
]

#: The code widths a quantised cache accepts (codes pack evenly into bytes).
BITS = (2, 4, 8)
LAYOUTS = ("token", "channel")


def check_bits(bits) -> int:
    """``bits`` in :data:`BITS` (codes pack evenly into bytes); ``ValueError``
    otherwise."""
    if isinstance(bits, bool) or not hasattr(bits, "__index__") or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return int(bits)


def check_group_size(group_size) -> int | None:
    """``None`` (one group per head dimension) or a positive int."""
    if group_size is None:
        return None
    return _checks.check_int("group_size", group_size, 1)


def check_residual(residual) -> int:
    """The number of recent positions kept in full precision, ``>= 0``."""
    return _checks.check_int("residual", residual, 0)


def check_layout(name: str, layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_dims(
    key_dim: int, value_dim: int, bits: int, group_size, keys: str
) -> tuple[int, int]:
    """The groups' sizes along D for keys and values; ``ValueError`` naming
    ``group_size`` when it does not divide a head dimension it groups, and naming
    ``key``/``value`` when a head dimension does not pack into whole bytes."""
    per_byte = 8 // bits
    for name, dim in (("key", key_dim), ("value", value_dim)):
        if dim % per_byte:
            raise ValueError(
                f"{name}'s head dimension ({dim}) must be a multiple of {per_byte} "
                f"to pack {bits}-bit codes {per_byte} to a byte"
            )
    grouped = [("value", value_dim)] + ([("key", key_dim)] if keys == "token" else [])
    for name, dim in grouped:
        if group_size is not None and dim % group_size:
            raise ValueError(
                f"group_size ({group_size}) must divide {name}'s head dimension ({dim})"
            )
    return (
        key_dim if group_size is None else group_size,
        value_dim if group_size is None else group_size,
    )


def levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """The smallest and largest code: ``(-(2^(b-1) - 1), 2^(b-1) - 1)`` symmetric,
    ``(0, 2^b - 1)`` asymmetric."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def quantized_counts(
    n: int, *, residual: int, group_size: int | None, keys: str
) -> tuple[int, int]:
    """Of ``n`` positions, how many keys and how many values are quantised.

    Values: all but the last ``residual``. Keys in the ``"token"`` layout: the same;
    in the ``"channel"`` layout: the complete groups of ``G`` positions among them
    (KIVI keeps the key residual until it fills a group)."""
    values = max(0, n - residual)
    if keys == "token":
        return values, values
    return group_size * (values // group_size), values


def bytes_per_token(
    dim: int, *, bits: int, group_size: int | None, symmetric: bool, itemsize: int
):
    """Bytes one quantised position of one head holds, scales and zero points
    included: ``D b / 8 + (D / G)(1 or 2) itemsize`` (a ``Fraction`` when the
    ``"channel"`` layout shares a group's scales among ``G`` positions: the same
    count per position)."""
    from fractions import Fraction

    group = dim if group_size is None else group_size
    per_group = (1 if symmetric else 2) * itemsize
    return Fraction(dim * bits, 8) + Fraction(dim * per_group, group)


def cache_nbytes(
    n: int,
    *,
    batch: int,
    kv_heads: int,
    key_dim: int,
    value_dim: int,
    bits: int,
    group_size: int | None,
    residual: int,
    keys: str,
    symmetric: bool,
    itemsize: int,
) -> int:
    """Exact bytes a quantised cache of ``n`` positions holds: packed codes, scales,
    zero points (asymmetric) and the full-precision positions, keys and values."""
    qk, qv = quantized_counts(n, residual=residual, group_size=group_size, keys=keys)
    params = 1 if symmetric else 2
    gk = key_dim if group_size is None else group_size
    gv = value_dim if group_size is None else group_size
    if keys == "channel":  # one scale (and zero) per channel per G positions
        key_scales = (qk // gk) * key_dim
    else:
        key_scales = qk * (key_dim // gk)
    value_scales = qv * (value_dim // gv)
    total = (
        qk * key_dim * bits // 8
        + qv * value_dim * bits // 8
        + (key_scales + value_scales) * params * itemsize
        + ((n - qk) * key_dim + (n - qv) * value_dim) * itemsize
    )
    return batch * kv_heads * total


class QuantizedCacheMixin:
    r"""Keys and values stored as ``b``-bit codes with their scales (and zero points).

    Mixed in before a backend's ``KVCache`` (so that the attention functions take it
    where they take a ``KVCache``): :meth:`append` quantises what leaves the
    full-precision residual and returns the keys and values attention should see, the
    dequantised positions followed by the full-precision ones. Decoding with it
    therefore equals attention over the dequantised keys and values
    (:meth:`dequantized`). Storage is re-concatenated at each append (this class
    shows the numbers; a serving kernel dequantises tile by tile inside attention).

    A backend supplies ``_ops``: ``amin``, ``amax``, ``abs``, ``round``, ``clip``,
    ``where``, ``cast(x, "int32" | "uint8" | like)``, ``reshape``, ``concat(list,
    axis)``, ``zeros(shape, like)``.
    """

    _ops = None

    def __init__(
        self,
        bits: int = 8,
        group_size: int | None = None,
        *,
        residual: int = 0,
        keys: str = "token",
        symmetric: bool | None = None,
    ):
        self._bits = check_bits(bits)
        self._group_size = check_group_size(group_size)
        self._residual = check_residual(residual)
        self._keys = check_layout("keys", keys)
        if symmetric is None:
            symmetric = self._bits == 8
        self._symmetric = _checks.check_flag("symmetric", symmetric)
        if self._keys == "channel" and self._group_size is None:
            raise ValueError(
                "group_size must be given with keys='channel' (positions per group)"
            )
        super().__init__(max_length=None)
        self.reset()

    # --- state ---------------------------------------------------------------------
    def reset(self) -> None:
        self._n = 0
        # quantised: (codes, scale, zero) for keys and for values, or None
        self._qkey = self._qvalue = None
        self._fkey = self._fvalue = None  # full precision (B, H_kv, ., dim)
        self._dtype = None

    def _state(self) -> tuple:
        return (self._n, self._qkey, self._qvalue, self._fkey, self._fvalue)

    def _restore(self, state: tuple) -> None:
        self._n, self._qkey, self._qvalue, self._fkey, self._fvalue = state

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def group_size(self) -> int | None:
        return self._group_size

    @property
    def residual(self) -> int:
        return self._residual

    @property
    def symmetric(self) -> bool:
        return self._symmetric

    @property
    def layout(self) -> tuple[str, str]:
        """``(keys, values)`` layouts: values are always per token."""
        return self._keys, "token"

    @property
    def length(self) -> int:
        return self._n

    @property
    def seen(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._n

    @property
    def quantized_length(self) -> tuple[int, int]:
        """How many key and how many value positions are held as codes."""
        return quantized_counts(
            self._n, residual=self._residual, group_size=self._group_size,
            keys=self._keys,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """The bytes held by codes, scales, zero points and full-precision positions."""
        total = 0
        for part in (self._qkey, self._qvalue):
            if part is not None:
                total += sum(_nbytes(t) for t in part if t is not None)
        for t in (self._fkey, self._fvalue):
            if t is not None:
                total += _nbytes(t)
        return total

    @property
    def key(self):
        """Keys ``(B, H_kv, S, D)`` as attention sees them (dequantised, then the
        full-precision ones)."""
        return None if self._fkey is None else self.dequantized()[0]

    @property
    def value(self):
        return None if self._fvalue is None else self.dequantized()[1]

    # --- the formulas --------------------------------------------------------------
    def quantize(self, x, layout: str):
        """``x (B, H_kv, S, dim)`` -> ``(codes, scale, zero)``: packed ``uint8``
        codes ``(B, H_kv, S, dim b / 8)``, scales and zero points (``None`` when
        symmetric) ``(B, H_kv, S, dim / G)`` per token or ``(B, H_kv, S / G, dim)``
        per channel."""
        ops = self._ops
        B, H, S, dim = (int(n) for n in x.shape)
        G = dim if self._group_size is None else self._group_size
        # [book: quantize]
        if layout == "token":  # (B, H, S, dim / G, G): reduce the last axis
            grouped, axis = ops.reshape(x, (B, H, S, dim // G, G)), 4
        else:  # (B, H, S / G, G, dim): reduce the positions of a group
            grouped, axis = ops.reshape(x, (B, H, S // G, G, dim)), 3
        lo, hi = levels(self._bits, self._symmetric)
        if self._symmetric:
            scale = ops.amax(ops.abs(grouped), axis) / hi  # keepdims
            zero = None
            shifted = grouped
        else:
            low = ops.amin(grouped, axis)
            scale = (ops.amax(grouped, axis) - low) / hi
            zero = low
            shifted = grouped - zero
        safe = ops.where(scale > 0, scale, scale * 0 + 1)  # s = 0: all codes 0
        codes = ops.clip(ops.round(shifted / safe), lo, hi) - lo  # 0 .. 2^b - 1
        # [/book: quantize]
        codes = ops.reshape(ops.cast(codes, "int32"), (B, H, S, dim))
        packed = self._pack(codes)
        squeeze = (B, H, S, dim // G) if layout == "token" else (B, H, S // G, dim)
        scale = ops.reshape(scale, squeeze)
        zero = None if zero is None else ops.reshape(zero, squeeze)
        return packed, scale, zero

    def dequantize(self, part, layout: str):
        """``(codes, scale, zero)`` -> ``(B, H_kv, S, dim)``: ``q s + z``."""
        ops = self._ops
        codes, scale, zero = part
        B, H, S, packed = (int(n) for n in codes.shape)
        dim = packed * 8 // self._bits
        G = dim if self._group_size is None else self._group_size
        lo, _ = levels(self._bits, self._symmetric)
        q = ops.cast(self._unpack(codes, dim), "int32") + lo
        q = ops.cast(q, scale)
        if layout == "token":
            shape, expanded = (B, H, S, dim // G, G), (B, H, S, dim // G, 1)
        else:
            shape, expanded = (B, H, S // G, G, dim), (B, H, S // G, 1, dim)
        x = ops.reshape(q, shape) * ops.reshape(scale, expanded)
        if zero is not None:
            x = x + ops.reshape(zero, expanded)
        return ops.reshape(x, (B, H, S, dim))

    def _pack(self, codes):
        """int32 codes ``(B, H, S, dim)`` -> ``uint8 (B, H, S, dim b / 8)``: code
        ``j`` of a byte in bits ``j b .. (j + 1) b - 1``."""
        ops = self._ops
        per = 8 // self._bits
        B, H, S, dim = (int(n) for n in codes.shape)
        grouped = ops.reshape(codes, (B, H, S, dim // per, per))
        byte = grouped[..., 0]
        for j in range(1, per):
            byte = byte + grouped[..., j] * (2 ** (self._bits * j))
        return ops.cast(byte, "uint8")

    def _unpack(self, packed, dim: int):
        ops = self._ops
        per = 8 // self._bits
        B, H, S, width = (int(n) for n in packed.shape)
        byte = ops.cast(packed, "int32")
        parts = [
            ops.reshape((byte // (2 ** (self._bits * j))) % (2**self._bits),
                        (B, H, S, width, 1))
            for j in range(per)
        ]  # fmt: skip
        return ops.reshape(ops.concat(parts, 4), (B, H, S, dim))

    # --- the cache -----------------------------------------------------------------
    def dequantized(self):
        """``(key, value)``: every cached position as attention sees it."""
        key, value = self._fkey, self._fvalue
        if self._qkey is not None:
            key = self._ops.concat([self.dequantize(self._qkey, self._keys), key], 2)
        if self._qvalue is not None:
            value = self._ops.concat([self.dequantize(self._qvalue, "token"), value], 2)
        return key, value

    def append(self, key, value):
        """Append ``key (B, H_kv, S_new, D)``, ``value (B, H_kv, S_new, D_v)``;
        return every cached ``(key, value)`` as attention sees it."""
        key, value = self._convert("key", key), self._convert("value", value)
        stored = (
            (None, None, None)
            if self._fkey is None
            else (self._fkey.shape, self._fvalue.shape, self._fkey.dtype)
        )
        _checks.check_cache_append(
            key.shape, value.shape, key.dtype, value.dtype, *stored
        )
        if self._fkey is not None:
            self._check_stored(key)
        check_dims(
            int(key.shape[3]), int(value.shape[3]), self._bits, self._group_size,
            self._keys,
        )  # fmt: skip
        ops = self._ops
        old_k, old_v = self.quantized_length
        fkey = key if self._fkey is None else ops.concat([self._fkey, key], 2)
        fvalue = value if self._fvalue is None else ops.concat([self._fvalue, value], 2)
        n = self._n + int(key.shape[2])
        new_k, new_v = quantized_counts(
            n, residual=self._residual, group_size=self._group_size, keys=self._keys
        )
        qkey = self._move(self._qkey, fkey, new_k - old_k, self._keys)
        qvalue = self._move(self._qvalue, fvalue, new_v - old_v, "token")
        # nothing changed before this line: a failed call leaves the cache as it was
        self._n = n
        self._qkey, self._fkey = qkey, fkey[:, :, new_k - old_k :]
        self._qvalue, self._fvalue = qvalue, fvalue[:, :, new_v - old_v :]
        return self.dequantized()

    def _move(self, part, full, count: int, layout: str):
        """``part`` with the first ``count`` positions of ``full`` quantised and
        appended."""
        if count == 0:
            return part
        new = self.quantize(full[:, :, :count], layout)
        if part is None:
            return new
        ops = self._ops
        return tuple(
            None if a is None else ops.concat([a, b], 2) for a, b in zip(part, new)
        )

    def _check_stored(self, key) -> None:
        """Backend-specific checks against the stored tensors (e.g. the device)."""


def _nbytes(t) -> int:
    size = 1
    for n in t.shape:
        size *= int(n)
    dtype = t.dtype
    item = getattr(dtype, "itemsize", None)
    return size * int(item if item is not None else dtype.size)
