r"""Attention sinks (StreamingLLM, Xiao et al. 2023): the first tokens and a window.

:class:`SinkCache` keeps the first ``sinks`` positions and the last ``window``;
:func:`sink_mask` is the mask under which decoding with it equals one full pass. These
numpy versions are the oracle for the torch and TensorFlow namespaces.
"""

from __future__ import annotations

import math

import numpy as np

from companion import _checks, _positions, _sinks
from companion.numpy.multihead import KVCache

__all__ = ["SinkCache", "sink_mask", "attention_with_sinks"]


def _positions_array(name: str, positions) -> np.ndarray:
    _positions.check_position_values(positions)
    positions = np.asarray(positions)
    if positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a vector of integer positions, got shape "
            f"{positions.shape} and dtype {positions.dtype}"
        )
    return positions


def sink_mask(query_positions, key_positions, *, sinks: int, window: int):
    r"""Which keys each query sees with attention sinks: bool ``(L, S)``, True = attend.

    Query at position ``q`` sees key ``p`` when :math:`p \le q` and (:math:`p <`
    ``sinks`` or :math:`q - p <` ``window``): the first ``sinks`` tokens of the text
    and the last ``window`` (itself included). With ``query_positions =
    key_positions = 0 .. n-1`` it is the full pass's mask; with a :class:`SinkCache`,
    the positions are the queries' and its
    :attr:`~companion._sinks.SinkCacheBase.key_positions`.
    """
    sinks, window = _sinks.check_sinks(sinks, window)
    q = _positions_array("query_positions", query_positions)[:, None]  # (L, 1)
    p = _positions_array("key_positions", key_positions)[None, :]  # (1, S)
    return _sinks.sink_rule(q, p, sinks, window)  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, numpy arrays.

    See :class:`companion._sinks.SinkCacheBase` for the rule and the positions."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return np.concatenate([a, b], axis=2)

    def _integers(self, values, like):
        return np.array(values, dtype=np.int64)


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
    r"""Scaled dot-product attention with a learned sink logit per head.

    .. math::

        w_{ij} = \frac{e^{s_{ij}}}{e^{\sigma_h} + \sum_{j'} e^{s_{ij'}}}, \qquad
        O = w V

    The sink logit :math:`\sigma_h` (``sinks[h]``) joins the softmax's denominator
    only: a head can put weight "nowhere" instead of on the first tokens (GPT-OSS;
    the learned counterpart of StreamingLLM's sink tokens). The weights of a row sum
    to less than 1; a row that may see no key gives exactly 0. The same math is the
    ``sinks=`` option of :func:`companion.numpy.multi_head_attention`.

    Parameters
    ----------
    query, key, value
        ``(..., H, L, D)``, ``(..., H_kv, S, D)`` and ``(..., H_kv, S, D_v)``;
        grouped-query heads share key/value head ``h // (H // H_kv)``.
    sinks : ``(H,)``
    mask : bool (``True`` = attend) or float (added to the scaled scores), optional
    causal : bool
        :func:`companion.numpy.causal_mask` (bottom-right) as well.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    window : int or (left, right), optional
        Sliding-window attention, as in :func:`companion.numpy.causal_mask`.

    Returns
    -------
    ``(..., H, L, D_v)`` in the dtype of ``query`` (float16 computed in float32).
    """
    arrays = [np.asarray(a) for a in (query, key, value, sinks)]
    for name, a in zip(("query", "key", "value", "sinks"), arrays):
        _checks.check_float(name, a.dtype)
    q, k, v, s = arrays
    group = _sinks.check_sink_attention(q.shape, k.shape, v.shape, s.shape)
    weights = _sink_weights(
        q, k, s, mask=mask, causal=causal, scale=scale, window=window
    )
    v = np.repeat(v.astype(weights.dtype), group, axis=-3)  # (..., H, S, D_v)
    out = weights @ v  # (..., H, L, D_v)
    return out.astype(q.dtype, copy=False)


def _sink_weights(q, k, s, *, mask, causal, scale, window=None) -> np.ndarray:
    """The weights ``(..., H, L, S)`` of :func:`attention_with_sinks`, the sink's
    share dropped (a row sums to less than 1), for checked ``q (..., H, L, D)``, ``k
    (..., H_kv, S, D)`` and ``s (H,)``; in float32 at least."""
    from companion import _tiling
    from companion.numpy.attention import _band

    group = q.shape[-3] // k.shape[-3]
    window = _tiling.check_window(window)
    dtype = np.result_type(q.dtype, k.dtype, s.dtype, np.float32)
    # the default scale in Python floats: np.sqrt would be a float64 scalar
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k = np.repeat(k.astype(dtype), group, axis=-3)  # (..., H, S, D)
    scores = scale * (q.astype(dtype) @ np.swapaxes(k, -1, -2))  # (..., H, L, S)
    L, S = scores.shape[-2:]
    if mask is not None:
        mask = np.asarray(mask)
        _sinks.check_mask(mask.shape, scores.shape)
        if mask.dtype == bool:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask.astype(dtype)
    causal = _positions.check_interleaved_like("causal", causal)
    if causal or window is not None:
        # bottom-right causal and/or the window's band: (L, S)
        scores = np.where(_band(0, L, 0, S, L, S, causal, window), scores, -np.inf)
    sink = np.broadcast_to(s.astype(dtype)[:, None, None], (*scores.shape[:-1], 1))
    logits = np.concatenate([scores, sink], axis=-1)  # (..., H, L, S + 1)
    # shift by the row's largest logit; a row that sees no key and whose sink is -inf
    # has none finite: shift by 0 and divide by 1, so its weights are exactly 0
    peak = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0).astype(dtype))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0).astype(dtype)
    return weights[..., :-1]  # (..., H, L, S): the sink's share dropped
