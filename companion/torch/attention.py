r"""Scaled dot-product attention for torch tensors: the readable reference and the tiled one.

The same functions as :mod:`companion.numpy.attention`, for torch tensors on any device
(the computation never leaves the inputs' device). Layouts, mask meaning, bottom-right
causal alignment, the grouped-query head map, fully masked rows and dtypes follow
:mod:`companion.conventions`.

Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
"""

from __future__ import annotations

import torch

from companion import _checks

__all__ = [
    "softmax",
    "causal_mask",
    "padding_mask",
    "attention_weights",
    "scaled_dot_product_attention_reference",
    "attention_tiled",
    "TiledAttentionFunction",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# helpers: dtypes, masks, grouped-query reshapes
# ---------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; float32/float64 compute in themselves."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _check_inputs(query, key, value) -> _checks.AttentionShapes:
    """Types, dtypes and shapes of ``query``, ``key``, ``value``, checked through ``_checks``."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        _checks.check_float(name, tensor.dtype)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must have the same dtype, got {_checks.dtype_name(query.dtype)}, "
            f"{_checks.dtype_name(key.dtype)} and {_checks.dtype_name(value.dtype)}"
        )
    return _checks.attention_shapes(
        tuple(query.shape), tuple(key.shape), tuple(value.shape)
    )


def _as_mask(
    mask,
    shapes: _checks.AttentionShapes,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "mask",
):
    """``mask`` as a tensor on ``device``: boolean stays boolean, a float mask becomes ``dtype``.

    Accepts torch tensors, numpy arrays and nested lists; checks that it broadcasts to
    ``(..., H, L, S)``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dtype == torch.bool:
        converted = mask.to(device=device)
    elif mask.is_floating_point():
        converted = mask.to(device=device, dtype=dtype)
    else:
        raise TypeError(
            f"{name} must be boolean (True = attend) or floating (added to the scaled scores), "
            f"got dtype {_checks.dtype_name(mask.dtype)}"
        )
    _checks.check_mask_shape(tuple(converted.shape), shapes, name)
    return converted


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _split_heads(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(..., H, L, D)`` -> ``(..., H_kv, group, L, D)``: query head ``h`` lands in group ``h // group``.

    Splitting an axis is always a view; no copy of the queries, none of the keys/values.
    """
    *lead, H, L, D = query.shape
    # (..., H_kv, group, L, D)
    return query.reshape(*lead, num_kv_heads, H // num_kv_heads, L, D)


def _merge_heads(grouped: torch.Tensor) -> torch.Tensor:
    """``(..., H_kv, group, L, X)`` -> ``(..., H, L, X)``."""
    *lead, H_kv, group, L, X = grouped.shape
    return grouped.reshape(*lead, H_kv * group, L, X)  # (..., H, L, X)


# ---------------------------------------------------------------------------------------
# building blocks: softmax and masks
# ---------------------------------------------------------------------------------------


def softmax(x: torch.Tensor, axis: int = -1, mask=None) -> torch.Tensor:
    r"""Numerically stable softmax along ``axis``; masked entries and all-masked rows give 0.

    .. math:: \operatorname{softmax}(x)_j = \frac{m_j\, e^{x_j - \max_k x_k}}{\sum_k m_k\, e^{x_k - \max_k x_k}}

    where ``m`` is the boolean ``mask`` (``True`` = keep, broadcast to ``x``). Entries of
    ``x`` equal to ``-inf`` count as masked too. A row with nothing kept gives exactly 0,
    never NaN. float16/bfloat16 accumulate in float32 and return their own dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _checks.check_float("x", x.dtype)
    if x.dim() == 0:
        raise ValueError("x must have at least one axis, got a 0-d tensor")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}")
    logits = x.to(_compute_dtype(x.dtype))
    if mask is not None:
        mask = torch.as_tensor(mask, device=x.device)
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be boolean (True = keep), got dtype {_checks.dtype_name(mask.dtype)}"
            )
        if _checks.broadcast_shape(tuple(mask.shape), tuple(x.shape)) != tuple(x.shape):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            )
        # masked -> -inf, by selection
        logits = logits.masked_fill(~mask, float("-inf"))
    row_max = logits.amax(dim=axis, keepdim=True)  # max_k x_k
    # all-masked row: 0
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # e^{x_j - max}, 0 where masked
    exp = torch.exp(logits - row_max)
    # sum_k e^{x_k - max}
    total = exp.sum(dim=axis, keepdim=True)
    weights = torch.where(
        total > 0,
        exp / torch.where(total > 0, total, torch.ones_like(total)),
        # 0 for an all-masked row
        torch.zeros_like(exp),
    )
    return weights.to(x.dtype)


def causal_mask(L: int, S: int, *, device=None) -> torch.Tensor:
    """Boolean ``(L, S)`` mask, bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (S - L)``.

    ::

        L = 2, S = 5      keys  0 1 2 3 4
              query 0           1 1 1 1 0
              query 1           1 1 1 1 1

    With ``L == S`` this is the lower triangle (torch's ``is_causal``); see
    :mod:`companion.conventions` for the top-left alignment of the built-ins. ``device``
    (torch only) places the mask.
    """
    for name, value in (("L", L), ("S", S)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    query_index = torch.arange(L, device=device).unsqueeze(-1)  # (L, 1)
    key_index = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    return key_index <= query_index + (S - L)  # (L, S)


def padding_mask(lengths, S: int) -> torch.Tensor:
    """Boolean ``(B, 1, 1, S)`` mask, ``True`` for key positions ``j < lengths[b]``.

    It broadcasts over heads and queries, so it can be passed as ``mask`` directly.
    A tensor ``lengths`` keeps its device.
    """
    if isinstance(S, bool) or not isinstance(S, int) or S < 0:
        raise ValueError(f"S must be a non-negative int, got {S!r}")
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(
            f"lengths must be 1-D (one length per batch element), got shape {tuple(lengths.shape)}"
        )
    if (
        lengths.is_floating_point()
        or lengths.is_complex()
        or lengths.dtype == torch.bool
    ):
        raise TypeError(
            f"lengths must be integers, got dtype {_checks.dtype_name(lengths.dtype)}"
        )
    if lengths.numel() and (bool((lengths < 0).any()) or bool((lengths > S).any())):
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths.tolist()}")
    key_index = torch.arange(S, device=lengths.device)  # (S,)
    keep = key_index.unsqueeze(0) < lengths.unsqueeze(-1)  # (B, S)
    return keep[:, None, None, :]  # (B, 1, 1, S)


# ---------------------------------------------------------------------------------------
# reference: the formula, written plainly
# ---------------------------------------------------------------------------------------


def _masked_scores(query, key, mask, causal, scale, shapes):
    """Scaled scores ``(..., H, L, S)`` with the mask applied (masked -> ``-inf``), in the compute dtype."""
    compute = _compute_dtype(query.dtype)
    # (..., H_kv, group, L, D)
    q = _split_heads(query.to(compute), shapes.H_kv)
    # (..., H_kv, 1, S, D)
    k = key.to(compute).unsqueeze(-3)
    scores = _merge_heads(scale * (q @ k.transpose(-1, -2)))  # (..., H, L, S)
    if mask is not None and mask.dtype == torch.bool:
        # boolean mask: hide by selection
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        # float mask: added to scaled scores
        scores = scores + mask
    if causal:
        visible = causal_mask(shapes.L, shapes.S, device=scores.device)  # (L, S)
        # bottom-right causal
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    r"""The attention weights :math:`P = \operatorname{softmax}(t\, Q K^\top + \text{mask})`, shape ``(..., H, L, S)``.

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``; grouped-query when ``H_kv < H``;
    ``t = scale`` or ``1/sqrt(D)``. Fully masked rows are exactly 0. See
    :mod:`companion.conventions`.
    """
    causal = _check_flag("causal", causal)
    shapes = _check_inputs(query, key, key)
    scale = _checks.resolve_scale(scale, shapes.D)
    mask = _as_mask(mask, shapes, query.device, _compute_dtype(query.dtype))
    scores = _masked_scores(query, key, mask, causal, scale, shapes)  # (..., H, L, S)
    return softmax(scores, axis=-1).to(query.dtype)  # (..., H, L, S)


def scaled_dot_product_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Scaled dot-product attention, written as the formula.

    .. math:: O = \operatorname{softmax}\!\left(t\, Q K^\top + \text{mask}\right) V, \qquad t = 1/\sqrt{D}

    Shapes: ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S, D_v)``
    -> ``(..., H, L, D_v)``. ``mask`` is boolean (``True`` = attend) or float (added to the
    scaled scores), broadcastable to ``(..., H, L, S)``; ``causal`` is bottom-right aligned;
    query head ``h`` reads key/value head ``h // (H // H_kv)``::

        H = 6, H_kv = 2     query heads  0 1 2 | 3 4 5
                            k/v head     0 0 0 | 1 1 1

    A query that may attend to nothing gives an output row of exactly 0. float16/bfloat16
    accumulate in float32 and return their own dtype. See :mod:`companion.conventions`.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    causal = _check_flag("causal", causal)
    shapes = _check_inputs(query, key, value)
    scale = _checks.resolve_scale(scale, shapes.D)
    compute = _compute_dtype(query.dtype)
    mask = _as_mask(mask, shapes, query.device, compute)
    scores = _masked_scores(query, key, mask, causal, scale, shapes)  # (..., H, L, S)
    weights = softmax(scores, axis=-1)  # (..., H, L, S)
    # (..., H_kv, group, L, S)
    grouped = _split_heads(weights, shapes.H_kv)
    # (..., H_kv, 1, S, D_v)
    v = value.to(compute).unsqueeze(-3)
    # (..., H, L, D_v)
    output = _merge_heads(grouped @ v)
    return output.to(query.dtype)


# ---------------------------------------------------------------------------------------
# fast: FlashAttention-2 tiles with a hand-written backward pass
# ---------------------------------------------------------------------------------------


def _block_scores(q_block, k_block, mask, causal, scale, rows, cols, L, S):
    """Scaled, masked scores of one tile: ``(..., H_kv, group, bq, bk)`` in the compute dtype.

    ``mask`` is the user's mask expanded (a view, no copy) to ``(..., H_kv, group, L, S)``;
    only its tile is read. ``rows``/``cols`` are the tile's query/key index ranges.
    """
    # (..., H_kv, group, bq, bk)
    scores = scale * (q_block @ k_block.transpose(-1, -2))
    if mask is not None:
        # (..., H_kv, group, bq, bk)
        tile = mask[..., rows.start : rows.stop, cols.start : cols.stop]
        if tile.dtype == torch.bool:
            scores = scores.masked_fill(~tile, float("-inf"))
        else:
            scores = scores + tile
    # the tile straddles the diagonal
    if causal and cols.stop - 1 > rows.start + (S - L):
        # (bq, 1)
        query_index = torch.arange(
            rows.start, rows.stop, device=scores.device
        ).unsqueeze(-1)
        # (1, bk)
        key_index = torch.arange(cols.start, cols.stop, device=scores.device).unsqueeze(
            0
        )
        scores = scores.masked_fill(key_index > query_index + (S - L), float("-inf"))
    return scores


def _tile_hidden(rows: range, cols: range, causal: bool, L: int, S: int) -> bool:
    """True when causal hides the whole tile: its first key lies past the last query's diagonal."""
    return causal and cols.start > (rows.stop - 1) + (S - L)


class TiledAttentionFunction(torch.autograd.Function):
    r"""FlashAttention-2 forward and backward on grouped tensors, as a ``torch.autograd.Function``.

    Inputs (prepared by :func:`attention_tiled`): ``q (..., H_kv, group, L, D)``,
    ``k (..., H_kv, 1, S, D)``, ``v (..., H_kv, 1, S, D_v)``, ``mask`` ``None`` or expanded
    to ``(..., H_kv, group, L, S)`` (a stride-0 view), ``causal``, ``scale``, ``block_q``,
    ``block_k``. Saves only ``q, k, v``, the output ``O`` and the log-sum-exp
    ``LSE (..., H_kv, group, L)``: O(L) memory beyond inputs and outputs.

    Backward recomputes :math:`P_{ij} = \exp(t Q_i K_j^\top - \mathrm{LSE}_i)` per tile and
    accumulates (``Delta_i = rowsum(dO_i * O_i)``)::

        dV_j += P_ij^T dO_i
        dP_ij = dO_i V_j^T
        dS_ij = P_ij * (dP_ij - Delta_i)
        dQ_i += t dS_ij K_j ;   dK_j += t dS_ij^T Q_i

    summing ``dK``/``dV`` over the query heads of a group. No gradient flows to a float
    ``mask`` (``None`` is returned for it). Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block_q, block_k):
        *lead, H_kv, group, L, D = q.shape
        S, D_v = k.shape[-2], v.shape[-1]
        compute = _compute_dtype(q.dtype)
        # (..., H_kv, group, L, D_v)
        output = torch.zeros(*lead, H_kv, group, L, D_v, dtype=q.dtype, device=q.device)
        # (..., H_kv, group, L)
        lse = torch.zeros(*lead, H_kv, group, L, dtype=compute, device=q.device)
        for i0 in range(0, L, block_q):
            rows = range(i0, min(i0 + block_q, L))
            # (..., H_kv, group, bq, D)
            q_block = q[..., rows.start : rows.stop, :].to(compute)
            row_max = torch.full(
                (*lead, H_kv, group, len(rows), 1),
                float("-inf"),
                # m (..., bq, 1)
                dtype=compute,
                device=q.device,
            )
            # l (..., bq, 1)
            row_sum = torch.zeros_like(row_max)
            # O~ (..., bq, D_v)
            acc = torch.zeros(
                *lead, H_kv, group, len(rows), D_v, dtype=compute, device=q.device
            )
            for j0 in range(0, S, block_k):
                cols = range(j0, min(j0 + block_k, S))
                if _tile_hidden(rows, cols, causal, L, S):
                    # every later tile is hidden too
                    break
                # (..., H_kv, 1, bk, D)
                k_block = k[..., cols.start : cols.stop, :].to(compute)
                # (..., H_kv, 1, bk, D_v)
                v_block = v[..., cols.start : cols.stop, :].to(compute)
                # S_ij (..., bq, bk)
                scores = _block_scores(
                    q_block, k_block, mask, causal, scale, rows, cols, L, S
                )
                # m_new (..., bq, 1)
                new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
                # -inf -> 0
                safe_max = torch.where(
                    torch.isinf(new_max), torch.zeros_like(new_max), new_max
                )
                # P~ = exp(S_ij - m_new) (..., bq, bk)
                p_tilde = torch.exp(scores - safe_max)
                # c = exp(m - m_new) (..., bq, 1)
                correction = torch.exp(row_max - safe_max)
                # l = c l + rowsum(P~)
                row_sum = correction * row_sum + p_tilde.sum(dim=-1, keepdim=True)
                # O~ = c O~ + P~ V_j (..., bq, D_v)
                acc = correction * acc + p_tilde @ v_block
                row_max = new_max
            # (..., bq, 1); False: fully masked
            attended = row_sum > 0
            safe_sum = torch.where(attended, row_sum, torch.ones_like(row_sum))
            output[..., rows.start : rows.stop, :] = torch.where(
                attended,
                acc / safe_sum,
                torch.zeros_like(acc),
                # O_i = O~ / l, 0 if
                # masked
            ).to(q.dtype)
            lse[..., rows.start : rows.stop] = torch.where(
                # LSE_i = m + log l
                attended,
                row_max + torch.log(safe_sum),
                torch.zeros_like(row_sum),
            ).squeeze(-1)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.mask = mask
        ctx.settings = (causal, scale, block_q, block_k)
        return output

    @staticmethod
    # the backward is hand-written: no double backward
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        q, k, v, output, lse = ctx.saved_tensors
        mask = ctx.mask
        causal, scale, block_q, block_k = ctx.settings
        L, S = q.shape[-2], k.shape[-2]
        compute = _compute_dtype(q.dtype)
        # dO (..., H_kv, group, L, D_v)
        grad_output = grad_output.to(compute)
        # Delta = rowsum(dO * O)
        delta = (grad_output * output.to(compute)).sum(dim=-1)
        # dQ (..., H_kv, group, L, D)
        grad_q = torch.zeros(q.shape, dtype=compute, device=q.device)
        # dK (..., H_kv, 1, S, D)
        grad_k = torch.zeros(k.shape, dtype=compute, device=k.device)
        # dV (..., H_kv, 1, S, D_v)
        grad_v = torch.zeros(v.shape, dtype=compute, device=v.device)
        for j0 in range(0, S, block_k):
            cols = range(j0, min(j0 + block_k, S))
            # K_j (..., H_kv, 1, bk, D)
            k_block = k[..., cols.start : cols.stop, :].to(compute)
            # V_j (..., H_kv, 1, bk, D_v)
            v_block = v[..., cols.start : cols.stop, :].to(compute)
            for i0 in range(0, L, block_q):
                rows = range(i0, min(i0 + block_q, L))
                if _tile_hidden(rows, cols, causal, L, S):
                    # P_ij = 0: no gradient
                    continue
                # Q_i (..., bq, D)
                q_block = q[..., rows.start : rows.stop, :].to(compute)
                # dO_i (..., bq, D_v)
                do_block = grad_output[..., rows.start : rows.stop, :]
                # (..., bq, bk)
                scores = _block_scores(
                    q_block, k_block, mask, causal, scale, rows, cols, L, S
                )
                # P_ij (..., bq, bk)
                probs = torch.exp(
                    scores - lse[..., rows.start : rows.stop].unsqueeze(-1)
                )
                grad_v[..., cols.start : cols.stop, :] += (
                    # dV_j += P^T dO (..., 1, bk, D_v)
                    probs.transpose(-1, -2) @ do_block
                ).sum(dim=-3, keepdim=True)
                # dP_ij = dO_i V_j^T (..., bq, bk)
                grad_probs = do_block @ v_block.transpose(-1, -2)
                # dS_ij
                grad_scores = probs * (
                    grad_probs - delta[..., rows.start : rows.stop].unsqueeze(-1)
                )
                # dQ_i += t dS K_j
                grad_q[..., rows.start : rows.stop, :] += scale * (
                    grad_scores @ k_block
                )
                grad_k[..., cols.start : cols.stop, :] += scale * (
                    # dK_j += t dS^T Q_i (..., 1, bk, D)
                    grad_scores.transpose(-1, -2) @ q_block
                ).sum(dim=-3, keepdim=True)
        return (
            grad_q.to(q.dtype),
            grad_k.to(k.dtype),
            grad_v.to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def attention_tiled(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    r"""Scaled dot-product attention by FlashAttention-2 tiles; same result as the reference.

    Computes :func:`scaled_dot_product_attention_reference` one ``block_q x block_k`` tile
    at a time with the online softmax (the recurrence is in :class:`TiledAttentionFunction`
    and in the book), never holding an ``L x S`` matrix of scores, and skipping key blocks
    that the (bottom-right) causal mask hides entirely. The backward pass is the
    FlashAttention-2 backward: it recomputes each tile's probabilities from the saved
    log-sum-exp. Gradients flow to ``query``, ``key`` and ``value``; **not** to a float
    ``mask`` (treated as a constant).

    Shapes, mask, causal, grouped-query and dtype rules are those of the reference:
    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``, ``value (..., H_kv, S, D_v)``
    -> ``(..., H, L, D_v)``. ``block_q`` and ``block_k`` need not divide ``L`` and ``S``.

    Explained in the book chapter *Making it fast*.
    """
    causal = _check_flag("causal", causal)
    shapes = _check_inputs(query, key, value)
    scale = _checks.resolve_scale(scale, shapes.D)
    block_q = _checks.check_int("block_q", block_q)
    block_k = _checks.check_int("block_k", block_k)
    mask = _as_mask(mask, shapes, query.device, _compute_dtype(query.dtype))
    batch, H, H_kv, L, S = shapes.batch, shapes.H, shapes.H_kv, shapes.L, shapes.S
    # (..., H_kv, group, L, D)
    q = _split_heads(query.expand(*batch, H, L, shapes.D), H_kv)
    # (..., H_kv, 1, S, D)
    k = key.expand(*batch, H_kv, S, shapes.D).unsqueeze(-3)
    # (..., H_kv, 1, S, D_v)
    v = value.expand(*batch, H_kv, S, shapes.D_v).unsqueeze(-3)
    if mask is not None:
        # (..., H_kv, group, L, S), a view
        mask = _split_heads(mask.expand(*shapes.scores), H_kv)
        mask = mask.detach()
    output = TiledAttentionFunction.apply(
        q, k, v, mask, bool(causal), scale, block_q, block_k
    )
    # (..., H, L, D_v)
    return _merge_heads(output)
