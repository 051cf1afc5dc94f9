r"""Multi-head latent attention (MLA, DeepSeek-V2) in torch.

The same :func:`latent_attention` as :mod:`companion.numpy.latent` (the equations are in
its docstring), for torch tensors on any device; :class:`LatentAttentionParams` is the
numpy class, re-exported, its arrays converted to the input's dtype and device. The
cache is a :class:`companion.torch.KVCache` holding the latents as keys and the rotary
keys as values.

Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from companion import _checks
from companion._kvcache import (
    check_some_keys,
    unchanged_on_error,
    window_for_cache,
)
from companion._latent import band as _band
from companion._latent import split_absorbed
from companion.numpy.latent import (
    LatentAttentionParams,
    kv_cache_elements_per_token,
)
from companion.torch.attention import (
    _check_flag,
    _compute_dtype,
    scaled_dot_product_attention_reference,
)
from companion.torch.multihead import KVCache
from companion.torch.positions import rotary_embedding

__all__ = [
    "LatentAttentionParams",
    "latent_attention",
    "kv_cache_elements_per_token",
]


def _heads(y: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, heads * d) -> (B, heads, T, d)``."""
    B, T, width = y.shape
    return y.reshape(B, T, heads, width // heads).transpose(1, 2)


def latent_attention(
    x: torch.Tensor,
    params: LatentAttentionParams,
    *,
    causal: bool = True,
    cache: KVCache | None = None,
    absorbed: bool = False,
    base: float = 10000.0,
    window: int | None = None,
) -> torch.Tensor:
    r"""Multi-head latent self-attention ``(B, L, E) -> (B, L, E_out)`` (torch).

    See :func:`companion.numpy.latent_attention`.
    """
    causal = _check_flag("causal", causal)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a companion.torch.KVCache, got {type(cache).__name__}"
        )
    window = window_for_cache(window, cache)
    if not isinstance(params, LatentAttentionParams):
        raise TypeError(
            f"params must be a LatentAttentionParams, got {type(params).__name__}"
        )
    # a flag, or params.absorbed() computed once by the caller
    absorbed, folded = split_absorbed(absorbed, params)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _checks.check_float("x", x.dtype)
    E = params.w_dkv.shape[0]
    if x.ndim != 3 or x.shape[2] != E:
        raise ValueError(f"x must have shape (B, L, {E}), got shape {tuple(x.shape)}")
    check_some_keys("x", x.shape[1], cache)  # before the cache changes
    dtype = _compute_dtype(x.dtype)
    h = x.to(dtype)
    B, L, _ = h.shape
    H, d_R = params.num_heads, params.rope_dim

    def w(a):
        if isinstance(a, torch.Tensor):
            return a.to(device=x.device, dtype=dtype)
        return torch.as_tensor(np.asarray(a), device=x.device).to(dtype)

    start = 0 if cache is None else cache.seen
    positions = torch.arange(start, start + L, device=x.device)
    c_q = h if params.w_dq is None else h @ w(params.w_dq)  # (B, L, d_c')
    # (B, H, L, d_h^R)
    q_r = rotary_embedding(_heads(c_q @ w(params.w_qr), H), positions, base=base)
    c_kv = (h @ w(params.w_dkv))[:, None]  # (B, 1, L, d_c)
    k_r = rotary_embedding((h @ w(params.w_kr))[:, None], positions, base=base)
    # a call that fails after the append leaves the cache as it was
    with unchanged_on_error(cache):
        if cache is not None:
            # (B, 1, S, d_c), (B, 1, S, d_h^R): the latent and the rotary key only
            c_kv, k_r = cache.append(c_kv.to(x.dtype), k_r.to(x.dtype))
            c_kv, k_r = c_kv.to(dtype), k_r.to(dtype)
        S = c_kv.shape[2]
        scale = 1.0 / math.sqrt(params.head_dim + d_R)
        if absorbed:
            uqk, uvo = (w(a) for a in (folded or params.absorbed()))
            # (B, H, L, d_c): the query in latent space
            q_latent = c_q[:, None] @ uqk[None]
            query = torch.cat([q_latent, q_r], dim=-1)  # (B, H, L, d_c + d_h^R)
            key = torch.cat([c_kv, k_r], dim=-1)  # (B, 1, S, d_c + d_h^R)
            # multi-query attention on the latents, the heads folded into the query
            # rows (one key head: no broadcast of the keys over H): (B, 1, H L, .)
            rows = query.reshape(B, 1, H * L, query.shape[-1])
            keep = _band(L, S, causal, window)  # (L, S) or None
            if keep is not None:
                keep = torch.as_tensor(keep, device=x.device).repeat(H, 1)  # (H L, S)
            mixed = scaled_dot_product_attention_reference(
                rows, key, c_kv, mask=keep, scale=scale
            ).reshape(B, H, L, c_kv.shape[-1])  # (B, H, L, d_c)
            out = (mixed @ uvo[None]).sum(dim=1)  # sum_i (B, L, E_out)
        else:
            q_c = _heads(c_q @ w(params.w_uq), H)  # (B, H, L, d_h)
            query = torch.cat([q_c, q_r], dim=-1)  # (B, H, L, d_h + d_h^R)
            k_c = _heads(c_kv[:, 0] @ w(params.w_uk), H)  # (B, H, S, d_h)
            # the rotary key is shared by every head: (B, H, S, d_h + d_h^R)
            key = torch.cat([k_c, k_r.expand(B, H, S, d_R)], dim=-1)
            value = _heads(c_kv[:, 0] @ w(params.w_uv), H)  # (B, H, S, d_v)
            heads = scaled_dot_product_attention_reference(
                query, key, value, causal=causal, scale=scale, window=window
            )  # (B, H, L, d_v)
            # (B, L, H * d_v)
            merged = heads.transpose(1, 2).reshape(B, L, H * params.value_head_dim)
            out = merged @ w(params.w_o)  # (B, L, E_out)
    return out.to(x.dtype)
