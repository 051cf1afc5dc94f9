"""Input checks shared by the three backends: they see shapes and dtype names only.

Each backend passes ``tuple(x.shape)`` and ``dtype_name(x.dtype)``; the checks raise
``ValueError`` / ``TypeError`` naming the argument and the shapes seen (see
:mod:`companion.conventions`), so the three namespaces reject bad input with the same
words.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "dtype_name",
    "check_float",
    "check_int",
    "attention_shapes",
    "AttentionShapes",
    "check_cache_append",
    "broadcast_shape",
    "check_mask_shape",
    "resolve_scale",
]
__all__ += ["Conv2dGeometry", "conv2d_geometry"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(dtype) -> str:
    """``'float32'`` for numpy ``float32``, ``torch.float32`` and ``tf.float32``."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str) and str(dtype).startswith("torch."):
        # torch dtypes have no .name; asked first, numpy's TypeError never comes (a
        # caught exception inside np.dtype stops torch.compile / torch.export tracing)
        name = str(dtype)
    if not isinstance(name, str):
        try:
            import numpy as np

            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    return (
        name.replace("torch.", "")
        .replace("tf.", "")
        .replace("<dtype: '", "")
        .rstrip("'>")
    )


def check_float(name: str, dtype) -> str:
    """Raise ``TypeError`` unless ``dtype`` is a floating type; return its name."""
    n = dtype_name(dtype)
    if n not in _FLOAT_NAMES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            "float64), "
            f"got dtype {n}"
        )
    return n


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum`` (Python or numpy integers, not bools);
    ``ValueError`` otherwise."""
    if (
        isinstance(value, bool)
        or not hasattr(value, "__index__")
        or int(value) < minimum
    ):
        kind = {0: "a non-negative int", 1: "a positive int"}.get(
            minimum, f"an int >= {minimum}"
        )
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """``value`` as a Python bool: ``True``/``False`` or a numpy bool, the same in every
    backend (numpy's bool is recognised by its type, without importing numpy here);
    anything else (``1``, ``"yes"``, a tensor) is a ``TypeError`` naming ``name``."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_token_id(name: str, value, vocab_size: int) -> int:
    """A single token id in ``[0, vocab_size)`` (``bos_id``, ``eos_id``, ``pad_id``) as
    a Python int; ``ValueError`` naming ``name`` otherwise."""
    value = check_int(name, value, minimum=0)
    if value >= vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value}")
    return value


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy broadcasting of shapes; ``ValueError`` if they do not broadcast."""
    # max(..., default=0) would break a torch.compile graph (dynamo has no default=)
    ndim = max([len(s) for s in shapes] + [0])
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis and s[axis] != 1}
        if len(sizes) > 1:
            raise ValueError(
                f"shapes {', '.join(map(str, shapes))} do not broadcast (axis {axis}: "
                f"sizes {sorted(sizes)})"
            )
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


class AttentionShapes(NamedTuple):
    """The sizes of one attention call, named as in :mod:`companion.conventions`."""

    batch: tuple[int, ...]  # the broadcast leading axes "..."
    H: int
    H_kv: int
    L: int
    S: int
    D: int
    D_v: int

    @property
    def group(self) -> int:
        """Query heads per key/value head, ``H // H_kv``."""
        return self.H // self.H_kv

    @property
    def scores(self) -> tuple[int, ...]:
        """The shape of the weights, ``(..., H, L, S)``."""
        return (*self.batch, self.H, self.L, self.S)


def attention_shapes(query_shape, key_shape, value_shape) -> AttentionShapes:
    """Check ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S,
    D_v)``.

    Raises ``ValueError`` for a rank below 3, mismatched head dimensions, key/value
    lengths or head counts, ``H`` not a multiple of ``H_kv``, and leading axes that do
    not broadcast.
    """
    q, k, v = tuple(query_shape), tuple(key_shape), tuple(value_shape)
    for name, shape in (("query", q), ("key", k), ("value", v)):
        if len(shape) < 3:
            raise ValueError(
                f"{name} must have shape (..., heads, length, dim) with at least 3 "
                "axes, "
                f"got shape {shape}"
            )
    H, L, D = q[-3:]
    H_kv, S, D_k = k[-3:]
    H_v, S_v, D_v = v[-3:]
    if D_k != D:
        raise ValueError(
            f"query and key must have the same head dimension D: query {q} has D={D}, "
            f"key {k} has D={D_k}"
        )
    if S_v != S:
        raise ValueError(
            f"key and value must have the same length S: key {k} has S={S}, value {v} "
            f"has S={S_v}"
        )
    if H_v != H_kv:
        raise ValueError(
            f"key and value must have the same number of heads: key {k} has {H_kv}, "
            f"value {v} has {H_v}"
        )
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(
            f"the query heads H={H} (query {q}) must be a multiple of the key/value "
            "heads "
            f"H_kv={H_kv} (key {k}) for grouped-query attention"
        )
    if S == 0:
        raise ValueError(
            f"key and value must hold at least one position (S >= 1), got key {k}"
        )
    try:
        batch = broadcast_shape(q[:-3], k[:-3], v[:-3])
    except ValueError:
        raise ValueError(
            f"the leading (batch) axes of query {q}, key {k} and value {v} do not "
            "broadcast"
        ) from None
    return AttentionShapes(batch, H, H_kv, L, S, D, D_v)


def check_mask_shape(mask_shape, shapes: AttentionShapes, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``mask_shape`` broadcasts to ``(..., H, L, S)``
    without growing it."""
    m = tuple(mask_shape)
    target = shapes.scores
    try:
        result = broadcast_shape(m, target)
    except ValueError:
        result = None
    if result != target:
        raise ValueError(
            f"{name} of shape {m} does not broadcast to the attention weights' shape "
            f"(..., H, L, S) = {target}"
        )


def resolve_scale(scale, D: int) -> float:
    """The softmax scale as a Python float: ``scale`` or ``1 / sqrt(D)``.

    A Python float never changes an array's dtype (``np.sqrt`` would return float64).
    """
    import math

    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


# --- convolution geometry (shared by the numpy, torch and tensorflow conv2d) ----------


class Conv2dGeometry(NamedTuple):
    """The sizes of one ``conv2d`` call (``NCHW`` input, ``OIHW`` weight), all Python
    ints.

    ``pad`` is ``(top, bottom, left, right)``: ``padding="same"`` puts the odd extra row
    or column at the bottom/right, as ``torch.nn.functional.conv2d`` does.
    """

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    kH: int
    kW: int
    groups: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]
    H_out: int
    W_out: int

    @property
    def C_in_per_group(self) -> int:
        """Input channels each filter sees, ``C_in // groups``."""
        return self.C_in // self.groups

    @property
    def C_out_per_group(self) -> int:
        """Filters per group, ``C_out // groups``."""
        return self.C_out // self.groups


def _int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """``value`` as ``(rows, cols)``: an int or a pair of ints, each ``>= minimum``."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(
        isinstance(v, bool) or not isinstance(v, int) for v in pair
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def conv2d_geometry(
    x_shape, weight_shape, bias_shape=None, *, stride=1, padding=0, dilation=1, groups=1
) -> Conv2dGeometry:
    """Check a ``conv2d`` call and return its :class:`Conv2dGeometry`.

    ``x (N, C_in, H, W)``, ``weight (C_out, C_in / groups, kH, kW)``, ``bias (C_out,)``;
    ``padding`` an int, a pair, ``"valid"`` (0) or ``"same"`` (stride 1 only; total
    padding ``dilation * (k - 1)``, the extra row/column at the bottom/right), the rules
    of ``torch.nn.functional.conv2d``. The output size along each axis is
    ``floor((size + pad_before + pad_after - dilation * (k - 1) - 1) / stride) + 1``.
    Raises ``ValueError``/``TypeError`` naming the argument and the shapes seen.
    """
    x, w = tuple(x_shape), tuple(weight_shape)
    if len(x) != 4:
        raise ValueError(f"x must have shape (N, C_in, H, W) (NCHW), got shape {x}")
    if len(w) != 4:
        raise ValueError(
            "weight must have shape (C_out, C_in / groups, kH, kW) (OIHW), got shape "
            f"{w}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C_in, H, W = x
    C_out, C_in_g, kH, kW = w
    if C_in % groups or C_out % groups:
        raise ValueError(
            f"groups={groups} must divide both C_in={C_in} (x {x}) and C_out={C_out} "
            f"(weight {w})"
        )
    if C_in_g * groups != C_in:
        raise ValueError(
            f"weight {w} expects C_in / groups = {C_in_g}, so C_in = "
            f"{C_in_g * groups}, "
            f"but x {x} has C_in = {C_in} (groups={groups})"
        )
    if min(kH, kW, C_out) < 1:
        raise ValueError(
            f"weight must have a positive kernel size and C_out, got shape {w}"
        )
    if bias_shape is not None and tuple(bias_shape) != (C_out,):
        raise ValueError(
            f"bias must have shape (C_out,) = ({C_out},), got shape {tuple(bias_shape)}"
        )
    stride = _int_pair("stride", stride, 1)
    dilation = _int_pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride=1 (as in torch), got stride={stride}"
                )
            total_h, total_w = dilation[0] * (kH - 1), dilation[1] * (kW - 1)
            pad = (
                total_h // 2,
                total_h - total_h // 2,
                total_w // 2,
                total_w - total_w // 2,
            )
        else:
            raise ValueError(
                "padding must be an int, a pair of ints, 'same' or 'valid', got "
                f"{padding!r}"
            )
    else:
        ph, pw = _int_pair("padding", padding, 0)
        pad = (ph, ph, pw, pw)
    span_h, span_w = dilation[0] * (kH - 1) + 1, dilation[1] * (kW - 1) + 1
    H_out = (H + pad[0] + pad[1] - span_h) // stride[0] + 1
    W_out = (W + pad[2] + pad[3] - span_w) // stride[1] + 1
    if H + pad[0] + pad[1] < span_h or W + pad[2] + pad[3] < span_w:
        raise ValueError(
            f"the dilated kernel ({span_h} x {span_w}, weight {w}, dilation "
            f"{dilation}) is larger "
            f"than the padded input ({H + pad[0] + pad[1]} x {W + pad[2] + pad[3]}, x "
            f"{x}, "
            f"padding {padding!r})"
        )
    return Conv2dGeometry(
        N, C_in, H, W, C_out, kH, kW, groups, stride, dilation, pad, H_out, W_out
    )


def check_cache_append(
    key_shape,
    value_shape,
    key_dtype,
    value_dtype,
    cached_key_shape=None,
    cached_value_shape=None,
    cached_dtype=None,
) -> None:
    """Check one ``KVCache.append(key, value)`` against itself and against what is
    cached.

    ``key (B, H_kv, S_new, D)`` and ``value (B, H_kv, S_new, D_v)`` must agree on
    ``(B, H_kv, S_new)`` and dtype; once the cache holds something, ``B``, ``H_kv``,
    ``D``, ``D_v`` and the dtype are fixed.
    """
    k, v = tuple(key_shape), tuple(value_shape)
    for name, shape in (("key", k), ("value", v)):
        if len(shape) != 4:
            raise ValueError(
                f"{name} must have shape (B, H_kv, S_new, dim), got shape {shape}"
            )
    if k[:3] != v[:3]:
        raise ValueError(f"key {k} and value {v} must agree on (B, H_kv, S_new)")
    names = (check_float("key", key_dtype), check_float("value", value_dtype))
    if names[0] != names[1]:
        raise TypeError(
            f"key and value must have the same dtype, got {names[0]} and {names[1]}"
        )
    if cached_key_shape is None:
        return
    ck, cv = tuple(cached_key_shape), tuple(cached_value_shape)
    if (k[:2], k[3], v[3]) != (ck[:2], ck[3], cv[3]):
        raise ValueError(
            f"key {k} / value {v} do not match the cache's (B, H_kv, D) = "
            f"{(*ck[:2], ck[3])} "
            f"and (B, H_kv, D_v) = {(*cv[:2], cv[3])}"
        )
    if names[0] != dtype_name(cached_dtype):
        raise TypeError(
            f"key dtype {names[0]} differs from the cache's {dtype_name(cached_dtype)}"
        )
