r"""Attention score functions and Nadaraya-Watson kernel regression, for TensorFlow
tensors.

The same names and semantics as :mod:`companion.numpy.scores`. A score function maps
queries ``(..., L, D_q)`` and keys ``(..., S, D_k)`` to scores ``(..., L, S)``; the
softmax of the scores along ``S`` gives the attention weights. Weights are applied as
``x @ W`` (see :mod:`companion.conventions`); float16/bfloat16 are computed in float32
and returned in their own dtype.

Explained in the book chapter *Attention: algorithm and math*.
"""

from __future__ import annotations

import math

import tensorflow as tf

from companion import _checks
from companion.tensorflow.attention import softmax

__all__ = [
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "multiplicative_scores",
    "negative_distance_scores",
    "nadaraya_watson",
]

_HALF_PRECISION = ("float16", "bfloat16")


def _floats(**tensors):
    """Convert to tensors, require one floating dtype; return (tensors in compute dtype,
    input dtype)."""
    converted = {name: tf.convert_to_tensor(t) for name, t in tensors.items()}
    names = list(converted)
    first = _checks.check_float(names[0], converted[names[0]].dtype)
    for name in names[1:]:
        other = _checks.check_float(name, converted[name].dtype)
        if other != first:
            raise TypeError(
                f"{names[0]} and {name} must have the same dtype, got {first} and "
                f"{other}"
            )
    work = tf.float32 if first in _HALF_PRECISION else tf.as_dtype(first)
    return [tf.cast(t, work) for t in converted.values()], converted[names[0]].dtype


def _query_key_shapes(query, key, same_dim=True):
    q, k = tuple(query.shape), tuple(key.shape)
    for name, shape in (("query", q), ("key", k)):
        if len(shape) < 2:
            raise ValueError(
                f"{name} must have shape (..., length, dim) with at least 2 axes, got "
                f"shape {shape}"
            )
    if same_dim and q[-1] != k[-1]:
        raise ValueError(
            f"query and key must have the same feature dimension: query {q}, key {k}"
        )
    try:
        _checks.broadcast_shape(q[:-2], k[:-2])
    except ValueError:
        raise ValueError(
            f"the leading axes of query {q} and key {k} do not broadcast"
        ) from None
    return q, k


def dot_product_scores(query, key):
    r"""Dot-product scores :math:`s_{ij} = q_i \cdot k_j`: ``(..., L, D), (..., S, D) ->
    (..., L, S)``."""
    (q, k), dtype = _floats(query=query, key=key)
    _query_key_shapes(q, k)
    # q . k: (..., L, S)
    return tf.cast(tf.linalg.matmul(q, k, transpose_b=True), dtype)


def scaled_dot_product_scores(query, key, scale=None):
    r"""Scaled dot-product scores :math:`s_{ij} = q_i \cdot k_j / \sqrt{D}` (or
    ``scale`` instead of ``1/sqrt(D)``)."""
    (q, k), dtype = _floats(query=query, key=key)
    qs, _ = _query_key_shapes(q, k)
    scale = _checks.resolve_scale(scale, qs[-1])
    # (..., L, S)
    return tf.cast(
        tf.linalg.matmul(q, k, transpose_b=True) * tf.constant(scale, q.dtype), dtype
    )


def additive_scores(query, key, w_q, w_k, v):
    r"""Additive (Bahdanau) scores :math:`s_{ij} = v^\top \tanh(W_q q_i + W_k k_j)`.

    ``query (..., L, D_q)``, ``key (..., S, D_k)``, ``w_q (D_q, A)``, ``w_k (D_k, A)``,
    ``v (A,)``, applied as ``q @ w_q``; returns ``(..., L, S)``. Holds an
    ``(..., L, S, A)`` intermediate.
    """
    (q, k, wq, wk, vv), dtype = _floats(query=query, key=key, w_q=w_q, w_k=w_k, v=v)
    qs, ks = _query_key_shapes(q, k, same_dim=False)
    A = tuple(vv.shape)
    if len(A) != 1:
        raise ValueError(f"v must be 1-D (A,), got shape {A}")
    for name, w, rows in (("w_q", wq, qs[-1]), ("w_k", wk, ks[-1])):
        if tuple(w.shape) != (rows, A[0]):
            raise ValueError(
                f"{name} must have shape ({rows}, {A[0]}) for query {qs}, key {ks} and "
                f"v {A}, "
                f"got {tuple(w.shape)}"
            )
    projected_q = tf.linalg.matmul(q, wq)[..., :, None, :]  # W_q q: (..., L, 1, A)
    projected_k = tf.linalg.matmul(k, wk)[..., None, :, :]  # W_k k: (..., 1, S, A)
    hidden = tf.tanh(projected_q + projected_k)  # tanh(W_q q + W_k k): (..., L, S, A)
    return tf.cast(tf.linalg.matvec(hidden, vv), dtype)  # v^T tanh(...): (..., L, S)


def multiplicative_scores(query, key, w):
    r"""Multiplicative (Luong "general") scores :math:`s_{ij} = q_i^\top W k_j`.

    ``query (..., L, D_q)``, ``key (..., S, D_k)``, ``w (D_q, D_k)``; returns
    ``(..., L, S)``.
    """
    (q, k, ww), dtype = _floats(query=query, key=key, w=w)
    qs, ks = _query_key_shapes(q, k, same_dim=False)
    if tuple(ww.shape) != (qs[-1], ks[-1]):
        raise ValueError(
            f"w must have shape ({qs[-1]}, {ks[-1]}) for query {qs} and key {ks}, got "
            f"{tuple(ww.shape)}"
        )
    projected_q = tf.linalg.matmul(q, ww)  # q^T W: (..., L, D_k)
    # q^T W k: (..., L, S)
    return tf.cast(tf.linalg.matmul(projected_q, k, transpose_b=True), dtype)


def negative_distance_scores(query, key):
    r"""Negative Euclidean distance :math:`s_{ij} = -\lVert q_i - k_j \rVert` (source
    1's similarity, per pair).

    ``(..., L, D), (..., S, D) -> (..., L, S)``.
    """
    (q, k), dtype = _floats(query=query, key=key)
    _query_key_shapes(q, k)
    difference = q[..., :, None, :] - k[..., None, :, :]  # q_i - k_j: (..., L, S, D)
    return tf.cast(-tf.norm(difference, axis=-1), dtype)  # -||q_i - k_j||: (..., L, S)


def nadaraya_watson(x_query, x_keys, y_values, *, bandwidth=1.0):
    r"""Nadaraya-Watson regression with a Gaussian kernel, written as attention.

    .. math::
        \hat y(x) = \sum_i \operatorname{softmax}_i\!\Big(
                        -\frac{\lVert x - x_i\rVert^2}{2h^2}\Big) y_i
                  = \sum_i \operatorname{softmax}_i\!\Big(
                        \frac{x \cdot x_i - \lVert x_i\rVert^2 / 2}{h^2}\Big) y_i

    The ``||x||^2`` term is the same for every key and cancels in the softmax, so the
    weights are one matrix product plus a per-key bias. ``x_query (m,)`` or ``(m, d)``,
    ``x_keys (n,)`` or ``(n, d)``, ``y_values (n,)`` or ``(n, d_y)``; returns ``(m,)``
    or ``(m, d_y)`` following ``y_values``; ``h = bandwidth > 0``.
    """
    (xq, xk, y), dtype = _floats(x_query=x_query, x_keys=x_keys, y_values=y_values)
    qs, ks, ys = tuple(xq.shape), tuple(xk.shape), tuple(y.shape)
    for name, shape in (("x_query", qs), ("x_keys", ks), ("y_values", ys)):
        if len(shape) not in (1, 2):
            raise ValueError(
                f"{name} must be 1-D (one feature) or 2-D (n, d), got shape {shape}"
            )
    if len(qs) != len(ks):
        raise ValueError(f"x_query {qs} and x_keys {ks} must both be 1-D or both 2-D")
    if len(qs) == 2 and qs[1] != ks[1]:
        raise ValueError(
            f"x_query {qs} and x_keys {ks} must have the same number of features"
        )
    if ys[0] != ks[0]:
        raise ValueError(
            f"y_values {ys} must have one row per key, x_keys has shape {ks}"
        )
    if ks[0] == 0:
        raise ValueError("x_keys must hold at least one observation")
    h = float(bandwidth)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(
            f"bandwidth must be a positive finite number, got {bandwidth!r}"
        )
    q = tf.reshape(xq, (qs[0], -1))  # (m, d)
    k = tf.reshape(xk, (ks[0], -1))  # (n, d)
    key_bias = -0.5 * tf.reduce_sum(k * k, axis=-1)  # -||x_i||^2 / 2: (n,)
    # (x.x_i - ||x_i||^2/2) / h^2: (m, n)
    scores = (tf.linalg.matmul(q, k, transpose_b=True) + key_bias[None, :]) / (h * h)
    weights = softmax(scores, axis=-1)  # (m, n)
    values = y[:, None] if len(ys) == 1 else y  # (n, d_y)
    prediction = tf.linalg.matmul(weights, values)  # sum_i w_i y_i: (m, d_y)
    # (m,) or (m, d_y)
    return tf.cast(prediction[:, 0] if len(ys) == 1 else prediction, dtype)
