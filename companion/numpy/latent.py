r"""Multi-head latent attention (MLA, DeepSeek-V2) in numpy: the cache holds one latent.

DeepSeek-AI (2024), section 2.1. For the token ``t`` with input ``h_t`` (width ``E``):

.. math::

    c^{KV}_t = h_t W^{DKV}, \quad
    k^C_{t,i} = c^{KV}_t W^{UK}_i, \quad
    v^C_{t,i} = c^{KV}_t W^{UV}_i, \quad
    k^R_t = \operatorname{RoPE}(h_t W^{KR})

    c^Q_t = h_t W^{DQ}, \quad
    q^C_{t,i} = c^Q_t W^{UQ}_i, \quad
    q^R_{t,i} = \operatorname{RoPE}(c^Q_t W^{QR}_i)

    o_{t,i} = \sum_j \operatorname{softmax}_j\Big(
        \frac{q^C_{t,i} \cdot k^C_{j,i} + q^R_{t,i} \cdot k^R_j}
             {\sqrt{d_h + d^R_h}}\Big) v^C_{j,i}, \qquad
    u_t = [o_{t,1}, \dots, o_{t,H}]\, W^O

Every head's keys and values come from one latent :math:`c^{KV}_t` of width
``d_c``; the rotary part of the key, :math:`k^R_t` of width ``d_h^R``, is one for all
heads ("decoupled", because RoPE cannot pass through :math:`W^{UK}`). The cache keeps
only :math:`(c^{KV}_t, k^R_t)`: ``d_c + d_h^R`` numbers per token and layer, against
``2 H d_h`` for multi-head attention.

*Absorbed* form (the paper's remark that :math:`W^{UK}` can be absorbed into
:math:`W^{UQ}` and :math:`W^{UV}` into :math:`W^O`):
:math:`q^C_{t,i} \cdot k^C_{j,i} = (c^Q_t W^{UQ}_i {W^{UK}_i}^\top) \cdot c^{KV}_j`
and :math:`o_{t,i} W^O_i = (\sum_j p_{tj,i}\, c^{KV}_j)\, W^{UV}_i W^O_i`, so attention
runs on the latents themselves: multi-query attention with keys
:math:`[c^{KV}_j; k^R_j]` (width ``d_c + d_h^R``) and values :math:`c^{KV}_j` (width
``d_c``), and no key or value is ever expanded per head.

DeepSeek-V2 and V3 also normalise both latents (an RMS norm with a learned gain on
:math:`c^Q_t` before :math:`W^{UQ}, W^{QR}`, and on :math:`c^{KV}_t` before
:math:`W^{UK}, W^{UV}`). This package leaves both norms out: its layer is MLA without
them. The gains alone could be folded into the rows of the up-projections, but the
division of each token's latent by its own RMS cannot, so a DeepSeek layer and this
function with the same weights give different outputs. What the book measures holds
with or without the norms: the cache size, and absorbed attention equal to the
expanded form (a norm acts per token on the latent, before any up-projection).
Explained in the book chapter *Long context*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from companion import _checks
from companion._kvcache import (
    check_some_keys,
    unchanged_on_error,
    window_for_cache,
)
from companion._latent import band as _band
from companion._latent import split_absorbed
from companion.numpy.attention import (
    _check_flag,
    _compute_dtype,
    scaled_dot_product_attention_reference,
)
from companion.numpy.multihead import KVCache
from companion.numpy.positions import rotary_embedding

__all__ = [
    "LatentAttentionParams",
    "latent_attention",
    "kv_cache_elements_per_token",
]


@dataclass
class LatentAttentionParams:
    r"""The weights of one MLA layer, applied as ``y = x @ W`` (no biases).

    numpy arrays (the torch version converts them), or torch tensors for
    :func:`companion.torch.latent_attention`.

    ==========  ==========================  ============================================
    field       shape                       role
    ==========  ==========================  ============================================
    ``w_dq``    ``(E, d_c')`` or None       query down-projection (None: queries from x)
    ``w_uq``    ``(d_c' or E, H * d_h)``    query up-projection (no position)
    ``w_qr``    ``(d_c' or E, H * d_h^R)``  the queries' rotary part
    ``w_dkv``   ``(E, d_c)``                the shared latent ``c^KV``
    ``w_uk``    ``(d_c, H * d_h)``          keys from the latent
    ``w_uv``    ``(d_c, H * d_v)``          values from the latent
    ``w_kr``    ``(E, d_h^R)``              the rotary key, one for all heads
    ``w_o``     ``(H * d_v, E_out)``        output projection
    ==========  ==========================  ============================================
    """

    w_dq: np.ndarray | None
    w_uq: np.ndarray
    w_qr: np.ndarray
    w_dkv: np.ndarray
    w_uk: np.ndarray
    w_uv: np.ndarray
    w_kr: np.ndarray
    w_o: np.ndarray
    num_heads: int

    def __post_init__(self):
        H = _checks.check_int("num_heads", self.num_heads)
        names = ("w_dq", "w_uq", "w_qr", "w_dkv", "w_uk", "w_uv", "w_kr", "w_o")
        for name in names:
            w = getattr(self, name)
            if w is None and name == "w_dq":
                continue
            if not hasattr(w, "shape"):  # nested lists: a float array
                try:
                    w = np.asarray(w, dtype=float)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"{name} must be a 2-D array (in, out), got {type(w).__name__}"
                    ) from None
                setattr(self, name, w)
            if getattr(w, "ndim", None) != 2:
                raise ValueError(
                    f"{name} must be a 2-D array (in, out), got shape {tuple(w.shape)}"
                )
        E = self.w_dkv.shape[0]
        q_in = E if self.w_dq is None else self.w_dq.shape[1]
        d_c = self.w_dkv.shape[1]
        expected = {
            "w_uq": (q_in, None),
            "w_qr": (q_in, None),
            "w_uk": (d_c, None),
            "w_uv": (d_c, None),
            "w_kr": (E, None),
        }
        if self.w_dq is not None and self.w_dq.shape[0] != E:
            raise ValueError(f"w_dq {self.w_dq.shape} must read width E = {E}")
        for name, (rows, _) in expected.items():
            w = getattr(self, name)
            if w.shape[0] != rows:
                raise ValueError(f"{name} {w.shape} must have {rows} rows")
        for name in ("w_uq", "w_qr", "w_uk", "w_uv"):
            if getattr(self, name).shape[1] % H:
                raise ValueError(
                    f"{name} {getattr(self, name).shape} must have a multiple of "
                    f"num_heads={H} columns"
                )
        if self.w_uk.shape[1] != self.w_uq.shape[1]:
            raise ValueError(
                f"w_uk {self.w_uk.shape} and w_uq {self.w_uq.shape} must give the same "
                "H * d_h"
            )
        if self.w_qr.shape[1] != H * self.rope_dim:
            raise ValueError(
                f"w_qr {self.w_qr.shape} must have H * d_h^R = {H * self.rope_dim} "
                "columns (d_h^R from w_kr)"
            )
        if self.rope_dim % 2:
            raise ValueError(f"d_h^R = {self.rope_dim} (w_kr) must be even for RoPE")
        if self.w_o.shape[0] != self.w_uv.shape[1]:
            raise ValueError(
                f"w_o {self.w_o.shape} must have H * d_v = {self.w_uv.shape[1]} rows"
            )

    @property
    def head_dim(self) -> int:
        """``d_h``, the non-rotary width of one query/key head."""
        return self.w_uk.shape[1] // self.num_heads

    @property
    def value_head_dim(self) -> int:
        """``d_v``, the width of one value head."""
        return self.w_uv.shape[1] // self.num_heads

    @property
    def latent_dim(self) -> int:
        """``d_c``, the width of the cached latent."""
        return self.w_dkv.shape[1]

    @property
    def rope_dim(self) -> int:
        """``d_h^R``, the width of the decoupled rotary key."""
        return self.w_kr.shape[1]

    @classmethod
    def random(
        cls,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        latent_dim: int,
        rope_dim: int,
        query_latent_dim: int | None = None,
        *,
        seed: int = 0,
        dtype="float64",
    ) -> "LatentAttentionParams":
        """Random weights ``N(0, 1 / fan_in)``; ``d_v = d_h``."""
        rng = np.random.default_rng(seed)

        def normal(rows, cols):
            return (rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(dtype)

        E, H = embed_dim, num_heads
        q_in = E if query_latent_dim is None else query_latent_dim
        return cls(
            w_dq=None if query_latent_dim is None else normal(E, q_in),
            w_uq=normal(q_in, H * head_dim),
            w_qr=normal(q_in, H * rope_dim),
            w_dkv=normal(E, latent_dim),
            w_uk=normal(latent_dim, H * head_dim),
            w_uv=normal(latent_dim, H * head_dim),
            w_kr=normal(E, rope_dim),
            w_o=normal(H * head_dim, E),
            num_heads=H,
        )

    def absorbed(self) -> tuple[np.ndarray, np.ndarray]:
        r"""The folded weights ``(W^{UQ}_i {W^{UK}_i}^T, W^{UV}_i W^O_i)`` per head:
        ``(H, d_c' or E, d_c)`` and ``(H, d_c, E_out)``."""
        H, d_h, d_v = self.num_heads, self.head_dim, self.value_head_dim
        d_c = self.latent_dim
        uq = _permute(self.w_uq.reshape(-1, H, d_h), 1, 0, 2)  # (H, d_c', d_h)
        uk = _permute(self.w_uk.reshape(d_c, H, d_h), 1, 2, 0)  # (H, d_h, d_c)
        uv = _permute(self.w_uv.reshape(d_c, H, d_v), 1, 0, 2)  # (H, d_c, d_v)
        wo = self.w_o.reshape(H, d_v, -1)  # (H, d_v, E_out)
        return uq @ uk, uv @ wo


def _permute(a, *axes):
    """``a`` with its axes reordered: a numpy array or a torch tensor (the weights may
    be either)."""
    return a.permute(*axes) if hasattr(a, "permute") else a.transpose(axes)


def _heads(y: np.ndarray, heads: int) -> np.ndarray:
    """``(B, T, heads * d) -> (B, heads, T, d)``."""
    B, T, width = y.shape
    return y.reshape(B, T, heads, width // heads).transpose(0, 2, 1, 3)


def latent_attention(
    x,
    params: LatentAttentionParams,
    *,
    causal: bool = True,
    cache: KVCache | None = None,
    absorbed: bool = False,
    base: float = 10000.0,
    window: int | None = None,
):
    r"""Multi-head latent self-attention ``(B, L, E) -> (B, L, E_out)``.

    Parameters
    ----------
    x : ``(B, L, E)``
    params : LatentAttentionParams
    causal : bool
        Bottom-right aligned, so that feeding tokens one at a time with a cache equals
        the full sequence.
    cache : KVCache, optional
        Holds the latents ``(B, 1, S, d_c)`` as its keys and the rotary keys
        ``(B, 1, S, d_h^R)`` as its values; the new tokens' positions start at
        ``cache.seen``. A rolling cache (``max_length=W``) keeps the last ``W``
        latents and sets the window.
    absorbed : bool or tuple
        Attend over the latents with the folded weights
        (:meth:`LatentAttentionParams.absorbed`) instead of expanding keys and values
        per head; same result. Pass
        the tuple ``params.absorbed()`` itself to fold once, not at every call.
    base : float
        The RoPE base.
    window : int, optional
        Sliding-window attention, as in :func:`companion.numpy.multi_head_attention`.

    Returns ``(B, L, E_out)`` in ``x``'s dtype (float16 computed in float32).
    """
    causal = _check_flag("causal", causal)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a companion.numpy.KVCache, got {type(cache).__name__}"
        )
    window = window_for_cache(window, cache)
    if not isinstance(params, LatentAttentionParams):
        raise TypeError(
            f"params must be a LatentAttentionParams, got {type(params).__name__}"
        )
    # a flag, or params.absorbed() computed once by the caller
    absorbed, folded = split_absorbed(absorbed, params)
    x = np.asarray(x)
    _checks.check_float("x", x.dtype)
    E = params.w_dkv.shape[0]
    if x.ndim != 3 or x.shape[2] != E:
        raise ValueError(f"x must have shape (B, L, {E}), got shape {x.shape}")
    check_some_keys("x", x.shape[1], cache)  # before the cache changes
    dtype = _compute_dtype(x.dtype)
    h = x.astype(dtype, copy=False)
    B, L, _ = h.shape
    H, d_h, d_R = params.num_heads, params.head_dim, params.rope_dim

    def w(a):
        return np.asarray(a, dtype=dtype)

    start = 0 if cache is None else cache.seen
    positions = np.arange(start, start + L)  # absolute positions of the new tokens
    c_q = h if params.w_dq is None else h @ w(params.w_dq)  # (B, L, d_c')
    # (B, H, L, d_h^R)
    q_r = rotary_embedding(_heads(c_q @ w(params.w_qr), H), positions, base=base)
    # [book: latent core]
    c_kv = (h @ w(params.w_dkv))[:, None]  # (B, 1, L, d_c)
    k_r = rotary_embedding((h @ w(params.w_kr))[:, None], positions, base=base)
    # a call that fails after the append leaves the cache as it was
    with unchanged_on_error(cache):
        if cache is not None:
            # (B, 1, S, d_c), (B, 1, S, d_h^R): the latent and the rotary key only
            c_kv, k_r = cache.append(c_kv.astype(x.dtype), k_r.astype(x.dtype))
            c_kv, k_r = c_kv.astype(dtype), k_r.astype(dtype)
        S = c_kv.shape[2]
        scale = 1.0 / math.sqrt(d_h + d_R)
        if absorbed:
            uqk, uvo = (w(a) for a in (folded or params.absorbed()))
            # (B, H, L, d_c): the query in latent space, c^Q W^UQ_i W^UK_i^T
            q_latent = c_q[:, None] @ uqk[None]
            query = np.concatenate([q_latent, q_r], axis=-1)  # (B, H, L, d_c + d_h^R)
            key = np.concatenate([c_kv, k_r], axis=-1)  # (B, 1, S, d_c + d_h^R)
            # multi-query attention on the latents, the heads folded into the query
            # rows (one key head, as FlashMLA decodes): (B, 1, H L, .)
            rows = query.reshape(B, 1, H * L, query.shape[-1])
            keep = _band(L, S, causal, window)  # (L, S) or None
            if keep is not None:
                keep = np.tile(
                    keep, (H, 1)
                )  # (H L, S): row h L + i is query i of head h
            mixed = scaled_dot_product_attention_reference(
                rows, key, c_kv, mask=keep, scale=scale
            ).reshape(B, H, L, c_kv.shape[-1])  # (B, H, L, d_c)
            out = (mixed @ uvo[None]).sum(axis=1)  # sum_i (B, L, E_out)
            # [/book: latent core]
        else:
            q_c = _heads(c_q @ w(params.w_uq), H)  # (B, H, L, d_h)
            query = np.concatenate([q_c, q_r], axis=-1)  # (B, H, L, d_h + d_h^R)
            k_c = _heads(c_kv[:, 0] @ w(params.w_uk), H)  # (B, H, S, d_h)
            # the rotary key is shared by every head: (B, H, S, d_h + d_h^R)
            key = np.concatenate([k_c, np.broadcast_to(k_r, (B, H, S, d_R))], axis=-1)
            value = _heads(c_kv[:, 0] @ w(params.w_uv), H)  # (B, H, S, d_v)
            heads = scaled_dot_product_attention_reference(
                query, key, value, causal=causal, scale=scale, window=window
            )  # (B, H, L, d_v)
            # (B, L, H * d_v)
            merged = heads.transpose(0, 2, 1, 3).reshape(
                B, L, H * params.value_head_dim
            )
            out = merged @ w(params.w_o)  # (B, L, E_out)
    return out.astype(x.dtype, copy=False)


def kv_cache_elements_per_token(
    attention: str,
    *,
    num_heads: int,
    head_dim: int,
    num_layers: int = 1,
    num_kv_heads: int | None = None,
    latent_dim: int | None = None,
    rope_dim: int | None = None,
) -> int:
    r"""Cached numbers per token, DeepSeek-V2's Table 1.

    ========  ===================================
    ``mha``   ``2 H d_h l``
    ``gqa``   ``2 n_g d_h l`` (``n_g = num_kv_heads``)
    ``mqa``   ``2 d_h l``
    ``mla``   ``(d_c + d_h^R) l``
    ========  ===================================

    Multiply by the bytes of one element for bytes per token.
    """
    H = _checks.check_int("num_heads", num_heads)
    d_h = _checks.check_int("head_dim", head_dim)
    layers = _checks.check_int("num_layers", num_layers)
    if attention == "mha":
        return 2 * H * d_h * layers
    if attention == "gqa":
        if num_kv_heads is None:
            raise ValueError("attention='gqa' needs num_kv_heads (the groups n_g)")
        return 2 * _checks.check_int("num_kv_heads", num_kv_heads) * d_h * layers
    if attention == "mqa":
        return 2 * d_h * layers
    if attention == "mla":
        if latent_dim is None or rope_dim is None:
            raise ValueError("attention='mla' needs latent_dim and rope_dim")
        d_c = _checks.check_int("latent_dim", latent_dim)
        return (d_c + _checks.check_int("rope_dim", rope_dim)) * layers
    raise ValueError(
        f"attention must be 'mha', 'gqa', 'mqa' or 'mla', got {attention!r}"
    )
