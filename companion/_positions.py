"""What the three backends' position functions share: checks and ALiBi's slopes.

Backend-free: it sees Python numbers, shapes and dtype names only, so the numpy, torch
and TensorFlow versions of :mod:`companion.numpy.positions` reject bad input with the
same words and compute the same slopes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

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
    "rotary_dict",
    "ROPE_TYPES",
    "RopeScaling",
    "as_scaling",
    "needs_length",
    "scaled_frequencies",
    "check_t5_buckets",
    "t5_position_buckets",
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
    return _checks.check_flag("interleaved", interleaved)


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
    or ``False`` means no rotary embedding. ``scaling`` (a :class:`RopeScaling` or a
    dict of its fields, default ``None``: unscaled) stretches the rotation for texts
    longer than training.
    """

    base: float = 10000.0
    interleaved: bool = False
    rotary_dim: int | None = None
    scaling: RopeScaling | None = None

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
        object.__setattr__(self, "scaling", as_scaling(self.scaling))


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


def rotary_dict(rope: RotaryConfig) -> dict:
    """``rope``'s fields as a dict of plain values (a Keras layer's configuration),
    ``"scaling"`` left out when there is none, as before scaling existed."""
    fields = dataclasses.asdict(rope)
    if fields["scaling"] is None:
        del fields["scaling"]
    else:
        fields["scaling"] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in fields["scaling"].items()
        }
    return fields


def rotary_positions(L: int, S_new: int, start: int) -> tuple[range, range]:
    """Absolute positions of ``L`` queries and ``S_new`` new keys after ``start`` seen.

    The keys are ``start .. start + S_new - 1``; the queries are the last ``L`` of
    them, bottom-right aligned like the causal mask (for self-attention ``L ==
    S_new`` and both are the same positions).
    """
    keys = range(start, start + S_new)
    queries = range(start + S_new - L, start + S_new)
    return queries, keys


# --- RoPE scaling: longer than training ----------------------------------------------

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "proportional")


def _positive(name: str, value) -> float:
    """``value`` as a finite Python float ``> 0``; ``TypeError``/``ValueError`` naming
    ``name`` otherwise."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _factor_list(name: str, values) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers > 0, got {values!r}")
    items = tuple(values)
    if not items:
        raise ValueError(f"{name} must not be empty")
    return tuple(_positive(f"{name}[{i}]", v) for i, v in enumerate(items))


@dataclass(frozen=True)
class RopeScaling:
    r"""How rotary frequencies change for texts longer than training (``rope_type``).

    The ``scaling`` of a :class:`RotaryConfig`. Each rule maps the unscaled
    frequencies :math:`\theta_i = \text{base}^{-2i/d}` to new ones and may return an
    attention factor that multiplies the rotated features (so the scores of rotated
    pairs by its square), exactly as Hugging Face's ``ROPE_INIT_FUNCTIONS``:

    * ``"linear"`` (position interpolation, Chen et al. 2023): :math:`\theta_i / s`
      with ``s = factor``;
    * ``"ntk"`` (NTK-aware, bloc97 2023): a larger base,
      :math:`\text{base}\cdot s^{d/(d-2)}`;
    * ``"dynamic"`` (dynamic NTK): the NTK base with
      :math:`s' = s\,n/n_0 - (s - 1)` for a text of ``n`` tokens, ``n_0 =
      original_max_positions`` (unscaled while ``n <= n_0``);
    * ``"yarn"`` (Peng et al. 2023): interpolate the slow pairs, keep the fast ones,
      ramp between ``beta_fast`` and ``beta_slow`` rotations over ``n_0``; attention
      factor :math:`0.1 \ln s + 1` (or ``mscale``/``mscale_all_dim``'s ratio, or
      ``attention_factor``);
    * ``"llama3"``: wavelengths above ``n_0 / low_freq_factor`` divided by ``s``,
      below ``n_0 / high_freq_factor`` kept, a smooth blend between;
    * ``"longrope"`` (Ding et al. 2024): one factor per pair, ``short_factor`` while
      ``n <= n_0``, ``long_factor`` beyond; attention factor
      :math:`\sqrt{1 + \ln s / \ln n_0}`;
    * ``"proportional"`` (Gemma 4's global layers): the first
      :math:`r = \lfloor p\,d/2 \rfloor` pairs keep :math:`\theta_i / s` with the
      exponent over the *whole* width ``d`` (:math:`\text{base}^{-2i/d}`), the other
      ``d/2 - r`` pairs get frequency 0 (never turned), ``p =
      partial_rotary_factor``; ``factor`` is optional (default 1), the attention
      factor is 1. Pair ``i`` is still features ``(i, i + d/2)`` of the whole head
      (``interleaved=False``, no ``rotary_dim``): the rotated features are the first
      ``r`` of each half, so no reordering of the projection rows is needed (a
      ``rotary_dim = 2r`` would rotate features ``(i, i + r)`` instead, a different
      map, equal only after permuting the rows of :math:`W_q` and :math:`W_k`).

    ``factor`` may be left out for YaRN and LongRoPE when ``max_positions`` (the
    target length) is given: it is then ``max_positions / original_max_positions``.

    ``"dynamic"`` and ``"longrope"`` depend on the text's length (the largest position
    + 1). With a KV cache, keys cached at earlier steps keep the rotation of their
    step, as in Transformers: cached decoding equals the full pass while the text
    stays within ``original_max_positions``, not beyond. The other rules do not
    depend on the length.
    """

    rope_type: str
    factor: float | None = None
    original_max_positions: int | None = None
    max_positions: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        kind = self.rope_type
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {kind!r}"
            )
        setattr_ = object.__setattr__
        if self.factor is not None:
            setattr_(self, "factor", _positive("factor", self.factor))
        for name in ("original_max_positions", "max_positions"):
            value = getattr(self, name)
            if value is not None:
                setattr_(self, name, _checks.check_int(name, value, 1))
        n0, n1 = self.original_max_positions, self.max_positions
        if n0 is not None and n1 is not None and n0 > n1:
            raise ValueError(
                f"original_max_positions ({n0}) must not be larger than the target "
                f"max_positions ({n1})"
            )
        if kind not in ("linear", "ntk", "proportional") and n0 is None:
            raise ValueError(f"rope_type {kind!r} needs original_max_positions")
        if self.factor is None and not (
            kind in ("longrope", "proportional") or (kind == "yarn" and n1 is not None)
        ):
            raise ValueError(
                f"rope_type {kind!r} needs factor"
                + (" (or max_positions)" if kind == "yarn" else "")
            )
        if self.attention_factor is not None:
            setattr_(
                self,
                "attention_factor",
                _positive("attention_factor", self.attention_factor),
            )
        for name in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            setattr_(self, name, _positive(name, getattr(self, name)))
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must be larger than "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (bool, str, bytes)):
                    raise TypeError(f"{name} must be a number, got {value!r}")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{name} must be finite, got {value!r}")
                setattr_(self, name, value)
        setattr_(self, "truncate", check_interleaved_like("truncate", self.truncate))
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                setattr_(self, name, _factor_list(name, value))
            elif kind == "longrope":
                raise ValueError(f"rope_type 'longrope' needs {name}")
        p = self.partial_rotary_factor
        if isinstance(p, (bool, str, bytes)) or not isinstance(p, (int, float)):
            raise TypeError(
                f"partial_rotary_factor must be a number in [0, 1], got {p!r}"
            )
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in [0, 1], got {p!r}")
        setattr_(self, "partial_rotary_factor", float(p))
        if kind == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"short_factor and long_factor must have the same length (d/2), got "
                f"{len(self.short_factor)} and {len(self.long_factor)}"
            )

    def scale(self) -> float:
        """``factor``, or ``max_positions / original_max_positions`` (1 without)."""
        if self.factor is not None:
            return self.factor
        if self.max_positions is not None and self.original_max_positions:
            return self.max_positions / self.original_max_positions
        return 1.0


def check_interleaved_like(name: str, value) -> bool:
    """``value`` as a Python bool (``True``/``False`` or a numpy bool), or
    ``TypeError`` naming ``name``."""
    try:
        return check_interleaved(value)
    except TypeError:
        raise TypeError(f"{name} must be True or False, got {value!r}") from None


def as_scaling(scaling) -> RopeScaling | None:
    """``scaling=`` as a :class:`RopeScaling` (from itself or a dict), or ``None``."""
    if scaling is None or isinstance(scaling, RopeScaling):
        return scaling
    if isinstance(scaling, dict):
        return RopeScaling(**scaling)
    raise TypeError(f"scaling must be None, a dict or a RopeScaling, got {scaling!r}")


def check_frequencies(dim, base, scaling) -> tuple[int, float, RopeScaling | None]:
    """``(dim, base, scaling)`` of ``rotary_frequencies`` checked, for every backend:
    ``dim`` an even int >= 2, ``base`` as
    :func:`companion._positions.check_base` returns it (a float > 1), ``scaling`` as
    :func:`companion._positions.as_scaling` returns it."""
    dim = check_length("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim must be even (features rotate in pairs), got {dim}")
    return dim, check_base(base), as_scaling(scaling)


def needs_length(scaling: RopeScaling | None) -> bool:
    """Whether ``scaling``'s frequencies depend on the text's length (dynamic NTK,
    LongRoPE)."""
    return scaling is not None and scaling.rope_type in ("dynamic", "longrope")


def scaled_frequencies(
    base: float, d: int, scaling: RopeScaling, seq_len: int | None = None
) -> tuple[list[float], float]:
    r"""``(theta, attention_factor)``: the ``d/2`` rotary frequencies under
    ``scaling`` (Python floats, float64) and the factor that multiplies the rotated
    features.

    ``seq_len`` is the length of the text (the largest position + 1) for the rules
    that depend on it (``"dynamic"``, ``"longrope"``); ``None`` means at most the
    original length. The formulas are Hugging Face's ``ROPE_INIT_FUNCTIONS``
    (transformers 5), computed in float64.
    """
    base = check_base(base)
    if d < 2 or d % 2:
        raise ValueError(f"the rotated width must be even and >= 2, got {d}")
    if seq_len is not None:
        seq_len = check_length("seq_len", seq_len, 0)
    kind = scaling.rope_type
    half = d // 2
    exponents = [2 * i / d for i in range(half)]  # (d/2,): 2i/d

    def plain(b: float) -> list[float]:
        return [1.0 / b**e for e in exponents]

    if kind in ("ntk", "dynamic") and d == 2:
        raise ValueError(
            f"rope_type {kind!r} raises the base to d/(d-2): the rotated width must "
            "be at least 4, got 2"
        )
    n0 = scaling.original_max_positions
    if kind == "linear":
        return [t / scaling.factor for t in plain(base)], 1.0
    if kind == "ntk":
        return plain(base * scaling.factor ** (d / (d - 2))), 1.0
    if kind == "dynamic":
        n = n0 if seq_len is None else max(seq_len, n0)
        s = scaling.factor
        return plain(base * ((s * n / n0) - (s - 1)) ** (d / (d - 2))), 1.0
    if kind == "yarn":
        return _yarn(base, d, scaling)
    if kind == "llama3":
        return _llama3(base, d, scaling), 1.0
    if kind == "proportional":
        # HF: int(p * head_dim // 2) rotated pairs, the rest frequency 0, all / factor
        rotated = int(scaling.partial_rotary_factor * d // 2)
        s = scaling.scale()
        theta = [t / s if i < rotated else 0.0 for i, t in enumerate(plain(base))]
        return theta, 1.0
    # longrope
    if len(scaling.short_factor) != half:
        raise ValueError(
            f"short_factor and long_factor need one factor per rotated pair, d/2 = "
            f"{half}, got {len(scaling.short_factor)}"
        )
    s = scaling.scale()
    factor = scaling.attention_factor
    if factor is None:
        factor = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(n0))
    long = seq_len is not None and seq_len > n0
    ext = scaling.long_factor if long else scaling.short_factor
    return [1.0 / (f * base**e) for f, e in zip(ext, exponents)], factor


def _yarn(base: float, d: int, scaling: RopeScaling) -> tuple[list[float], float]:
    """YaRN's frequencies and attention factor (Peng et al. 2023; HF's formula)."""
    s = scaling.scale()

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling.attention_factor
    if factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            factor = mscale(s, scaling.mscale) / mscale(s, scaling.mscale_all_dim)
        else:
            factor = mscale(s)
    n0 = scaling.original_max_positions

    def correction_dim(rotations: float) -> float:
        # the pair index whose wavelength fits ``rotations`` times into n0
        return (d * math.log(n0 / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no singular ramp
    theta = []
    for i in range(d // 2):
        wave = base ** (2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # 1: extrapolate (fast pairs), 0: interpolate
        theta.append((1.0 / (s * wave)) * (1.0 - keep) + (1.0 / wave) * keep)
    return theta, factor


def _llama3(base: float, d: int, scaling: RopeScaling) -> list[float]:
    """Llama 3.1's frequency-dependent rule (HF's formula)."""
    s, n0 = scaling.factor, scaling.original_max_positions
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    low_wavelength, high_wavelength = n0 / lo, n0 / hi
    theta = []
    for i in range(d // 2):
        t = 1.0 / base ** (2 * i / d)
        wavelength = 2 * math.pi / t
        scaled = t / s if wavelength > low_wavelength else t
        if not wavelength < high_wavelength and not wavelength > low_wavelength:
            smooth = (n0 / wavelength - lo) / (hi - lo)
            scaled = (1 - smooth) * scaled / s + smooth * scaled
        theta.append(scaled)
    return theta


# --- T5's relative position buckets --------------------------------------------------


def check_t5_buckets(
    bidirectional, num_buckets, max_distance
) -> tuple[bool, int, int, int]:
    """``(bidirectional, n, max_exact, max_distance)`` for T5's buckets: ``n`` buckets
    per direction (half of ``num_buckets`` when bidirectional), ``max_exact = n // 2``
    of them exact; ``ValueError`` naming the argument when the log-spaced buckets
    would be empty or undefined."""
    bidirectional = check_interleaved_like("bidirectional", bidirectional)
    smallest = 4 if bidirectional else 2
    num_buckets = _checks.check_int("num_buckets", num_buckets, smallest)
    n = num_buckets // 2 if bidirectional else num_buckets
    max_exact = n // 2
    max_distance = _checks.check_int("max_distance", max_distance, 1)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be larger than the {max_exact} exact buckets of "
            f"num_buckets={num_buckets}, got {max_distance}"
        )
    return bidirectional, n, max_exact, max_distance


def t5_table_buckets(table_shape, L, S, bidirectional, max_distance) -> np.ndarray:
    """T5's buckets, int64 ``(L, S)``, for ``t5_bias``'s ``table (num_buckets, H)``
    of shape ``table_shape``, for every backend; ``ValueError`` unless that shape has
    two axes (then the checks of :func:`companion._positions.t5_position_buckets`)."""
    shape = tuple(table_shape)
    if len(shape) != 2:
        raise ValueError(f"table must have shape (num_buckets, H), got shape {shape}")
    return t5_position_buckets(L, S, bidirectional, int(shape[0]), max_distance)


def t5_position_buckets(L, S, bidirectional, num_buckets, max_distance) -> np.ndarray:
    """T5's buckets, int64 ``(L, S)``, for every backend: they depend on the shapes
    only, so they are computed once here and each backend wraps the array (see
    :func:`companion.numpy.t5_position_buckets`)."""
    L = check_length("L", L, 0)
    S = check_length("S", S, 0)
    bidirectional, n, max_exact, max_distance = check_t5_buckets(
        bidirectional, num_buckets, max_distance
    )
    # [book: t5 buckets]
    # (L, S): key position - query position
    relative = np.arange(S)[None, :] - (np.arange(L)[:, None] + (S - L))
    buckets = np.zeros(relative.shape, dtype=np.int64)  # (L, S)
    if bidirectional:
        buckets += (relative > 0).astype(np.int64) * n
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    # (L, S): log-spaced buckets; log(0) never reaches the result (is_small below)
    ratio = np.maximum(distance, 1) / max_exact
    large = max_exact + (
        np.log(ratio) / math.log(max_distance / max_exact) * (n - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, n - 1)
    return buckets + np.where(distance < max_exact, distance, large)  # (L, S)
    # [/book: t5 buckets]
