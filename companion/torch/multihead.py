r"""Multi-head (and grouped-query) attention for torch: a function, a KV cache and an
``nn.Module``.

.. math::

    \operatorname{MHA}(X_q, X_{kv}) = \operatorname{concat}_h\big(
        \operatorname{Attention}(X_q W_q^{(h)},\; X_{kv} W_k^{(g(h))},\;
        X_{kv} W_v^{(g(h))})\big)\, W_o + b_o,
    \qquad g(h) = h \,//\, (H / H_{kv})

The same :func:`multi_head_attention` and :class:`KVCache` as
:mod:`companion.numpy.multihead`, for torch tensors on any device;
:class:`MultiHeadParams` is the numpy namespace's class, re-exported (its arrays are
converted to tensors of the input's dtype and device when used).
:class:`MultiHeadAttention` is the trainable ``torch.nn.Module`` version, loadable from
:class:`MultiHeadParams` and from ``torch.nn.MultiheadAttention``.

Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from companion import _checks, _positions, _sinks
from companion._implementation import TORCH_TILED_FROM_SCORES
from companion._implementation import choose_implementation as _choose_implementation
from companion._kvcache import (
    KVCacheBase,
    check_some_keys,
    unchanged_on_error,
    window_for_cache,
)
from companion.conventions import gqa_group_size
from companion.numpy.multihead import MultiHeadParams
from companion.torch.attention import (
    _as_mask,
    _band,
    _check_flag,
    _check_inputs,
    _compute_dtype,
    _grouped_product,
    attention_tiled,
    attention_weights,
    scaled_dot_product_attention_reference,
    softmax,
)
from companion.torch.positions import _rotate_queries_and_keys

# "auto" takes the tiled kernel from this many scores per head (L * S) on
# (measured crossover, the run cited in companion/_implementation.py)
TILED_FROM_SCORES = TORCH_TILED_FROM_SCORES

__all__ = ["MultiHeadParams", "KVCache", "multi_head_attention", "MultiHeadAttention"]


# --------------------------------------------------------------------------------
# the key/value cache
# --------------------------------------------------------------------------------


class KVCache(KVCacheBase):
    r"""Keys and values of the positions seen so far, for decoding one step at a time
    (torch).

    ``append(key, value)`` with ``key (B, H_kv, S_new, D)``,
    ``value (B, H_kv, S_new, D_v)`` returns every cached
    ``(key (B, H_kv, S, D), value (B, H_kv, S, D_v))``. Storage lives on the device of
    the first appended keys and grows by doubling its capacity along ``S``: appending
    ``n`` tokens one at a time copies ``O(n)`` elements in all (amortised ``O(1)`` per
    token), not the ``O(n^2)`` of re-concatenating every step. ``key`` and ``value`` are
    views of the filled part. Meant for inference (``torch.no_grad``): the storage is
    written in place.

    Explained in the book chapter *Making it fast*.
    """

    def _convert(self, name: str, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        return x

    def _check_compatible(self, key: torch.Tensor) -> None:
        if key.device != self._key.device:
            raise ValueError(f"key is on {key.device}, the cache on {self._key.device}")

    def _empty(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        B, H_kv, _, dim = like.shape
        return like.new_empty((B, H_kv, capacity, dim))  # (B, H_kv, capacity, dim)

    def _write(
        self, storage: torch.Tensor, start: int, stop: int, x: torch.Tensor
    ) -> None:
        storage[:, :, start:stop] = x

    def _view(self, storage: torch.Tensor, length: int) -> torch.Tensor:
        return storage[:, :, :length]


# --------------------------------------------------------------------------------
# the function
# --------------------------------------------------------------------------------


def _as_tensor(array, like: torch.Tensor, dtype: torch.dtype):
    """A weight (numpy array or tensor) as a tensor of ``dtype`` on ``like``'s device;
    ``None`` stays."""
    if array is None:
        return None
    if isinstance(array, torch.Tensor):
        return array.to(device=like.device, dtype=dtype)
    return torch.as_tensor(np.asarray(array), device=like.device).to(dtype)


def _project(x: torch.Tensor, w: torch.Tensor, b, heads: int) -> torch.Tensor:
    """``x @ W + b`` split into heads: ``(B, T, E) -> (B, heads, T, width/heads)``."""
    y = x @ w  # (B, T, heads * D)
    if b is not None:
        y = y + b
    B, T, width = y.shape
    return y.reshape(B, T, heads, width // heads).transpose(1, 2)  # (B, heads, T, D)


IMPLEMENTATIONS = ("auto", "reference", "tiled", "sdpa")


def _check_softcap(name: str, value) -> float | None:
    """``None`` or a finite float ``> 0`` (a cap on the scores or the logits)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be None or a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _choose(
    implementation, L: int, S: int, return_weights: bool, softcap=None, sinks=False
) -> str:
    """The shared choice of kernel, plus ``"sdpa"`` (torch's own fused kernel, torch
    backend only; it never forms the weights). With ``softcap`` only the reference
    forms the scores that the cap bends, with ``sinks`` only the reference forms the
    softmax whose denominator they join: ``"auto"`` takes it, ``"sdpa"`` and
    ``"tiled"`` are refused."""
    if sinks and softcap is not None:
        raise ValueError(
            f"sinks and softcap={softcap} together are not supported (no model we "
            "follow uses both): pass one of them"
        )
    if sinks:
        implementation = _sinks.choose_with_sinks(implementation)
    if softcap is not None and implementation in ("sdpa", "tiled"):
        raise ValueError(
            f"softcap={softcap} bends the scores with tanh, and implementation="
            f"{implementation!r} never forms them: use implementation='reference' "
            "or 'auto' (which then computes the reference)"
        )
    if softcap is not None and implementation == "auto":
        return "reference"
    if isinstance(implementation, str) and implementation == "sdpa":
        if return_weights:
            raise ValueError(
                "implementation='sdpa' never forms the attention weights, so it cannot "
                "return them: use return_weights=False or implementation='reference'"
            )
        return "sdpa"
    if isinstance(implementation, str) and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return _choose_implementation(
        implementation, L, S, return_weights, TILED_FROM_SCORES
    )


def _attention_sdpa(q, k, v, *, mask, causal, window, scale=None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on 4-D ``q (B, H, L, D)``,
    ``k, v (B, H_kv, S, D)`` -> ``(B, H, L, D_v)``, with the package's conventions.

    Grouped heads are read in place (``enable_gqa``). Without mask and window,
    ``is_causal`` is passed only when ``L == S`` (torch's causal mask is top-left
    aligned, ours bottom-right; they agree on the square). Otherwise one additive bias
    ``(B or 1, H or 1, L, S)`` carries the mask, the bottom-right causal band and the
    window; a fully masked query row gets 0, as the reference gives, not NaN.
    """
    shapes = _check_inputs(q, k, v)
    L, S = shapes.L, shapes.S
    gqa = shapes.H != shapes.H_kv
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None and window is None and (not causal or L == S):
        # (B, H, L, D_v)
        return sdpa(q, k, v, is_causal=causal, enable_gqa=gqa, scale=scale)
    compute = _compute_dtype(q.dtype)
    mask = _as_mask(mask, shapes, q.device, compute)
    bias = torch.zeros(L, S, dtype=compute, device=q.device)  # (L, S)
    if mask is not None and mask.dtype == torch.bool:
        bias = bias.masked_fill(~mask, float("-inf"))  # (..., H, L, S)
    elif mask is not None:
        bias = bias + mask  # (..., H, L, S)
    if causal or window is not None:
        visible = _band(0, L, 0, S, L, S, causal, window, q.device)  # (L, S)
        bias = bias.masked_fill(~visible, float("-inf"))
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)  # (..., L, 1): sees nothing
    bias = bias.masked_fill(dead, 0.0)  # finite, so no NaN forward or backward
    while bias.dim() < 4:
        bias = bias[None]
    # (B, H, L, D_v)
    heads = sdpa(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=gqa, scale=scale)
    while dead.dim() < 4:
        dead = dead[None]
    return heads.masked_fill(dead, 0.0)


def _softcapped_attention(q, k, v, *, mask, causal, window, scale, softcap):
    r"""The reference attention with soft-capped scores (Gemma 2, Grok), ``q (B, H, L,
    D)``, ``k, v (B, H_kv, S, D)`` -> ``(B, H, L, D_v)`` and weights ``(B, H, L, S)``.

    .. math:: s = c \tanh(t\, q \cdot k / c), \qquad |s| < c

    The cap ``c`` bends the scaled scores before the mask is added (as Gemma 2 does);
    masked entries stay ``-inf``.
    """
    shapes = _check_inputs(q, k, v)
    compute = _compute_dtype(q.dtype)
    scale = _checks.resolve_scale(scale, shapes.D)
    k_t = k.to(compute).transpose(-1, -2)  # (B, H_kv, D, S)
    # t Q K^T, the group folded into the rows: (B, H, L, S)
    scores = scale * _grouped_product(q.to(compute), k_t, shapes.H_kv)
    scores = softcap * torch.tanh(scores / softcap)  # (B, H, L, S): |s| < c
    mask = _as_mask(mask, shapes, q.device, compute)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask  # a float mask: added to the capped scores
    if causal or window is not None:
        # bottom-right causal and/or the window's band: (L, S)
        visible = _band(
            0, shapes.L, 0, shapes.S, shapes.L, shapes.S, causal, window, q.device
        )
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = softmax(scores, axis=-1)  # (B, H, L, S)
    heads = _grouped_product(probs, v.to(compute), shapes.H_kv)  # (B, H, L, D_v)
    return heads, probs.to(q.dtype)


def _sink_weights(q, k, sinks, *, mask, causal, window, scale):
    """The weights ``(B, H, L, S)`` with one sink logit per head in the softmax's
    denominator (:func:`companion.torch.attention_with_sinks`)."""
    from companion.torch.sinks import _sink_weights  # sinks.py imports KVCache

    return _sink_weights(
        q, k, sinks, mask=mask, causal=causal, scale=scale, window=window
    )


def _multi_head(
    x_q,
    x_k,
    x_v,
    weights,
    num_heads,
    num_kv_heads,
    *,
    mask,
    causal,
    cache,
    return_weights,
    implementation="auto",
    rope=None,
    window=None,
    key_name="x_kv",
    scale=None,
    qk_norm=None,
    softcap=None,
    sinks=None,
):
    """The body shared by :func:`multi_head_attention` and :class:`MultiHeadAttention`.

    ``weights = (w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o)`` as tensors applied
    ``x @ W + b``, already in the compute dtype on the inputs' device; ``key_name``,
    the caller's name for ``x_k`` in errors. ``scale`` replaces ``1/sqrt(D)``;
    ``qk_norm = (q_norm, k_norm)`` normalises each head's queries and keys over ``D``
    before the rotation (Qwen3, Gemma 3); ``softcap`` bends the scores and ``sinks``
    (``(H,)``, a tensor in the compute dtype) adds one logit per head to the softmax's
    denominator (reference path only, see :func:`_choose`).
    """
    w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o = weights
    # checked before the cache changes (the sizes come later)
    _choose(implementation, 0, 0, return_weights, softcap, sinks is not None)
    if sinks is not None:
        _sinks.check_sink_logits(sinks.shape, num_heads)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a companion.torch.KVCache, got {type(cache).__name__}"
        )
    window = window_for_cache(window, cache)
    check_some_keys(key_name, x_k.shape[1], cache)
    compute = w_q.dtype
    q = _project(x_q.to(compute), w_q, b_q, num_heads)  # (B, H, L, D)
    # (B, H_kv, S_new, D)
    k = _project(x_k.to(compute), w_k, b_k, num_kv_heads).to(x_q.dtype)
    # (B, H_kv, S_new, D_v)
    v = _project(x_v.to(compute), w_v, b_v, num_kv_heads).to(x_q.dtype)
    if qk_norm is not None:  # per head, over D: (B, H, L, D), (B, H_kv, S_new, D)
        q, k = qk_norm[0](q), qk_norm[1](k)
    if rope is not None:  # at absolute positions, from cache.seen on
        start = 0 if cache is None else cache.seen
        q, k = _rotate_queries_and_keys(q, k, rope, start)
    # a call that fails after the append (a mask that does not fit every cached
    # position, say) leaves the cache as it was
    with unchanged_on_error(cache):
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H_kv, S, D), (B, H_kv, S, D_v)
        q = q.to(x_q.dtype)
        chosen = _choose(
            implementation,
            q.shape[2],
            k.shape[2],
            return_weights,
            softcap,
            sinks is not None,
        )
        band = dict(mask=mask, causal=causal, window=window, scale=scale)
        if sinks is not None:
            # one logit per head in the denominator: (B, H, L, S), rows sum to < 1
            probs = _sink_weights(q, k, sinks, **band)
            # P V, the group folded into the rows (V read in place): (B, H, L, D_v)
            heads = _grouped_product(probs.to(compute), v.to(compute), num_kv_heads)
            probs = probs.to(q.dtype)
        elif softcap is not None:
            # the scores themselves, capped: (B, H, L, D_v), (B, H, L, S)
            heads, probs = _softcapped_attention(q, k, v, softcap=softcap, **band)
        elif chosen == "sdpa":
            # torch's fused kernel, 4-D: (B, H, L, D_v)
            heads = _attention_sdpa(q, k, v, **band)
            heads = heads.to(compute)
        elif chosen == "tiled":
            # (B, H, L, D_v)
            heads = attention_tiled(q, k, v, **band)
            heads = heads.to(compute)
        elif return_weights:
            # (B, H, L, S)
            probs = attention_weights(q, k, **band)
            # P V, the group folded into the rows (V read in place): (B, H, L, D_v)
            heads = _grouped_product(probs.to(compute), v.to(compute), num_kv_heads)
        else:
            # (B, H, L, D_v)
            heads = scaled_dot_product_attention_reference(q, k, v, **band)
            heads = heads.to(compute)
        B, H, L, D_v = heads.shape
        merged = heads.transpose(1, 2).reshape(B, L, H * D_v)  # (B, L, H * D_v)
        output = merged @ w_o  # (B, L, E_out)
        if b_o is not None:
            output = output + b_o
    output = output.to(x_q.dtype)
    return (output, probs) if return_weights else output


def _check_layer_inputs(x_q, x_k, x_v, widths):
    """``x_q (B, L, E_q)``, ``x_k (B, S, E_k)``, ``x_v (B, S, E_v)``: tensors, one float
    dtype, fitting widths."""
    for name, x, width in zip(("x_q", "x_k", "x_v"), (x_q, x_k, x_v), widths):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _checks.check_float(name, x.dtype)
        if x.dim() != 3 or x.shape[2] != width:
            raise ValueError(
                f"{name} must have shape (B, length, {width}) for these weights, "
                f"got shape {tuple(x.shape)}"
            )
    if not (x_q.dtype == x_k.dtype == x_v.dtype):
        raise TypeError(
            "the inputs must have the same dtype, got "
            f"{_checks.dtype_name(x_q.dtype)}, "
            f"{_checks.dtype_name(x_k.dtype)} and {_checks.dtype_name(x_v.dtype)}"
        )
    if not (x_q.shape[0] == x_k.shape[0] == x_v.shape[0]):
        raise ValueError(
            "the inputs must have the same batch size B, got shapes "
            f"{tuple(x_q.shape)}, "
            f"{tuple(x_k.shape)} and {tuple(x_v.shape)}"
        )
    if x_k.shape[1] != x_v.shape[1]:
        raise ValueError(
            f"key input {tuple(x_k.shape)} and value input {tuple(x_v.shape)} must "
            "have the same length"
        )


def multi_head_attention(
    x_q: torch.Tensor,
    x_kv: torch.Tensor,
    params: MultiHeadParams,
    *,
    mask=None,
    causal: bool = False,
    cache: KVCache | None = None,
    return_weights: bool = False,
    implementation: str = "auto",
    rope=None,
    window: int | None = None,
    sinks=None,
):
    r"""Multi-head attention on batch-first inputs: ``(B, L, E_q), (B, S, E_kv) -> (B,
    L, E_out)``.

    .. code-block:: text

        q = split_heads(x_q @ w_q + b_q)       (B, H, L, D)
        k = split_heads(x_kv @ w_k + b_k)      (B, H_kv, S, D)
        v = split_heads(x_kv @ w_v + b_v)      (B, H_kv, S, D_v)
        o = softmax(q k^T / sqrt(D) + mask) v  (B, H, L, D_v)  grouped if H_kv < H
        y = merge_heads(o) @ w_o + b_o         (B, L, E_out)

    ``params`` (numpy arrays) are converted to tensors of ``x_q``'s dtype on its device
    (float16/bfloat16: computed in float32). ``mask`` is boolean (True = attend) or
    float, broadcastable to ``(B, H, L, S)`` where ``S`` counts every cached position;
    ``causal`` is bottom-right aligned, so feeding a sequence one token at a time into a
    :class:`KVCache` with ``causal=True`` equals full causal self-attention. Returns
    ``(B, L, E_out)``, or ``(output, weights (B, H, L, S))`` with
    ``return_weights=True``. ``implementation`` (``"auto"``, ``"reference"``,
    ``"tiled"``, ``"sdpa"``) picks the heads' attention: the reference,
    :func:`companion.torch.attention_tiled` or torch's fused
    ``scaled_dot_product_attention`` (outputs and gradients agree); ``"auto"`` is
    tiled from ``L * S >= TILED_FROM_SCORES`` on, unless ``return_weights``. ``rope``
    (``True``, a base, a dict or a :class:`~companion.numpy.RotaryConfig`) rotates
    queries and keys at their absolute positions (the new keys from ``cache.seen`` on),
    as in :func:`companion.numpy.multi_head_attention`. ``window`` is sliding-window
    attention, as there (a rolling ``KVCache(max_length=W)`` defaults it to ``W``).
    ``sinks`` (``(H,)``, a tensor or array) adds one learned logit per head to the
    softmax's denominator (GPT-OSS; :func:`companion.torch.attention_with_sinks`,
    gradients reach it); only the reference forms that softmax, so ``"auto"`` takes
    it and ``"sdpa"`` and ``"tiled"`` are refused.
    """
    causal = _check_flag("causal", causal)
    return_weights = _check_flag("return_weights", return_weights)
    if not isinstance(params, MultiHeadParams):
        raise TypeError(
            f"params must be a MultiHeadParams, got {type(params).__name__}"
        )
    _check_layer_inputs(
        x_q, x_kv, x_kv, (params.w_q.shape[0], params.w_k.shape[0], params.w_v.shape[0])
    )
    compute = _compute_dtype(x_q.dtype)
    weights = tuple(
        _as_tensor(getattr(params, name), x_q, compute)
        for name in ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
    )
    return _multi_head(
        x_q,
        x_kv,
        x_kv,
        weights,
        params.num_heads,
        params.num_kv_heads,
        mask=mask,
        causal=causal,
        cache=cache,
        return_weights=return_weights,
        implementation=implementation,
        rope=_positions.as_rotary(rope),
        window=window,
        sinks=_as_sinks(sinks, x_q, compute),
    )


def _as_sinks(sinks, like: torch.Tensor, dtype: torch.dtype):
    """``None``, or the sink logits as a float tensor of ``dtype`` on ``like``'s device
    (a tensor keeps its autograd history); ``TypeError`` naming ``sinks``."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        sinks = torch.as_tensor(np.asarray(sinks))
    _checks.check_float("sinks", sinks.dtype)
    return sinks.to(device=like.device, dtype=dtype)


# --------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    r"""Multi-head, grouped-query or multi-query attention as a trainable
    ``torch.nn.Module``.

    ``embed_dim = E`` is split into ``H = num_heads`` query heads of ``D = E // H``;
    keys and values have ``H_kv = num_kv_heads`` heads (default ``H``; ``1`` is
    multi-query), query head ``h`` reading key/value head ``h // (H // H_kv)``.
    Parameters (``nn.Linear`` layers, weights stored ``(out, in)`` as torch does):

    ==============  ======================  ===================================
    ``q_proj``      ``E -> H * D``          ``E * H * D (+ H * D)``
    ``k_proj``      ``kdim -> H_kv * D``    ``kdim * H_kv * D (+ H_kv * D)``
    ``v_proj``      ``vdim -> H_kv * D``    ``vdim * H_kv * D (+ H_kv * D)``
    ``out_proj``    ``H * D -> E``          ``H * D * E (+ E)``
    ==============  ======================  ===================================

    so that grouped-query heads shrink the key/value projections (and the KV cache) by
    ``H / H_kv``. Inputs are batch-first ``(B, L, E)``; masks follow
    :mod:`companion.conventions` (``True`` = attend, the opposite of
    ``nn.MultiheadAttention``'s ``key_padding_mask``); a fully masked query gives 0, not
    NaN. :meth:`forward` takes a :class:`KVCache` for decoding. ``implementation``
    (``"auto"``, ``"reference"``, ``"tiled"``, ``"sdpa"``) is the default of the keyword
    of that name of :meth:`forward`, as in :func:`multi_head_attention`. ``rope``
    (``True``, a base, a dict or a :class:`~companion.numpy.RotaryConfig`) rotates
    queries and keys at their absolute positions in every call, as in
    :func:`multi_head_attention`.

    Options of today's models (the defaults change nothing): ``head_dim`` (``D``
    independent of ``E``: ``q_proj`` is ``E -> H * D``, ``out_proj`` ``H * D -> E``;
    Qwen3, Gemma 3), ``scale`` (instead of ``1/sqrt(D)``; Gemma 3's
    ``query_pre_attn_scalar ** -0.5``), ``qk_norm`` (``"rms"`` or ``"layer"``, eps
    ``qk_norm_eps``: modules ``q_norm`` and ``k_norm`` over ``D``, one weight shared
    by the heads, applied to queries and keys before the rotation; Qwen3, Gemma 3,
    OLMo-2 normalises the whole width instead) and ``softcap`` (``c``: scores
    ``c tanh(s / c)`` before the mask, Gemma 2; only the reference forms the scores,
    so ``"sdpa"`` and ``"tiled"`` are refused with it and ``"auto"`` computes the
    reference) and ``sink_logits`` (``True``: a parameter ``sinks`` of shape ``(H,)``,
    one learned logit per head in the softmax's denominator only, as GPT-OSS has it;
    initialised to 0; only the reference forms that softmax, so ``"sdpa"`` and
    ``"tiled"`` are refused with it; :meth:`to_params` does not carry it).

    Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        device=None,
        dtype=None,
        implementation: str = "auto",
        rope=None,
        head_dim: int | None = None,
        scale: float | None = None,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        softcap: float | None = None,
        sink_logits: bool = False,
    ):
        super().__init__()
        sink_logits = _check_flag("sink_logits", sink_logits)
        self.rope = _positions.as_rotary(rope)  # RotaryConfig or None
        self.softcap = _check_softcap("softcap", softcap)
        self.scale = None if scale is None else _checks.resolve_scale(scale, 1)
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        _choose(implementation, 0, 0, False, self.softcap, sink_logits)
        self.implementation = implementation
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        gqa_group_size(num_heads, num_kv_heads)  # ValueError unless H_kv divides H
        for name, value in (("embed_dim", embed_dim), ("kdim", kdim), ("vdim", vdim)):
            if value is not None:
                _checks.check_int(name, value)
        if head_dim is not None:
            _checks.check_int("head_dim", head_dim)
        elif embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}"
            )
        self.embed_dim, self.num_heads, self.num_kv_heads = (
            embed_dim,
            num_heads,
            num_kv_heads,
        )
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(
            embed_dim, num_heads * self.head_dim, bias=bias, **factory
        )
        self.k_proj = nn.Linear(
            self.kdim, num_kv_heads * self.head_dim, bias=bias, **factory
        )
        self.v_proj = nn.Linear(
            self.vdim, num_kv_heads * self.head_dim, bias=bias, **factory
        )
        self.out_proj = nn.Linear(
            num_heads * self.head_dim, embed_dim, bias=bias, **factory
        )
        self.q_norm = self.k_norm = None
        if qk_norm is not None:  # per head, over D, one weight for every head
            norms = {"rms": nn.RMSNorm, "layer": nn.LayerNorm}
            if qk_norm not in norms:
                raise ValueError(
                    f"qk_norm must be None, 'rms' or 'layer', got {qk_norm!r}"
                )
            self.q_norm = norms[qk_norm](self.head_dim, eps=qk_norm_eps, **factory)
            self.k_norm = norms[qk_norm](self.head_dim, eps=qk_norm_eps, **factory)
        # GPT-OSS: one logit per query head, in the softmax's denominator only
        self.sinks = (
            nn.Parameter(torch.zeros(num_heads, **factory)) if sink_logits else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as ``torch.nn.MultiheadAttention``
        initialises them."""
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, kdim={self.kdim}, vdim={self.vdim}, "
            f"bias={self.q_proj.bias is not None}"
            + ("" if self.rope is None else f", rope={self.rope}")
            + ("" if self.scale is None else f", scale={self.scale}")
            + ("" if self.softcap is None else f", softcap={self.softcap}")
            + ("" if self.sinks is None else ", sink_logits=True")
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask=None,
        causal: bool = False,
        cache: KVCache | None = None,
        return_weights: bool = False,
        implementation: str | None = None,
        window: int | None = None,
    ):
        """Attend from ``query (B, L, E)`` to ``key (B, S, kdim)`` / ``value (B, S,
        vdim)``.

        ``key`` defaults to ``query`` (self-attention) and ``value`` to ``key``.
        ``mask``, ``causal`` (bottom-right), ``cache``, ``return_weights`` and
        ``implementation`` (default: the module's) as in :func:`multi_head_attention`.
        Returns ``(B, L, E)``, or ``(output, weights (B, H, L, S))`` (per head, not
        averaged) with ``return_weights=True``.
        """
        causal = _check_flag("causal", causal)
        return_weights = _check_flag("return_weights", return_weights)
        key = query if key is None else key
        value = key if value is None else value
        _check_layer_inputs(query, key, value, (self.embed_dim, self.kdim, self.vdim))
        compute = _compute_dtype(query.dtype)
        weights = []
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            weights.append(layer.weight.T.to(compute))  # x @ W.T: (in, out)
            weights.append(None if layer.bias is None else layer.bias.to(compute))
        return _multi_head(
            query,
            key,
            value,
            tuple(weights),
            self.num_heads,
            self.num_kv_heads,
            mask=mask,
            causal=causal,
            cache=cache,
            return_weights=return_weights,
            implementation=(
                self.implementation if implementation is None else implementation
            ),
            rope=self.rope,
            window=window,
            key_name="key",
            scale=self.scale,
            qk_norm=None if self.q_norm is None else (self.q_norm, self.k_norm),
            softcap=self.softcap,
            sinks=None if self.sinks is None else self.sinks.to(compute),
        )

    # ----- conversions ----------------------------------------------------------------

    @classmethod
    def from_params(
        cls, params: MultiHeadParams, *, device=None, dtype=None
    ) -> "MultiHeadAttention":
        """A module holding copies of ``params`` (``dtype`` default: the arrays' dtype,
        float64 for numpy).

        Needs ``D_v == D``, ``E_out == E_q`` and ``H * D == E_q`` (the shapes this
        module has).
        """
        if not isinstance(params, MultiHeadParams):
            raise TypeError(
                f"params must be a MultiHeadParams, got {type(params).__name__}"
            )
        E, width = params.w_q.shape
        if (
            width != E
            or params.w_o.shape[1] != E
            or params.value_head_dim != params.head_dim
        ):
            raise ValueError(
                f"MultiHeadAttention needs H * D == E_q == E_out and D_v == D; got w_q "
                f"{tuple(params.w_q.shape)}, w_v {tuple(params.w_v.shape)}, w_o "
                f"{tuple(params.w_o.shape)} "
                f"with H={params.num_heads}, H_kv={params.num_kv_heads}"
            )
        # the dtype of the arrays (float64 for MultiHeadParams.random)
        if dtype is None:
            dtype = (
                params.w_q.dtype
                if isinstance(params.w_q, torch.Tensor)
                else torch.from_numpy(np.asarray(params.w_q)[:0]).dtype
            )
        module = cls(
            E,
            params.num_heads,
            params.num_kv_heads,
            bias=params.b_q is not None,
            kdim=params.w_k.shape[0],
            vdim=params.w_v.shape[0],
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            for layer, w, b in (
                (module.q_proj, params.w_q, params.b_q),
                (module.k_proj, params.w_k, params.b_k),
                (module.v_proj, params.w_v, params.b_v),
                (module.out_proj, params.w_o, params.b_o),
            ):
                layer.weight.copy_(_as_tensor(w, layer.weight, dtype).T)  # (out, in)
                if (b is None) != (layer.bias is None):
                    raise ValueError("MultiHeadAttention needs all four biases or none")
                if b is not None:
                    layer.bias.copy_(_as_tensor(b, layer.bias, dtype))
        return module

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of a ``torch.nn.MultiheadAttention`` (same weights, dtype and device).

        Reads the tensors directly (no trip through numpy), so ``kdim != vdim`` works
        too (a :class:`MultiHeadParams` has one key/value input width). torch stores
        ``in_proj_weight (3E, E) = [W_q; W_k; W_v]`` (or ``q/k/v_proj_weight`` when
        ``kdim``/``vdim`` differ from ``E``), the ``(out, in)`` layout of ``nn.Linear``.
        Our module is batch-first and takes ``True`` = attend masks whatever the
        source's ``batch_first``.
        """
        if getattr(module, "bias_k", None) is not None or getattr(
            module, "add_zero_attn", False
        ):
            raise ValueError(
                "MultiheadAttention with add_bias_kv or add_zero_attn has no "
                "MultiHeadAttention equivalent"
            )
        E = module.embed_dim
        if module.in_proj_weight is not None:
            w_q, w_k, w_v = module.in_proj_weight.split(E)  # (E, E) each, (out, in)
        else:
            # (E, E|kdim|vdim)
            w_q, w_k, w_v = (
                module.q_proj_weight,
                module.k_proj_weight,
                module.v_proj_weight,
            )
        # (E,) each
        biases = (
            (None, None, None)
            if module.in_proj_bias is None
            else module.in_proj_bias.split(E)
        )
        copy = cls(
            E,
            module.num_heads,
            bias=module.in_proj_bias is not None,
            kdim=module.kdim,
            vdim=module.vdim,
            device=w_q.device,
            dtype=w_q.dtype,
        )
        with torch.no_grad():
            for layer, w, b in (
                (copy.q_proj, w_q, biases[0]),
                (copy.k_proj, w_k, biases[1]),
                (copy.v_proj, w_v, biases[2]),
                (copy.out_proj, module.out_proj.weight, module.out_proj.bias),
            ):
                if (b is None) != (layer.bias is None):
                    raise ValueError("MultiHeadAttention needs all four biases or none")
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
        return copy

    def to_params(self) -> MultiHeadParams:
        """The weights as a :class:`MultiHeadParams` of numpy arrays (``x @ W + b``;
        bfloat16 -> float32)."""

        def array(t):
            if t is None:
                return None
            t = t.detach().cpu()
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

        return MultiHeadParams(
            w_q=array(self.q_proj.weight.T),
            b_q=array(self.q_proj.bias),
            w_k=array(self.k_proj.weight.T),
            b_k=array(self.k_proj.bias),
            w_v=array(self.v_proj.weight.T),
            b_v=array(self.v_proj.bias),
            w_o=array(self.out_proj.weight.T),
            b_o=array(self.out_proj.bias),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
        )
