"""What the three backends' position functions share: checks and ALiBi's slopes.

Backend-free: it sees Python numbers, shapes and dtype names only, so the numpy, torch
and TensorFlow versions of :mod:`companion.numpy.positions` reject bad input with the
same words and compute the same slopes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from companion import _checks

__all__ = [
    "check_length",
    "check_base",
    "alibi_slope_list",
    "rotary_dims",
    "check_positions",
    "check_position_values",
    "check_interleaved",
    "RotaryConfig",
    "as_rotary",
    "rotary_positions",
]


def check_length(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming ``name`` otherwise."""
    return _checks.check_int(name, value, minimum)


def check_base(base) -> float:
    """The rotary/sinusoidal ``base`` as a Python float ``> 1``.

    A number (numpy and 0-d tensor numbers too); a string such as ``"10000"`` is a
    ``TypeError``, not read as a number."""
    if isinstance(base, (bool, str, bytes)):
        raise TypeError(f"base must be a number > 1, got {base!r}")
    if not isinstance(base, (int, float)):
        try:
            base = float(base)
        except (TypeError, ValueError):
            raise TypeError(f"base must be a number > 1, got {base!r}") from None
    base = float(base)
    if not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"base must be a finite number > 1, got {base!r}")
    return base


def alibi_slope_list(num_heads: int) -> list[float]:
    r"""ALiBi's head slopes (Press et al. 2022), as Python floats.

    For ``H`` a power of two the slopes are the geometric sequence
    :math:`m_h = 2^{-8 (h + 1) / H}`, ``h = 0 .. H-1`` (``2^-1 .. 2^-8`` for 8 heads).
    Otherwise, with ``n`` the largest power of two below ``H``, the paper's rule takes
    the ``n`` slopes for ``n`` heads and adds every other slope of the ``2n`` sequence
    (the odd-numbered ones) until there are ``H``.
    """
    H = check_length("num_heads", num_heads, 1)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    n = 2 ** int(math.floor(math.log2(H)))
    if n == H:
        return power_of_two(H)
    return power_of_two(n) + power_of_two(2 * n)[0::2][: H - n]


def rotary_dims(shape, rotary_dim) -> tuple[int, int]:
    """``(D, d)``: the feature size of ``x (..., L, D)`` and the rotated size ``d``.

    ``d`` (``rotary_dim``, default ``D``) must be even and at most ``D``: features are
    rotated in pairs, and partial rotary (GPT-NeoX) leaves ``D - d`` features alone.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            f"x must have shape (..., L, D) with at least 2 axes, got {shape}"
        )
    D = int(shape[-1])
    if rotary_dim is None:
        d = D
        if d % 2:
            raise ValueError(
                f"rotary embeddings rotate pairs of features: the last axis of x must "
                f"be even, got D={D} (x of shape {shape}); pass an even rotary_dim to "
                "rotate only part of it"
            )
    else:
        d = _checks.check_int("rotary_dim", rotary_dim, 2)
        if d % 2 or d > D:
            raise ValueError(
                f"rotary_dim must be even and at most D={D} (x of shape {shape}), "
                f"got {rotary_dim!r}"
            )
    return D, d


INT64_RANGE = (-(2**63), 2**63 - 1)


def check_position_values(positions) -> None:
    """Python ints in ``positions`` (an int, or nested lists/tuples/ranges of them)
    must fit int64: a ``ValueError`` naming ``positions`` before any backend converts
    them (and reports an overflow, or a float dtype, in its own words). Arrays and
    tensors already have a dtype and pass."""
    lo, hi = INT64_RANGE

    def walk(p):
        if isinstance(p, range):
            p = [p[0], p[-1]] if len(p) else []
        if isinstance(p, (list, tuple)):
            for item in p:
                walk(item)
        elif isinstance(p, int) and not isinstance(p, bool) and not lo <= p <= hi:
            raise ValueError(
                f"positions must fit a 64-bit integer ({lo} .. {hi}), got {p}"
            )

    walk(positions)


def check_interleaved(interleaved) -> bool:
    """``interleaved`` as a Python bool: ``True``/``False`` or a numpy bool, the same in
    every backend; anything else (``1``, ``"yes"``) is a ``TypeError``."""
    if isinstance(interleaved, bool):
        return interleaved
    if type(interleaved).__module__ == "numpy" and type(interleaved).__name__ in (
        "bool_",
        "bool",
    ):
        return bool(interleaved)
    raise TypeError(f"interleaved must be True or False, got {interleaved!r}")


def check_positions(positions_shape, dtype_name: str, x_shape) -> None:
    """Integer positions, ``(L,)`` or broadcasting to the ``(..., L)`` of ``x``."""
    if not (dtype_name.startswith("int") or dtype_name.startswith("uint")):
        raise TypeError(
            f"positions must be integers (absolute token positions), got dtype "
            f"{dtype_name}"
        )
    p, target = tuple(positions_shape), tuple(x_shape)[:-1]
    if len(p) < 1:
        raise ValueError(f"positions must have shape (L,) or (..., L), got shape {p}")
    try:
        result = _checks.broadcast_shape(p, target)
    except ValueError:
        result = None
    if result != target:
        raise ValueError(
            f"positions of shape {p} do not broadcast to x's (..., L) = {target}"
        )


@dataclass(frozen=True)
class RotaryConfig:
    """How attention rotates queries and keys: :func:`companion.numpy.rotary_embedding`.

    The ``rope=`` keyword of the attention functions and layers takes one of these, or
    ``True`` (the defaults), a number (the ``base``) or a dict of these fields; ``None``
    or ``False`` means no rotary embedding.
    """

    base: float = 10000.0
    interleaved: bool = False
    rotary_dim: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "base", check_base(self.base))
        object.__setattr__(self, "interleaved", check_interleaved(self.interleaved))
        if self.rotary_dim is not None:
            d = _checks.check_int("rotary_dim", self.rotary_dim, 2)
            if d % 2:
                raise ValueError(
                    "rotary_dim must be even (features are rotated in pairs), "
                    f"got {self.rotary_dim!r}"
                )
            object.__setattr__(self, "rotary_dim", d)


def as_rotary(rope) -> RotaryConfig | None:
    """``rope=`` as a :class:`RotaryConfig`, or ``None`` for no rotary embedding."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return RotaryConfig()
    if isinstance(rope, RotaryConfig):
        return rope
    if isinstance(rope, dict):
        return RotaryConfig(**rope)
    if isinstance(rope, (int, float)):
        return RotaryConfig(base=rope)
    raise TypeError(
        "rope must be None, True, a base (number), a dict or a RotaryConfig, "
        f"got {rope!r}"
    )


def rotary_positions(L: int, S_new: int, start: int) -> tuple[range, range]:
    """Absolute positions of ``L`` queries and ``S_new`` new keys after ``start`` seen.

    The keys are ``start .. start + S_new - 1``; the queries are the last ``L`` of
    them, bottom-right aligned like the causal mask (for self-attention ``L ==
    S_new`` and both are the same positions).
    """
    keys = range(start, start + S_new)
    queries = range(start + S_new - L, start + S_new)
    return queries, keys
