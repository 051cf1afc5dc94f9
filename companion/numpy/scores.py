r"""Score functions: how much a query "matches" each key, before the softmax.

Every attention mechanism is ``weights = softmax(score(q, k))`` followed by
``output = weights V``; they differ only in the score. Shapes: ``query (..., L, D_q)``,
``key (..., S, D_k)`` -> scores ``(..., L, S)`` (a head axis, if any, is part of
``...``). Weights are applied as ``y = x @ W`` (see :mod:`companion.conventions`).

==========================  ======================================  ================
score                       formula                                 parameters
==========================  ======================================  ================
dot product                 ``q . k``                               none
scaled dot product          ``t q . k``, ``t = 1 / sqrt(D)``        none
additive (Bahdanau)         ``v^T tanh(W_q^T q + W_k^T k)``         ``w_q, w_k, v``
multiplicative (Luong)      ``q^T W k``                             ``w``
negative distance           ``-||q - k||``  (source 1)              none
==========================  ======================================  ================

:func:`nadaraya_watson` is the source document's distance-based attention, corrected:
kernel regression with the Gaussian kernel, i.e. attention with the score
``-||q - k||^2 / (2 h^2)``.

Explained in the book chapter *Attention: algorithm and math*.
"""

from __future__ import annotations

import numpy as np

from companion import _checks
from companion.numpy.attention import softmax

__all__ = [
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "multiplicative_scores",
    "negative_distance_scores",
    "nadaraya_watson",
]


def _pair(query, key, *, same_dim: bool = True):
    """``query (..., L, D)`` and ``key (..., S, D)`` checked: float, same dtype, rank >=
    2."""
    arrays = []
    for name, x in (("query", query), ("key", key)):
        x = np.asarray(x)
        _checks.check_float(name, x.dtype)
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have shape (..., length, dim) with at least 2 axes, got "
                f"shape {x.shape}"
            )
        arrays.append(x)
    q, k = arrays
    if q.dtype != k.dtype:
        raise TypeError(
            f"query and key must have the same dtype, got {q.dtype} and {k.dtype}"
        )
    if same_dim and q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same feature dimension: query {q.shape}, key "
            f"{k.shape}"
        )
    try:
        _checks.broadcast_shape(q.shape[:-2], k.shape[:-2])
    except ValueError:
        raise ValueError(
            f"the leading axes of query {q.shape} and key {k.shape} do not broadcast"
        ) from None
    return q, k


def _weight(name: str, w, shape: tuple, dtype) -> np.ndarray:
    w = np.asarray(w)
    _checks.check_float(name, w.dtype)
    if w.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {w.shape}")
    return w.astype(dtype, copy=False)


def dot_product_scores(query, key) -> np.ndarray:
    r"""``scores[..., i, j] = q_i . k_j``:
    ``(..., L, D), (..., S, D) -> (..., L, S)``."""
    q, k = _pair(query, key)
    return q @ np.swapaxes(k, -1, -2)  # (..., L, S)


def scaled_dot_product_scores(query, key, scale: float | None = None) -> np.ndarray:
    r"""``scores[..., i, j] = t q_i . k_j`` with ``t = 1 / sqrt(D)`` by default: ``(...,
    L, S)``.

    With ``D`` independent unit-variance features, ``q . k`` has variance ``D``; the
    scale brings it back to 1 so that the softmax does not saturate as ``D`` grows.
    """
    q, k = _pair(query, key)
    t = _checks.resolve_scale(scale, q.shape[-1])  # a Python float: keeps the dtype
    return t * (q @ np.swapaxes(k, -1, -2))  # (..., L, S)


def additive_scores(query, key, w_q, w_k, v) -> np.ndarray:
    r"""Additive (Bahdanau) scores ``v^T tanh(W_q^T q_i + W_k^T k_j)``: ``(..., L, S)``.

    Parameters
    ----------
    query : ``(..., L, D_q)``
    key : ``(..., S, D_k)``
    w_q : ``(D_q, A)``, w_k : ``(D_k, A)``, v : ``(A,)``
        ``A`` is the hidden width of the one-layer network that compares ``q`` and
        ``k``.

    This reference holds the ``(..., L, S, A)`` hidden activations.
    """
    q, k = _pair(query, key, same_dim=False)
    w_q = np.asarray(w_q)
    if w_q.ndim != 2:
        raise ValueError(f"w_q must have shape (D_q, A), got {w_q.shape}")
    A = w_q.shape[1]
    w_q = _weight("w_q", w_q, (q.shape[-1], A), q.dtype)
    w_k = _weight("w_k", w_k, (k.shape[-1], A), q.dtype)
    v = _weight("v", v, (A,), q.dtype)
    q_features = (q @ w_q)[..., :, None, :]  # W_q^T q_i: (..., L, 1, A)
    k_features = (k @ w_k)[..., None, :, :]  # W_k^T k_j: (..., 1, S, A)
    hidden = np.tanh(q_features + k_features)  # (..., L, S, A)
    return hidden @ v  # v^T tanh(...): (..., L, S)


def multiplicative_scores(query, key, w) -> np.ndarray:
    r"""Multiplicative (Luong "general") scores ``q_i^T W k_j``: ``(..., L, S)``.

    ``query (..., L, D_q)``, ``key (..., S, D_k)``, ``w (D_q, D_k)``. With ``W = I``
    this is the dot product.
    """
    q, k = _pair(query, key, same_dim=False)
    w = _weight("w", w, (q.shape[-1], k.shape[-1]), q.dtype)
    # q^T W k: (..., L, D_k) @ (..., D_k, S) -> (..., L, S)
    return (q @ w) @ np.swapaxes(k, -1, -2)


def negative_distance_scores(query, key) -> np.ndarray:
    r"""``scores[..., i, j] = -||q_i - k_j||`` (Euclidean), the similarity of source 1:
    ``(..., L, S)``.

    Source 1 wrote ``1 - np.linalg.norm(X)``: the norm of the whole matrix, one scalar
    for all pairs. This is the per-pair distance it meant.
    """
    q, k = _pair(query, key)
    differences = q[..., :, None, :] - k[..., None, :, :]  # q_i - k_j: (..., L, S, D)
    return -np.sqrt(np.sum(differences * differences, axis=-1))  # (..., L, S)


def nadaraya_watson(x_query, x_keys, y_values, *, bandwidth: float = 1.0) -> np.ndarray:
    r"""Nadaraya-Watson kernel regression with a Gaussian kernel, written as attention.

    .. math::

        y(x) = \sum_i \operatorname{softmax}_i\!\Big(
                   -\frac{\|x - x_i\|^2}{2 h^2}\Big)\, y_i
             = \sum_i \operatorname{softmax}_i\!\Big(
                   \frac{x \cdot x_i - \|x_i\|^2 / 2}{h^2}\Big)\, y_i

    Expanding ``||x - x_i||^2 = ||x||^2 - 2 x.x_i + ||x_i||^2``, the ``||x||^2`` term is
    the same for every key and cancels in the softmax: the kernel weights are attention
    weights with the dot-product score ``x . x_i / h^2`` plus a per-key bias
    ``-||x_i||^2 / (2 h^2)``. So it is computed with one matrix product (and
    :func:`companion.numpy.attention_tiled` would apply unchanged).

    Parameters
    ----------
    x_query : ``(m,)`` or ``(m, d)``
        Where to predict; 1-D means one feature.
    x_keys : ``(n,)`` or ``(n, d)``
        The observed inputs (keys), same number of features.
    y_values : ``(n,)`` or ``(n, d_y)``
        The observed outputs (values).
    bandwidth : float
        ``h > 0``: small ``h`` follows the nearest key, large ``h`` averages all values.

    Returns
    -------
    numpy.ndarray ``(m,)`` or ``(m, d_y)``, as ``y_values`` is 1-D or 2-D.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    x_query, x_keys, y_values = (np.asarray(a) for a in (x_query, x_keys, y_values))
    for name, a in (("x_query", x_query), ("x_keys", x_keys), ("y_values", y_values)):
        _checks.check_float(name, a.dtype)
        if a.ndim not in (1, 2):
            raise ValueError(
                f"{name} must be 1-D (one feature) or 2-D (n, d), got shape {a.shape}"
            )
    if x_query.ndim != x_keys.ndim:
        raise ValueError(
            f"x_query {x_query.shape} and x_keys {x_keys.shape} must both be 1-D or "
            "both 2-D"
        )
    if x_query.ndim == 2 and x_query.shape[1] != x_keys.shape[1]:
        raise ValueError(
            f"x_query {x_query.shape} and x_keys {x_keys.shape} must have the same "
            "number of features"
        )
    if y_values.shape[0] != x_keys.shape[0]:
        raise ValueError(
            f"y_values {y_values.shape} must have one row per key, x_keys has shape "
            f"{x_keys.shape}"
        )
    if x_keys.shape[0] == 0:
        raise ValueError("x_keys must hold at least one observation")
    h = float(bandwidth)
    if not (np.isfinite(h) and h > 0):
        raise ValueError(
            f"bandwidth must be a positive finite number, got {bandwidth!r}"
        )
    # [book: nadaraya-watson core]
    dtype = np.result_type(x_query.dtype, x_keys.dtype, y_values.dtype)
    q = x_query.reshape(x_query.shape[0], -1).astype(dtype, copy=False)  # (m, d)
    k = x_keys.reshape(x_keys.shape[0], -1).astype(dtype, copy=False)  # (n, d)
    key_bias = -0.5 * np.sum(k * k, axis=-1)  # -||x_i||^2 / 2: (n,)
    # (x . x_i - ||x_i||^2 / 2) / h^2: (m, n)
    scores = (q @ k.T + key_bias[None, :]) / (h * h)
    weights = softmax(scores, axis=-1)  # (m, n)
    return weights @ y_values.astype(dtype, copy=False)  # (m,) or (m, d_y)
    # [/book: nadaraya-watson core]
