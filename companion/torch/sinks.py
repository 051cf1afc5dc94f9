r"""Attention sinks (StreamingLLM) in torch: see :mod:`companion.numpy.sinks`."""

from __future__ import annotations

import math

import torch

from companion import _checks, _positions, _sinks
from companion.torch.multihead import KVCache

__all__ = ["SinkCache", "sink_mask", "attention_with_sinks"]


def _positions_tensor(name: str, positions, device=None) -> torch.Tensor:
    _positions.check_position_values(positions)
    positions = torch.as_tensor(positions, device=device)
    name_ = _checks.dtype_name(positions.dtype)
    if positions.dim() != 1 or not name_.startswith(("int", "uint")):
        raise ValueError(
            f"{name} must be a vector of integer positions, got shape "
            f"{tuple(positions.shape)} and dtype {name_}"
        )
    return positions


def sink_mask(query_positions, key_positions, *, sinks: int, window: int):
    r"""Bool ``(L, S)``, True = attend: key ``p <= q`` with ``p < sinks`` or
    ``q - p < window``; on the device of ``query_positions``. See
    :func:`companion.numpy.sink_mask`."""
    sinks, window = _sinks.check_sinks(sinks, window)
    q = _positions_tensor("query_positions", query_positions)
    p = _positions_tensor("key_positions", key_positions, q.device)
    q, p = q[:, None], p[None, :]  # (L, 1), (1, S)
    return _sinks.sink_rule(q, p, sinks, window)  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, torch tensors.

    See :class:`companion._sinks.SinkCacheBase`."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return torch.cat([a, b], dim=2)

    def _integers(self, values, like):
        device = None if like is None else like.device
        return torch.tensor(values, dtype=torch.int64, device=device)


def attention_with_sinks(
    query,
    key,
    value,
    sinks,
    *,
    mask=None,
    causal: bool = False,
    scale=None,
    window=None,
):
    r"""Attention with a learned sink logit per head in the softmax's denominator
    (GPT-OSS): ``w = e^s / (e^sink_h + sum e^s)``. Differentiable, ``sinks`` included.
    See :func:`companion.numpy.attention_with_sinks`; the same math is the ``sinks=``
    option of :func:`companion.torch.multi_head_attention`."""
    for name, t in zip(("query", "key", "value", "sinks"), (query, key, value, sinks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _checks.check_float(name, t.dtype)
    group = _sinks.check_sink_attention(
        query.shape, key.shape, value.shape, sinks.shape
    )
    weights = _sink_weights(
        query, key, sinks, mask=mask, causal=causal, scale=scale, window=window
    )
    v = value.to(weights.dtype).repeat_interleave(group, dim=-3)  # (..., H, S, D_v)
    return (weights @ v).to(query.dtype)  # (..., H, L, D_v)


def _sink_weights(query, key, sinks, *, mask, causal, scale, window=None):
    """The weights ``(..., H, L, S)`` of :func:`attention_with_sinks`, the sink's share
    dropped, for checked tensors; in float32 at least."""
    from companion import _tiling
    from companion.torch.attention import _band

    group = query.shape[-3] // key.shape[-3]
    window = _tiling.check_window(window)
    dtype = torch.promote_types(query.dtype, key.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    k = key.to(dtype).repeat_interleave(group, dim=-3)  # (..., H, S, D)
    scores = scale * (query.to(dtype) @ k.transpose(-1, -2))  # (..., H, L, S)
    L, S = scores.shape[-2:]
    if mask is not None:
        mask = torch.as_tensor(mask, device=scores.device)
        _sinks.check_mask(mask.shape, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(dtype)
    causal = _positions.check_interleaved_like("causal", causal)
    if causal or window is not None:
        # bottom-right causal and/or the window's band: (L, S)
        keep = _band(0, L, 0, S, L, S, causal, window, scores.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    sink = sinks.to(dtype)[:, None, None].expand(*scores.shape[:-1], 1)
    logits = torch.cat([scores, sink], dim=-1)  # (..., H, L, S + 1)
    # shift by the row's largest logit; a row that sees no key and whose sink is -inf
    # has none finite: shift by 0 and divide by 1, so its weights are exactly 0
    peak = logits.detach().amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(peak), peak, 0.0))
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, 1.0)
    return weights[..., :-1]  # (..., H, L, S): the sink's share dropped
