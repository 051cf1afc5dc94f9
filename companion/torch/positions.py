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
from companion._positions import RotaryConfig

__all__ = [
    "sinusoidal_positions",
    "rotary_embedding",
    "alibi_slopes",
    "alibi_bias",
    "RotaryConfig",
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
):
    r"""Rotate pairs of features of ``x (..., L, D)`` by ``p * base^(-2i/d)``.

    ``interleaved=False`` pairs ``i`` with ``i + d/2`` (GPT-NeoX, HF Llama); ``True``
    pairs ``2i`` with ``2i + 1`` (RoFormer, GPT-J, Meta's Llama); ``rotary_dim``
    rotates only the first ``d`` features. Differentiable. See
    :func:`companion.numpy.rotary_embedding`.
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
    exponent = -2.0 * torch.arange(d // 2, dtype=torch.float64, device=x.device) / d
    theta = torch.pow(torch.tensor(base, dtype=torch.float64), exponent)  # (d/2,)
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
    out = torch.cat([rotated, xc[..., d:]], dim=-1)  # (..., L, D)
    return out.to(x.dtype)


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
    q = rotary_embedding(
        q, torch.arange(queries.start, queries.stop, device=q.device), **kwargs
    )
    k = rotary_embedding(
        k, torch.arange(keys.start, keys.stop, device=q.device), **kwargs
    )
    return q, k  # (B, H, L, D), (B, H_kv, S_new, D)
