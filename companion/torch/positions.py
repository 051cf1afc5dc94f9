r"""Position information for attention in torch: sinusoidal, rotary (RoPE), ALiBi.

The same functions as :mod:`companion.numpy.positions` (the float64 oracle), for torch
tensors on any device: :func:`rotary_embedding` works on the device of ``x``; the
tables are created on the CPU (move them with ``.to(device)``, or register them as a
module buffer). Default dtype ``torch.get_default_dtype()``; everything is computed in
float64 and cast once.

Explained in the book chapter *Positions and the transformer block*.
"""

from __future__ import annotations

import torch

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

_HALF = (torch.float16, torch.bfloat16)


def _output_dtype(dtype) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    _checks.check_float("dtype", dtype)
    return dtype


def sinusoidal_positions(length: int, dim: int, *, base: float = 10000.0, dtype=None):
    r"""Vaswani et al.'s table ``(length, dim)``, interleaved.

    ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.
    See :func:`companion.numpy.sinusoidal_positions`.
    """
    length = _positions.check_length("length", length, 0)
    dim = _positions.check_length("dim", dim, 1)
    base = _positions.check_base(base)
    dtype = _output_dtype(dtype)
    column = torch.arange(dim)  # (dim,)
    pair = torch.div(column, 2, rounding_mode="floor").to(torch.float64)  # (dim,): i
    exponent = -2.0 * pair / dim  # (dim,)
    frequency = torch.pow(torch.tensor(base, dtype=torch.float64), exponent)  # (dim,)
    # (length, dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * frequency
    table = torch.where(column % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype)  # (length, dim)


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
    r"""Rotate pairs of features of ``x (..., L, D)`` by ``p * base^(-2i/d)``.

    ``interleaved=False`` pairs ``i`` with ``i + d/2`` (GPT-NeoX, HF Llama); ``True``
    pairs ``2i`` with ``2i + 1`` (RoFormer, GPT-J, Meta's Llama); ``rotary_dim``
    rotates only the first ``d`` features; ``scaling`` (a :class:`RopeScaling` or a
    dict) stretches it for texts longer than training (``seq_len``: the text's length
    for dynamic NTK and LongRoPE, default the largest position + 1). Differentiable.
    See :func:`companion.numpy.rotary_embedding`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _checks.check_float("x", x.dtype)
    D, d = _positions.rotary_dims(x.shape, rotary_dim)
    _positions.check_position_values(positions)
    positions = torch.as_tensor(positions, device=x.device)
    _positions.check_positions(
        positions.shape, _checks.dtype_name(positions.dtype), x.shape
    )
    base = _positions.check_base(base)
    interleaved = _positions.check_interleaved(interleaved)
    dtype = torch.float32 if x.dtype in _HALF else x.dtype
    scaling, factor = _positions.as_scaling(scaling), 1.0
    if scaling is None:
        exponent = -2.0 * torch.arange(d // 2, dtype=torch.float64, device=x.device) / d
        theta = torch.pow(torch.tensor(base, dtype=torch.float64), exponent)  # (d/2,)
    else:
        if seq_len is None and _positions.needs_length(scaling) and positions.numel():
            seq_len = int(positions.max()) + 1
        theta, factor = _positions.scaled_frequencies(base, d, scaling, seq_len)
        theta = torch.tensor(theta, dtype=torch.float64, device=x.device)  # (d/2,)
    # (..., L, d/2): p theta_i
    angle = positions[..., None].to(torch.float64) * theta
    cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    xc = x.to(dtype)
    if interleaved:
        x_a, x_b = xc[..., 0:d:2], xc[..., 1:d:2]  # (..., L, d/2) each
    else:
        x_a, x_b = xc[..., : d // 2], xc[..., d // 2 : d]  # (..., L, d/2) each
    y_a = x_a * cos - x_b * sin  # (..., L, d/2): Re(z e^{i p theta})
    y_b = x_b * cos + x_a * sin  # (..., L, d/2): Im(z e^{i p theta})
    if interleaved:
        rotated = torch.stack([y_a, y_b], dim=-1).flatten(-2)  # (..., L, d)
    else:
        rotated = torch.cat([y_a, y_b], dim=-1)  # (..., L, d)
    if factor != 1.0:  # YaRN's and LongRoPE's attention factor: rotated features
        rotated = rotated * factor
    out = torch.cat([rotated, xc[..., d:]], dim=-1)  # (..., L, D)
    return out.to(x.dtype)


def rotary_frequencies(
    dim: int,
    *,
    base: float = 10000.0,
    scaling=None,
    seq_len: int | None = None,
    dtype=None,
):
    r"""``(theta (dim/2,), attention_factor)``: the rotary frequencies, scaled by
    ``scaling`` as Hugging Face's ``ROPE_INIT_FUNCTIONS`` do (computed in float64, on
    the CPU). See :func:`companion.numpy.rotary_frequencies`."""
    dim, base, scaling = _positions.check_frequencies(dim, base, scaling)
    dtype = _output_dtype(dtype)
    if scaling is None:
        exponent = -2.0 * torch.arange(dim // 2, dtype=torch.float64) / dim
        theta = torch.pow(torch.tensor(base, dtype=torch.float64), exponent)
        return theta.to(dtype), 1.0
    theta, factor = _positions.scaled_frequencies(base, dim, scaling, seq_len)
    return torch.tensor(theta, dtype=torch.float64).to(dtype), float(factor)


def alibi_slopes(num_heads: int, *, dtype=None):
    r"""ALiBi's slope per head ``(H,)``; ``2^-1 .. 2^-8`` for 8 heads.

    See :func:`companion.numpy.alibi_slopes`."""
    slopes = _positions.alibi_slope_list(num_heads)
    return torch.tensor(slopes, dtype=torch.float64).to(_output_dtype(dtype))


def alibi_bias(num_heads: int, L: int, S: int, *, dtype=None):
    r"""ALiBi's float mask ``(H, L, S)``: ``-m_h |i + (S - L) - j|`` (bottom-right).

    See :func:`companion.numpy.alibi_bias`."""
    L = _positions.check_length("L", L, 0)
    S = _positions.check_length("S", S, 0)
    slopes = alibi_slopes(num_heads, dtype=torch.float64)  # (H,)
    query = torch.arange(L, dtype=torch.float64)[:, None] + (S - L)  # (L, 1)
    distance = (query - torch.arange(S, dtype=torch.float64)[None, :]).abs()  # (L, S)
    bias = slopes[:, None, None] * (0.0 - distance)  # (H, L, S), never -0.0
    return bias.to(_output_dtype(dtype))


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
    q = rotary_embedding(
        q, torch.arange(queries.start, queries.stop, device=q.device), **kwargs
    )
    k = rotary_embedding(
        k, torch.arange(keys.start, keys.stop, device=q.device), **kwargs
    )
    return q, k  # (B, H, L, D), (B, H_kv, S_new, D)


def t5_position_buckets(
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
):
    r"""T5's bucket of each (query, key) pair: int64 ``(L, S)``, on the CPU.

    Queries bottom-right aligned (query ``i`` at ``i + S - L``). See
    :func:`companion.numpy.t5_position_buckets`."""
    buckets = _positions.t5_position_buckets(
        L, S, bidirectional, num_buckets, max_distance
    )
    return torch.from_numpy(buckets)  # (L, S)


def t5_bias(
    table,
    L: int,
    S: int,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
):
    r"""T5's relative position bias ``(H, L, S)`` from ``table (num_buckets, H)``
    (e.g. an ``nn.Embedding``'s weight): computed once, the float ``mask`` of every
    layer. Differentiable in ``table``; on its device, in its dtype. See
    :func:`companion.numpy.t5_bias`."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    _checks.check_float("table", table.dtype)
    buckets = torch.from_numpy(
        _positions.t5_table_buckets(table.shape, L, S, bidirectional, max_distance)
    ).to(table.device)  # (L, S)
    return table[buckets].permute(2, 0, 1)  # (H, L, S)
