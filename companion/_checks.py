"""Input checks shared by the three backends: they see shapes and dtype names only.

Each backend passes ``tuple(x.shape)`` and ``dtype_name(x.dtype)``; the checks raise
``ValueError`` / ``TypeError`` naming the argument and the shapes seen (see
:mod:`companion.conventions`), so the three namespaces reject bad input with the same
words.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["dtype_name", "check_float", "attention_shapes", "AttentionShapes",
           "broadcast_shape", "check_mask_shape", "resolve_scale"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(dtype) -> str:
    """``'float32'`` for numpy ``float32``, ``torch.float32`` and ``tf.float32`` alike."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        try:
            import numpy as np

            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    return name.replace("torch.", "").replace("tf.", "").replace("<dtype: '", "").rstrip("'>")


def check_float(name: str, dtype) -> str:
    """Raise ``TypeError`` unless ``dtype`` is a floating type; return its name."""
    n = dtype_name(dtype)
    if n not in _FLOAT_NAMES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {n}")
    return n


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy broadcasting of shapes; ``ValueError`` if they do not broadcast."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis and s[axis] != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {', '.join(map(str, shapes))} do not broadcast (axis {axis}: sizes {sorted(sizes)})")
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
    """Check ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S, D_v)``.

    Raises ``ValueError`` for a rank below 3, mismatched head dimensions, key/value
    lengths or head counts, ``H`` not a multiple of ``H_kv``, and leading axes that do
    not broadcast.
    """
    q, k, v = tuple(query_shape), tuple(key_shape), tuple(value_shape)
    for name, shape in (("query", q), ("key", k), ("value", v)):
        if len(shape) < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least 3 axes, "
                             f"got shape {shape}")
    H, L, D = q[-3:]
    H_kv, S, D_k = k[-3:]
    H_v, S_v, D_v = v[-3:]
    if D_k != D:
        raise ValueError(f"query and key must have the same head dimension D: query {q} has D={D}, "
                         f"key {k} has D={D_k}")
    if S_v != S:
        raise ValueError(f"key and value must have the same length S: key {k} has S={S}, value {v} has S={S_v}")
    if H_v != H_kv:
        raise ValueError(f"key and value must have the same number of heads: key {k} has {H_kv}, value {v} has {H_v}")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"the query heads H={H} (query {q}) must be a multiple of the key/value heads "
                         f"H_kv={H_kv} (key {k}) for grouped-query attention")
    if S == 0:
        raise ValueError(f"key and value must hold at least one position (S >= 1), got key {k}")
    try:
        batch = broadcast_shape(q[:-3], k[:-3], v[:-3])
    except ValueError:
        raise ValueError(f"the leading (batch) axes of query {q}, key {k} and value {v} do not broadcast") from None
    return AttentionShapes(batch, H, H_kv, L, S, D, D_v)


def check_mask_shape(mask_shape, shapes: AttentionShapes, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``mask_shape`` broadcasts to ``(..., H, L, S)`` without growing it."""
    m = tuple(mask_shape)
    target = shapes.scores
    try:
        result = broadcast_shape(m, target)
    except ValueError:
        result = None
    if result != target:
        raise ValueError(f"{name} of shape {m} does not broadcast to the attention weights' shape "
                         f"(..., H, L, S) = {target}")


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
