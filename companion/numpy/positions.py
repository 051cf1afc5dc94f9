r"""Position information for attention: sinusoidal tables, rotary embeddings, ALiBi.

Attention by itself is permutation-equivariant: permute the tokens and the outputs
permute with them. Three ways to tell it where each token is:

* :func:`sinusoidal_positions`: a fixed table added to the token embeddings
  (Vaswani et al. 2017), interleaved ``sin, cos, sin, cos, ...``;
* :func:`rotary_embedding`: rotate each pair of query/key features by an angle
  proportional to the token's position (RoPE, Su et al. 2021), so that the score of a
  query at ``m`` and a key at ``n`` depends on the positions only through ``m - n``;
* :func:`alibi_slopes` and :func:`alibi_bias`: no embedding at all, a penalty
  ``-m_h |i - j|`` added to the scores (ALiBi, Press et al. 2022), usable as the float
  ``mask`` of every attention function.

These numpy float64 versions are the oracle for the torch and TensorFlow namespaces.

Explained in the book chapter *Positions and the transformer block*.
"""

from __future__ import annotations

import numpy as np

from companion import _checks, _positions
from companion._positions import RopeScaling, RotaryConfig

__all__ = [
    "sinusoidal_positions",
    "rotary_embedding",
    "rotary_frequencies",
    "alibi_slopes",
    "alibi_bias",
    "t5_position_buckets",
    "t5_bias",
    "RotaryConfig",
    "RopeScaling",
]


def _output_dtype(dtype) -> np.dtype:
    """``dtype`` (default float64) as a floating numpy dtype, or ``TypeError``."""
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    _checks.check_float("dtype", dtype)
    return dtype


def sinusoidal_positions(length: int, dim: int, *, base: float = 10000.0, dtype=None):
    r"""The sinusoidal position table of Vaswani et al. (2017), interleaved.

    .. math::

        PE[p, 2i] = \sin\!\big(p / \text{base}^{2i/\text{dim}}\big), \qquad
        PE[p, 2i+1] = \cos\!\big(p / \text{base}^{2i/\text{dim}}\big)

    Each pair ``(2i, 2i+1)`` is a point on a circle turning with frequency
    ``base^(-2i/dim)``; moving ``k`` positions on is a rotation of every pair, a linear
    map that depends on ``k`` only. An odd ``dim`` ends with a sine column.

    Parameters
    ----------
    length, dim : int
        Rows (positions ``0 .. length-1``, ``length >= 0``) and columns (``dim >= 1``).
    base : float
        The longest wavelength is ``2 pi base``.
    dtype : optional
        Output dtype (default float64); computed in float64.

    Returns
    -------
    ``(length, dim)``
    """
    length = _positions.check_length("length", length, 0)
    dim = _positions.check_length("dim", dim, 1)
    base = _positions.check_base(base)
    dtype = _output_dtype(dtype)
    column = np.arange(dim)  # (dim,)
    # base^(-2i/dim) for the pair i = column // 2
    frequency = base ** (-2.0 * (column // 2) / dim)  # (dim,)
    angle = np.arange(length, dtype=np.float64)[:, None] * frequency  # (length, dim)
    table = np.where(column % 2 == 0, np.sin(angle), np.cos(angle))  # (length, dim)
    return table.astype(dtype)


def _integer_positions(positions, x_shape) -> np.ndarray:
    """``positions`` as an integer array that broadcasts to ``x``'s ``(..., L)``."""
    _positions.check_position_values(positions)
    positions = np.asarray(positions)
    _positions.check_positions(positions.shape, positions.dtype.name, x_shape)
    return positions


def rotary_embedding(
    x,
    positions,
    *,
    base: float = 10000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    scaling=None,
    seq_len: int | None = None,
):
    r"""Rotate feature pairs of ``x (..., L, D)`` by angles proportional to position.

    Pair ``i`` (``i = 0 .. d/2 - 1``, ``d = rotary_dim``) of the token at position ``p``
    is read as the complex number :math:`z_i = x_{a(i)} + \mathrm{i}\, x_{b(i)}` and
    multiplied by :math:`e^{\mathrm{i} p \theta_i}` with
    :math:`\theta_i = \text{base}^{-2i/d}`:

    .. math::

        \begin{pmatrix} y_{a} \\ y_{b} \end{pmatrix} =
        \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\
                        \sin p\theta_i & \cos p\theta_i \end{pmatrix}
        \begin{pmatrix} x_{a} \\ x_{b} \end{pmatrix}

    Since :math:`\mathrm{Re}(q e^{\mathrm{i} m\theta}\,
    \overline{k e^{\mathrm{i} n\theta}}) = \mathrm{Re}(q \bar k
    e^{\mathrm{i}(m-n)\theta})`, the score of a query rotated at
    ``m`` and a key rotated at ``n`` depends on the positions only through ``m - n``.

    The two layouts in use pair different features, the same rotation up to a fixed
    permutation of the features::

        interleaved=False  (a, b) = (i, i + d/2)   GPT-NeoX, HF Llama (rotate_half)
        interleaved=True   (a, b) = (2i, 2i + 1)   RoFormer, GPT-J, Meta's Llama

    Parameters
    ----------
    x : ``(..., L, D)``, floating
        Queries or keys, e.g. ``(B, H, L, D)``.
    positions : integers, ``(L,)`` or broadcastable to ``(..., L)``
        The absolute position of each token (with a KV cache, the new tokens start at
        ``cache.seen``).
    base : float
    interleaved : bool
    rotary_dim : int, optional
        Rotate only the first ``rotary_dim`` features (even, at most ``D``; partial
        rotary as in GPT-NeoX); the rest pass through. Default ``D``, which must be
        even.
    scaling : :class:`RopeScaling` or dict, optional
        Longer than training: the frequencies of :func:`rotary_frequencies`, and the
        rotated features multiplied by its attention factor (as Hugging Face
        multiplies ``cos`` and ``sin``). Default ``None``: unscaled.
    seq_len : int, optional
        The text's length for the rules that depend on it (``"dynamic"``,
        ``"longrope"``); default the largest position + 1.

    Returns
    -------
    ``(..., L, D)``, the dtype of ``x`` (float16 computed in float32; the angles in
    float64).
    """
    x = np.asarray(x)
    _checks.check_float("x", x.dtype)
    D, d = _positions.rotary_dims(x.shape, rotary_dim)
    positions = _integer_positions(positions, x.shape)
    base = _positions.check_base(base)
    interleaved = _positions.check_interleaved(interleaved)
    dtype = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    scaling, factor = _positions.as_scaling(scaling), 1.0
    if scaling is not None:
        if seq_len is None and _positions.needs_length(scaling) and positions.size:
            seq_len = int(positions.max()) + 1
        scaled, factor = rotary_frequencies(
            d, base=base, scaling=scaling, seq_len=seq_len
        )
    # [book: rotary core]
    theta = base ** (-2.0 * np.arange(d // 2) / d)  # (d/2,): theta_i
    if scaling is not None:  # longer than training: see rotary_frequencies
        theta = scaled  # (d/2,)
    angle = positions[..., None].astype(np.float64) * theta  # (..., L, d/2): p theta_i
    cos, sin = np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)
    xc = x.astype(dtype, copy=False)
    if interleaved:
        x_a, x_b = xc[..., 0:d:2], xc[..., 1:d:2]  # (..., L, d/2) each
    else:
        x_a, x_b = xc[..., : d // 2], xc[..., d // 2 : d]  # (..., L, d/2) each
    y_a = x_a * cos - x_b * sin  # (..., L, d/2): Re(z e^{i p theta})
    y_b = x_b * cos + x_a * sin  # (..., L, d/2): Im(z e^{i p theta})
    if interleaved:
        rotated = np.stack([y_a, y_b], axis=-1).reshape(*y_a.shape[:-1], d)
    else:
        rotated = np.concatenate([y_a, y_b], axis=-1)  # (..., L, d)
    # (..., L, D): the features past rotary_dim pass through
    out = np.concatenate([rotated, xc[..., d:]], axis=-1)
    # [/book: rotary core]
    if factor != 1.0:  # YaRN's and LongRoPE's attention factor: rotated features
        out = np.concatenate([out[..., :d] * factor, out[..., d:]], axis=-1)
    return out.astype(x.dtype, copy=False)


def rotary_frequencies(
    dim: int,
    *,
    base: float = 10000.0,
    scaling=None,
    seq_len: int | None = None,
    dtype=None,
):
    r"""The rotary frequencies ``theta (dim/2,)`` and the attention factor.

    Unscaled, :math:`\theta_i = \text{base}^{-2i/d}` and the factor is 1. With a
    ``scaling`` (:class:`RopeScaling` or a dict of its fields) the rule of its
    ``rope_type`` (linear, ntk, dynamic, yarn, llama3, longrope, proportional), equal
    to Hugging Face's ``ROPE_INIT_FUNCTIONS`` in float64. ``seq_len`` is the text's
    length for ``"dynamic"`` and ``"longrope"`` (default: within the original
    length).

    Returns
    -------
    ``(theta, attention_factor)``: an array ``(dim/2,)`` (default float64) and a
    Python float.
    """
    dim, base, scaling = _positions.check_frequencies(dim, base, scaling)
    dtype = _output_dtype(dtype)
    if scaling is None:
        theta, factor = base ** (-2.0 * np.arange(dim // 2) / dim), 1.0
    else:
        theta, factor = _positions.scaled_frequencies(base, dim, scaling, seq_len)
    return np.asarray(theta, dtype=np.float64).astype(dtype), float(factor)


def alibi_slopes(num_heads: int, *, dtype=None):
    r"""ALiBi's slope per head (Press et al. 2022): ``(H,)``.

    For ``H`` a power of two, :math:`m_h = 2^{-8(h+1)/H}` (``2^-1 .. 2^-8`` for 8
    heads); otherwise the paper's rule: the slopes of the largest power of two below
    ``H``, then every other slope of twice that many. Default dtype float64.
    """
    dtype = _output_dtype(dtype)
    return np.array(_positions.alibi_slope_list(num_heads), dtype=dtype)  # (H,)


def alibi_bias(num_heads: int, L: int, S: int, *, dtype=None):
    r"""ALiBi's additive bias ``(H, L, S)``: :math:`-m_h\,|i + (S - L) - j|`.

    Query ``i`` sits at position ``i + (S - L)``, bottom-right aligned like
    :func:`companion.numpy.causal_mask`, so the last query is level with the last key
    (the convention that decoding with a KV cache needs). The bias is a float ``mask``
    for every attention function (added to the scaled scores). It is symmetric in the
    distance; a causal model passes ``causal=True`` as well, and then only the
    penalties ``-m_h (i + S - L - j)`` of visible keys matter::

        alibi_bias(1, 3, 3) / m     alibi_bias(1, 2, 4) / m
         0 -1 -2                    -2 -1  0 -1
        -1  0 -1                    -3 -2 -1  0
        -2 -1  0

    Default dtype float64.
    """
    L = _positions.check_length("L", L, 0)
    S = _positions.check_length("S", S, 0)
    slopes = alibi_slopes(num_heads, dtype=np.float64)  # (H,)
    # (L, S): |query position - key position|
    distance = np.abs(np.arange(L)[:, None] + (S - L) - np.arange(S)[None, :])
    bias = slopes[:, None, None] * (0.0 - distance)  # (H, L, S), never -0.0
    return bias.astype(_output_dtype(dtype))


def _rotate_queries_and_keys(q, k, rope: RotaryConfig, start: int):
    """``q (B, H, L, D)`` and new ``k (B, H_kv, S_new, D)`` rotated where they sit.

    The keys sit at ``start`` (``cache.seen``) on, the queries are the last ``L`` of
    them (see :func:`companion._positions.rotary_positions`).
    """
    queries, keys = _positions.rotary_positions(q.shape[-2], k.shape[-2], start)
    kwargs = dict(
        base=rope.base, interleaved=rope.interleaved, rotary_dim=rope.rotary_dim
    )
    if rope.scaling is not None:  # the length so far: dynamic NTK and LongRoPE
        kwargs.update(scaling=rope.scaling, seq_len=keys.stop)
    q = rotary_embedding(q, np.arange(queries.start, queries.stop), **kwargs)
    k = rotary_embedding(k, np.arange(keys.start, keys.stop), **kwargs)
    return q, k  # (B, H, L, D), (B, H_kv, S_new, D)


def t5_position_buckets(
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
):
    r"""T5's bucket of each (query, key) pair: integers ``(L, S)`` in
    ``0 .. num_buckets - 1``.

    The relative position is :math:`r = j - (i + S - L)` (key minus query; queries
    bottom-right aligned as in :func:`alibi_bias`). Bidirectional (the encoder) gives
    half the buckets to keys after the query; causal (the decoder) sees only
    :math:`r \le 0`. Of a half of ``n`` buckets, distances below ``n/2`` get a bucket
    each; longer ones share logarithmically wider buckets up to ``max_distance``,
    beyond which all share the last (Raffel et al. 2020; HF's
    ``T5Attention._relative_position_bucket``).
    """
    return _positions.t5_position_buckets(
        L, S, bidirectional, num_buckets, max_distance
    )


def t5_bias(
    table,
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
):
    r"""T5's relative position bias ``(H, L, S)`` from a learned ``table
    (num_buckets, H)``.

    One table per attention stack, one column per head: computed once and added, as
    the float ``mask`` of every attention function, to the scores of every layer (the
    layers share it: ``num_buckets * H`` parameters in all, however deep the model).
    ``bias[h, i, j] = table[bucket(i, j), h]`` with the buckets of
    :func:`t5_position_buckets` (``num_buckets = table.shape[0]``). Returned in the
    dtype of ``table``.
    """
    table = np.asarray(table)
    _checks.check_float("table", table.dtype)
    buckets = _positions.t5_table_buckets(
        table.shape, L, S, bidirectional, max_distance
    )  # (L, S)
    return np.moveaxis(table[buckets], -1, 0)  # (H, L, S)
