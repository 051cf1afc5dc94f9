r"""Attention score functions and Nadaraya-Watson kernel regression, for torch tensors.

The same functions as :mod:`companion.numpy.scores`. Each score function maps queries
``(..., L, D_q)`` and keys ``(..., S, D_k)`` to scores ``(..., L, S)``; a softmax over
the last axis turns them into attention weights. Leading axes broadcast.

Explained in the book chapter *Attention: algorithm and math*.
"""

from __future__ import annotations

import torch

from companion import _checks
from companion.torch.attention import softmax

__all__ = [
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "multiplicative_scores",
    "negative_distance_scores",
    "nadaraya_watson",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _check_tensors(**tensors) -> torch.dtype:
    """Every argument a floating torch tensor of one dtype; return that dtype."""
    dtypes = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        _checks.check_float(name, tensor.dtype)
        dtypes[name] = tensor.dtype
    if len(set(dtypes.values())) > 1:
        seen = ", ".join(f"{n} {_checks.dtype_name(d)}" for n, d in dtypes.items())
        raise TypeError(f"all inputs must have the same dtype, got {seen}")
    return next(iter(dtypes.values()))


def _check_pair(query: torch.Tensor, key: torch.Tensor, same_dim: bool = True) -> None:
    """``query (..., L, D)`` and ``key (..., S, D)``: at least 2 axes, equal ``D``,
    broadcasting leading axes."""
    for name, tensor in (("query", query), ("key", key)):
        if tensor.dim() < 2:
            raise ValueError(
                f"{name} must have shape (..., length, dim) with at least 2 axes, "
                f"got shape {tuple(tensor.shape)}"
            )
    if same_dim and query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "query and key must have the same last dimension D: query "
            f"{tuple(query.shape)}, "
            f"key {tuple(key.shape)}"
        )
    try:
        _checks.broadcast_shape(tuple(query.shape[:-2]), tuple(key.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"the leading axes of query {tuple(query.shape)} and key "
            f"{tuple(key.shape)} "
            "do not broadcast"
        ) from None


def dot_product_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    r"""Dot-product scores :math:`s_{ij} = q_i \cdot k_j`: ``(..., L, D)``, ``(..., S,
    D)`` -> ``(..., L, S)``."""
    dtype = _check_tensors(query=query, key=key)
    _check_pair(query, key)
    compute = _compute_dtype(dtype)
    # (..., L, S)
    return (query.to(compute) @ key.to(compute).transpose(-1, -2)).to(dtype)


def scaled_dot_product_scores(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    r"""Scaled dot-product scores :math:`s_{ij} = t\, q_i \cdot k_j`, ``t = scale`` or
    ``1/sqrt(D)``.

    ``(..., L, D)``, ``(..., S, D)`` -> ``(..., L, S)``.
    """
    dtype = _check_tensors(query=query, key=key)
    _check_pair(query, key)
    scale = _checks.resolve_scale(scale, query.shape[-1])
    compute = _compute_dtype(dtype)
    # (..., L, S)
    return (scale * (query.to(compute) @ key.to(compute).transpose(-1, -2))).to(dtype)


def additive_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    r"""Additive (Bahdanau) scores :math:`s_{ij} = v^\top \tanh(W_q^\top q_i + W_k^\top
    k_j)`.

    Shapes: ``query (..., L, D_q)``, ``key (..., S, D_k)``, ``w_q (D_q, A)``,
    ``w_k (D_k, A)``, ``v (A,)`` -> ``(..., L, S)``. Weights are applied as ``x @ W``.
    Holds an ``(..., L, S, A)`` intermediate, as the formula does.
    """
    dtype = _check_tensors(query=query, key=key, w_q=w_q, w_k=w_k, v=v)
    _check_pair(query, key, same_dim=False)
    if w_q.dim() != 2 or w_k.dim() != 2 or v.dim() != 1:
        raise ValueError(
            f"w_q, w_k must be 2-D and v 1-D, got shapes {tuple(w_q.shape)}, "
            f"{tuple(w_k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if (
        w_q.shape[0] != query.shape[-1]
        or w_k.shape[0] != key.shape[-1]
        or not (w_q.shape[1] == w_k.shape[1] == v.shape[0])
    ):
        raise ValueError(
            f"shapes do not fit: query {tuple(query.shape)} needs w_q (D_q, A), key "
            f"{tuple(key.shape)} "
            f"needs w_k (D_k, A), v (A,); got w_q {tuple(w_q.shape)}, w_k "
            f"{tuple(w_k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    compute = _compute_dtype(dtype)
    # W_q q: (..., L, A)
    projected_q = query.to(compute) @ w_q.to(compute)
    # W_k k: (..., S, A)
    projected_k = key.to(compute) @ w_k.to(compute)
    # (..., L, S, A)
    hidden = torch.tanh(projected_q.unsqueeze(-2) + projected_k.unsqueeze(-3))
    # v^T tanh(...): (..., L, S)
    return (hidden @ v.to(compute)).to(dtype)


def multiplicative_scores(
    query: torch.Tensor, key: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    r"""Multiplicative (Luong "general") scores :math:`s_{ij} = q_i^\top W k_j`.

    Shapes: ``query (..., L, D_q)``, ``key (..., S, D_k)``, ``w (D_q, D_k)`` ->
    ``(..., L, S)``.
    """
    dtype = _check_tensors(query=query, key=key, w=w)
    _check_pair(query, key, same_dim=False)
    if w.dim() != 2 or tuple(w.shape) != (query.shape[-1], key.shape[-1]):
        raise ValueError(
            f"w must have shape (D_q, D_k) = ({query.shape[-1]}, {key.shape[-1]}) for "
            "query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}, got {tuple(w.shape)}"
        )
    compute = _compute_dtype(dtype)
    # q^T W: (..., L, D_k)
    projected_q = query.to(compute) @ w.to(compute)
    # (..., L, S)
    return (projected_q @ key.to(compute).transpose(-1, -2)).to(dtype)


def negative_distance_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    r"""Negative Euclidean distance :math:`s_{ij} = -\lVert q_i - k_j \rVert` (the
    source documents' score).

    ``(..., L, D)``, ``(..., S, D)`` -> ``(..., L, S)``. Computed from the differences
    (exact, no cancellation), holding an ``(..., L, S, D)`` intermediate.
    """
    dtype = _check_tensors(query=query, key=key)
    _check_pair(query, key)
    compute = _compute_dtype(dtype)
    # q_i - k_j: (..., L, S, D)
    difference = query.to(compute).unsqueeze(-2) - key.to(compute).unsqueeze(-3)
    # (..., L, S)
    return (-torch.linalg.vector_norm(difference, dim=-1)).to(dtype)


def nadaraya_watson(
    x_query: torch.Tensor,
    x_keys: torch.Tensor,
    y_values: torch.Tensor,
    *,
    bandwidth: float = 1.0,
) -> torch.Tensor:
    r"""Nadaraya-Watson kernel regression with a Gaussian kernel: attention with
    distance scores.

    .. math:: \hat y(x) = \sum_i \operatorname{softmax}_i\!\left(
        -\frac{\lVert x - x_i\rVert^2}{2h^2}\right) y_i,
              \qquad h = \text{bandwidth}

    ``x_query`` is ``(m,)`` or ``(m, d)``, ``x_keys`` ``(n,)`` or ``(n, d)`` (1-D means
    one feature), ``y_values`` ``(n,)`` or ``(n, d_y)``; the result is ``(m,)`` or
    ``(m, d_y)``.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    dtype = _check_tensors(x_query=x_query, x_keys=x_keys, y_values=y_values)
    bandwidth = float(bandwidth)
    if not bandwidth > 0 or bandwidth == float("inf"):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth}")
    for name, tensor in (
        ("x_query", x_query),
        ("x_keys", x_keys),
        ("y_values", y_values),
    ):
        if tensor.dim() not in (1, 2):
            raise ValueError(
                f"{name} must be 1-D (one feature) or 2-D (n, d), got shape "
                f"{tuple(tensor.shape)}"
            )
    if x_query.dim() != x_keys.dim():
        raise ValueError(
            f"x_query {tuple(x_query.shape)} and x_keys {tuple(x_keys.shape)} must "
            "both be 1-D "
            "or both 2-D"
        )
    if x_query.dim() == 2 and x_query.shape[1] != x_keys.shape[1]:
        raise ValueError(
            f"x_query {tuple(x_query.shape)} and x_keys {tuple(x_keys.shape)} must "
            "have the same "
            "number of features"
        )
    if x_keys.shape[0] == 0:
        raise ValueError("x_keys must hold at least one observation")
    # (m, d)
    queries = x_query.reshape(x_query.shape[0], -1)
    # (n, d)
    keys = x_keys.reshape(x_keys.shape[0], -1)
    if y_values.shape[0] != keys.shape[0]:
        raise ValueError(
            f"y_values {tuple(y_values.shape)} must have one row per key, x_keys has "
            "shape "
            f"{tuple(x_keys.shape)}"
        )
    compute = _compute_dtype(dtype)
    # x - x_i: (m, n, d)
    difference = queries.to(compute).unsqueeze(-2) - keys.to(compute).unsqueeze(-3)
    # -||x - x_i||^2 / 2h^2: (m, n)
    scores = -(difference**2).sum(dim=-1) / (2.0 * bandwidth**2)
    # (m, n)
    weights = softmax(scores, axis=-1)
    # (m,) or (m, d_y)
    return (weights @ y_values.to(compute)).to(dtype)
