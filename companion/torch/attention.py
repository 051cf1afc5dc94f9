r"""Scaled dot-product attention for torch tensors: the readable and the tiled version.

The same functions as :mod:`companion.numpy.attention`, for torch tensors on any device
(the computation never leaves the inputs' device). Layouts, mask meaning, bottom-right
causal alignment, the grouped-query head map, fully masked rows and dtypes follow
:mod:`companion.conventions`.

Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from companion import _checks, _tiling

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


# --------------------------------------------------------------------------------------
# helpers: dtypes, masks, grouped-query reshapes
# --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; float32/float64 compute in themselves."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _check_inputs(query, key, value) -> _checks.AttentionShapes:
    """Types, dtypes and shapes of ``query``, ``key``, ``value`` (by ``_checks``)."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        _checks.check_float(name, tensor.dtype)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must have the same dtype, got "
            f"{_checks.dtype_name(query.dtype)}, {_checks.dtype_name(key.dtype)} and "
            f"{_checks.dtype_name(value.dtype)}"
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
    """``mask`` as a tensor on ``device``: bool stays bool, float becomes ``dtype``.

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
            f"{name} must be boolean (True = attend) or floating (added to the scaled "
            f"scores), got dtype {_checks.dtype_name(mask.dtype)}"
        )
    _checks.check_mask_shape(tuple(converted.shape), shapes, name)
    return converted


def _check_flag(name: str, value) -> bool:
    return _checks.check_flag(name, value)  # a numpy bool too, as in every backend


def _split_heads(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(..., H, L, D)`` -> ``(..., H_kv, group, L, D)``: head ``h`` -> ``h // group``.

    Splitting an axis is always a view; no copy of the queries, none of the keys/values.
    """
    *lead, H, L, D = query.shape
    # (..., H_kv, group, L, D)
    return query.reshape(*lead, num_kv_heads, H // num_kv_heads, L, D)


def _merge_heads(grouped: torch.Tensor) -> torch.Tensor:
    """``(..., H_kv, group, L, X)`` -> ``(..., H, L, X)``."""
    *lead, H_kv, group, L, X = grouped.shape
    return grouped.reshape(*lead, H_kv * group, L, X)  # (..., H, L, X)


def _fold_group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(..., H, L, X)`` -> ``(..., H_kv, G * L, X)``: the group folded into the rows.

    Row ``g * L + l`` of key/value head ``k`` is row ``l`` of query head ``k * G + g``
    (a view of a contiguous ``x``). One matmul of these rows with the keys
    ``(..., H_kv, S, D)`` reads every key once; splitting the queries as
    ``(..., H_kv, G, L, D)`` against keys broadcast as ``(..., H_kv, 1, S, D)`` makes
    ``torch.matmul`` expand and copy the keys ``G`` times.
    """
    *lead, H, L, X = x.shape
    # (..., H_kv, G * L, X)
    return x.reshape(*lead, num_kv_heads, (H // num_kv_heads) * L, X)


def _unfold_group(folded: torch.Tensor, H: int, L: int) -> torch.Tensor:
    """``(..., H_kv, G * L, X)`` -> ``(..., H, L, X)``, the inverse of `_fold_group`."""
    *lead, _, _, X = folded.shape
    return folded.reshape(*lead, H, L, X)  # (..., H, L, X)


def _grouped_product(
    query: torch.Tensor, key_t: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """``query (..., H, L, X) @ key_t (..., H_kv, X, Y)`` -> ``(..., H, L, Y)``.

    Query head ``h`` meets key/value head ``h // G``; the group is folded into the
    rows (`_fold_group`), so ``key_t`` is never copied per group member.
    """
    H, L = query.shape[-3:-1]
    # (..., H_kv, G * L, X) @ (..., H_kv, X, Y) -> (..., H_kv, G * L, Y)
    folded = _fold_group(query, num_kv_heads) @ key_t
    return _unfold_group(folded, H, L)  # (..., H, L, Y)


# --------------------------------------------------------------------------------------
# building blocks: softmax and masks
# --------------------------------------------------------------------------------------


def softmax(x: torch.Tensor, axis: int = -1, mask=None) -> torch.Tensor:
    r"""Numerically stable softmax along ``axis``; masked entries and rows give 0.

    .. math:: \operatorname{softmax}(x)_j = \frac{m_j\, e^{x_j - \max_k x_k}}
              {\sum_k m_k\, e^{x_k - \max_k x_k}}

    where ``m`` is the boolean ``mask`` (``True`` = keep, broadcast to ``x``).
    Entries of ``x`` equal to ``-inf`` count as masked too. A row with nothing kept
    gives exactly 0, never NaN. float16/bfloat16 accumulate in float32 and return
    their own dtype.
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
                "mask must be boolean (True = keep), got dtype "
                f"{_checks.dtype_name(mask.dtype)}"
            )
        if _checks.broadcast_shape(tuple(mask.shape), tuple(x.shape)) != tuple(x.shape):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
                f"{tuple(x.shape)}"
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


def causal_mask(
    L: int, S: int, *, window: int | None = None, device=None
) -> torch.Tensor:
    """Boolean ``(L, S)``, bottom-right aligned: query ``i`` sees ``j <= i + S - L``.

    ::

        L = 2, S = 5      keys  0 1 2 3 4
              query 0           1 1 1 1 0
              query 1           1 1 1 1 1

    With ``L == S`` this is the lower triangle (torch's ``is_causal``); see
    :mod:`companion.conventions` for the top-left alignment of the built-ins. With
    ``window = w`` query ``i`` (position ``p = i + (S - L)``) sees only the last ``w``
    keys, ``p - w < j <= p`` (sliding-window attention)::

        L = S = 5, window = 2     1 0 0 0 0
                                  1 1 0 0 0
                                  0 1 1 0 0
                                  0 0 1 1 0
                                  0 0 0 1 1

    ``device`` (torch only) places the mask.
    """
    for name, value in (("L", L), ("S", S)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    window = _tiling.check_window(window)
    return _band(0, L, 0, S, L, S, True, window, device)  # (L, S)


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
            "lengths must be 1-D (one length per batch element), got shape "
            f"{tuple(lengths.shape)}"
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


# --------------------------------------------------------------------------------------
# reference: the formula, written plainly
# --------------------------------------------------------------------------------------


def _masked_scores(query, key, mask, causal, scale, shapes, window=None):
    """Scaled scores ``(..., H, L, S)``, masked -> ``-inf``, in the compute dtype."""
    compute = _compute_dtype(query.dtype)
    # (..., H_kv, D, S): read in place by every query head of its group
    k_t = key.to(compute).transpose(-1, -2)
    # t Q K^T, the group folded into the rows: (..., H, L, S)
    scores = scale * _grouped_product(query.to(compute), k_t, shapes.H_kv)
    if mask is not None and mask.dtype == torch.bool:
        # boolean mask: hide by selection
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        # float mask: added to scaled scores
        scores = scores + mask
    if causal or window is not None:
        L, S = shapes.L, shapes.S
        # bottom-right causal and/or the window's band: (L, S)
        visible = _band(0, L, 0, S, L, S, causal, window, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    r"""The attention weights, shape ``(..., H, L, S)``.

    .. math:: P = \operatorname{softmax}(t\, Q K^\top + \text{mask})

    ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``; grouped-query when
    ``H_kv < H``; ``t = scale`` or ``1/sqrt(D)``; ``window`` as in :func:`causal_mask`
    (with ``causal=False`` a symmetric band ``|p - j| < window``). Fully masked rows are
    exactly 0. See
    :mod:`companion.conventions`.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    shapes = _check_inputs(query, key, key)
    scale = _checks.resolve_scale(scale, shapes.D)
    mask = _as_mask(mask, shapes, query.device, _compute_dtype(query.dtype))
    scores = _masked_scores(
        query, key, mask, causal, scale, shapes, window
    )  # (..., H, L, S)
    return softmax(scores, axis=-1).to(query.dtype)  # (..., H, L, S)


def scaled_dot_product_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    r"""Scaled dot-product attention, written as the formula.

    .. math:: O = \operatorname{softmax}\!\left(t\, Q K^\top + \text{mask}\right) V,
              \qquad t = 1/\sqrt{D}

    Shapes: ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``,
    ``value (..., H_kv, S, D_v)`` -> ``(..., H, L, D_v)``. ``mask`` is boolean
    (``True`` = attend) or float (added to the scaled scores), broadcastable to
    ``(..., H, L, S)``; ``causal`` is bottom-right aligned; ``window = w`` keeps only
    keys within ``w`` positions (``p - w < j <= p`` with ``causal``, ``|p - j| < w``
    without, ``p = i + (S - L)``); query head ``h`` reads key/value head
    ``h // (H // H_kv)``::

        H = 6, H_kv = 2     query heads  0 1 2 | 3 4 5
                            k/v head     0 0 0 | 1 1 1

    A query that may attend to nothing gives an output row of exactly 0.
    float16/bfloat16 accumulate in float32 and return their own dtype. See
    :mod:`companion.conventions`.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    shapes = _check_inputs(query, key, value)
    scale = _checks.resolve_scale(scale, shapes.D)
    compute = _compute_dtype(query.dtype)
    mask = _as_mask(mask, shapes, query.device, compute)
    scores = _masked_scores(
        query, key, mask, causal, scale, shapes, window
    )  # (..., H, L, S)
    weights = softmax(scores, axis=-1)  # (..., H, L, S)
    # P V, the group folded into the rows: (..., H, L, D_v)
    output = _grouped_product(weights, value.to(compute), shapes.H_kv)
    return output.to(query.dtype)


# --------------------------------------------------------------------------------------
# fast: FlashAttention-2 on large tiles, all heads at once, hand-written backward pass
# --------------------------------------------------------------------------------------

# One step computes about this many scores for all heads together (1 MiB of float32,
# half a core's L2 cache): each torch op then runs from the cache, and for one head at
# n = 4096 a step is a 1024 x 256 tile, so the Python loop runs a few dozen steps.
# Measured at n = 4096, d = 64, one thread: 1024 x 256 steps 47 ms (full) and 29 ms
# (causal), all 4096 rows x 512 keys per step 65 and 33 ms.
_STEP_NUMBERS = 1 << 18


def _default_blocks(rows: int, L: int, S: int) -> tuple[int, int]:
    """``(block_q, block_k)`` from the shapes; ``rows`` = batch x heads x ``L``.

    Keys in blocks of 256 (fewer when ``S`` is shorter); query rows in chunks that keep
    one step of all heads near :data:`_STEP_NUMBERS` scores, at least 16 rows.
    """
    block_k = max(1, min(S, 256))
    per_row = max(1, rows // max(1, L))  # heads x group
    block_q = max(16, _STEP_NUMBERS // (per_row * block_k))
    return max(1, min(L, block_q)), block_k


def _band(i0, i1, j0, j1, L, S, causal, window, device) -> torch.Tensor:
    """Boolean ``(i1 - i0, j1 - j0)``: which keys each query row may see (``_tiling``).

    Row ``r`` is query ``i0 + r`` at position ``p = i0 + r + (S - L)``, column ``c`` is
    key ``j0 + c``; ``c <= r + k`` with ``k = p - j`` at ``r = c = 0`` is ``tril(k)``.
    """
    k = i0 + (S - L) - j0  # diagonal offset of the tile
    left, right = _tiling.bounds(causal, window)  # -left <= d <= right
    visible = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if right is not None:
        visible.tril_(k + right)  # d <= right (causal: d <= 0)
    if left is not None:
        visible.triu_(k - left)  # d >= -left (a window w: d > -w)
    return visible


def _tile_scores(q_i, k_j, mask, band, i0, i1, j0, j1, group):
    """Scores of one tile for all heads: ``(N, bq * G, bk)``, masked entries ``-inf``.

    ``q_i (N, bq * G, D)`` holds the scaled queries row-major by position then group
    member; ``mask`` is ``None`` or ``(..., H_kv, G, L, S)`` (a broadcast view, never
    copied to full size); ``band`` ``None`` or ``(bq, bk)`` bool.
    """
    scores = torch.bmm(q_i, k_j.transpose(1, 2))  # t Q_i K_j^T: (N, bq * G, bk)
    # (N, bq, G, bk): the same memory, split by group member
    split = scores.view(scores.shape[0], i1 - i0, group, j1 - j0)
    if mask is not None:
        # (..., H_kv, bq, G, bk), a view of the user's mask
        tile = mask[..., i0:i1, j0:j1].transpose(-3, -2)
        split = split.view(tile.shape)
        if tile.dtype == torch.bool:
            split.masked_fill_(~tile, float("-inf"))
        else:
            split.add_(tile)
    if band is not None:
        split.masked_fill_(~band[:, None, :], float("-inf"))  # (bq, 1, bk)
    return scores


class TiledAttentionFunction(torch.autograd.Function):
    r"""FlashAttention-2 forward and backward as a ``torch.autograd.Function``.

    Inputs (prepared by :func:`attention_tiled`): ``q (N, L * G, D)``, the scaled
    queries ``t Q`` of ``N = batch x H_kv`` key/value heads, their ``G`` grouped query
    heads interleaved row by row (row ``i * G + g`` is query ``i`` of group member
    ``g``); ``k (N, S, D)``, ``v (N, S, D_v)`` (never copied per group member); ``mask``
    ``None`` or ``(..., H_kv, G, L, S)`` (a broadcast view); ``plan`` from
    ``companion._tiling.key_plan``; ``group``, ``causal``, ``window``. Returns
    ``O (N, L * G, D_v)``.

    The plan walks the key blocks once; each step is one batched matmul over all heads
    and all the query rows that see the block (a mask is built only for the rows at the
    causal diagonal or the window's edge), so the Python loop runs a few dozen steps,
    updating running statistics of every row in place. On several CPU threads the rows
    are split into equal-work ranges run by one Python worker each
    (``_run_split``).
    Saves ``q, k, v``, ``O`` and the log-sum-exp ``LSE (N, L * G)``, no ``L x S`` one.
    Backward recomputes :math:`P_{ij} = \exp(t Q_i K_j^\top - \mathrm{LSE}_i)` per tile
    (``Delta_i = rowsum(dO_i * O_i)``)::

        dV_j += P_ij^T dO_i
        dP_ij = dO_i V_j^T
        dS_ij = P_ij * (dP_ij - Delta_i)
        dQ_i += dS_ij K_j ;   dK_j += dS_ij^T (t Q_i)

    The gradient of the scaled queries is returned; ``attention_tiled`` scales it by
    ``t`` through autograd. Rows ``i * G + g`` of a tile belong to the same key/value
    head, so ``dK``/``dV`` sum over the group inside the matmul. No gradient flows to a
    float ``mask``. Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, plan, group, causal, window):
        N, rows, _ = q.shape
        L, S, D_v = rows // group, k.shape[1], v.shape[2]
        # running statistics of every query row, updated in place slice by slice; the
        # running max starts at the lowest finite number, not -inf, so that
        # exp(S - m) and exp(m_old - m) need no guard for rows that saw nothing yet
        lowest = torch.finfo(q.dtype).min
        m = torch.full((N, rows, 1), lowest, dtype=q.dtype, device=q.device)
        l = torch.zeros_like(m)  # (N, L * G, 1)
        acc = torch.zeros(N, rows, D_v, dtype=q.dtype, device=q.device)  # O~
        # [t Q | -m] [K_j | 1]^T = t Q K_j^T - m: the product subtracts the maximum
        q_aug = torch.cat([q, -m], dim=-1)  # (N, L * G, D + 1)
        k_aug = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)  # (N, S, D + 1)
        sizes = (group, L, S, causal, window)

        def work(part):
            _forward_steps((q, k, v), (q_aug, k_aug), mask, part, sizes, m, l, acc)

        _run_split(work, plan, sizes, q)
        attended = l > 0  # False: the row saw no key
        output = acc.div_(torch.where(attended, l, torch.ones_like(l)))  # O = O~ / l
        # LSE = m + log l
        lse = torch.where(attended, m + torch.log(l), 0.0).squeeze(-1)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.mask = mask
        ctx.settings = (plan, group, causal, window)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        q, k, v, output, lse = ctx.saved_tensors
        mask, (plan, group, causal, window) = ctx.mask, ctx.settings
        L, S = q.shape[1] // group, k.shape[1]
        sizes = (group, L, S, causal, window)
        grad_output = grad_output.contiguous()  # dO (N, L * G, D_v)
        delta = (grad_output * output).sum(dim=-1, keepdim=True)  # (N, L * G, 1)
        lse = lse.unsqueeze(-1)  # (N, L * G, 1)
        grad_q = torch.zeros_like(q)  # (N, L * G, D): rows split between workers
        partial_kv = []  # (dK, dV) of each worker, summed at the end

        def work(part):
            grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
            partial_kv.append((grad_k, grad_v))
            inputs = (q, k, v, mask, grad_output, delta, lse)
            _backward_steps(*inputs, part, sizes, grad_q, grad_k, grad_v)

        _run_split(work, plan, sizes, q)
        grad_k = sum(g for g, _ in partial_kv[1:]) + partial_kv[0][0]
        grad_v = sum(g for _, g in partial_kv[1:]) + partial_kv[0][1]
        return grad_q, grad_k, grad_v, None, None, None, None, None


# A tile whose probabilities, taken against the rows' running maxima as they were, sum
# to at most this needs no new maximum (``_forward_steps``): every entry is then at most
# 2^20 (the maximum moved up by at most 13.9), far from float32's overflow.
_STALE_MAX_LIMIT = float(2**20)


def _forward_steps(plain, augmented, mask, plan, sizes, m, l, acc):
    """The forward recurrence over ``plan``, updating ``m, l, acc`` rows in place.

    ``plain = (t Q, K, V)``, ``augmented = ([t Q | -m], [K | 1])``. A row block's first
    key block takes the step as written (:func:`_exact_step`). Later ones first keep
    the rows' maxima (FlashAttention-4's conditional rescaling): the product
    ``[t Q_i | -m] [K_j | 1]^T = S_ij - m`` subtracts the maximum, so
    ``P~ = exp(S_ij - m)`` costs no pass for the maximum, the subtraction or the
    rescaling; only if some row's ``rowsum P~`` passes ``_STALE_MAX_LIMIT`` (``inf`` or
    NaN included: a row that saw no key yet has ``-m`` = the largest number) does the
    block take the exact step instead. The softmax does not depend on which ``m`` is
    subtracted, so the result is the recurrence's.
    """
    group, L, S, causal, window = sizes
    q_aug, k_aug = augmented
    for j0, j1, chunks in plan:
        k_j, v_j = k_aug[:, j0:j1], plain[2][:, j0:j1]  # (N, bk, D + 1), (N, bk, D_v)
        for i0, i1, full in chunks:
            r0, r1 = i0 * group, i1 * group
            band = (
                None
                if full
                else _band(i0, i1, j0, j1, L, S, causal, window, k_j.device)
            )
            tile = (mask, band, i0, i1, j0, j1, group)
            lo, _ = _tiling.key_range(i0, i0 + 1, L, S, causal, window)
            if j0 > lo:  # the rows saw keys before: keep their maxima
                # P~ = exp(S_ij - m): (N, bq * G, bk)
                p = _tile_scores(q_aug[:, r0:r1], k_j, *tile).exp_()
                row_sum = p.sum(dim=-1, keepdim=True)  # rowsum P~
                if bool((row_sum <= _STALE_MAX_LIMIT).all()):
                    l[:, r0:r1].add_(row_sum)  # l = l + rowsum P~
                    acc[:, r0:r1].baddbmm_(p, v_j)  # O~ = O~ + P~ V_j
                    continue
            q_i, k_plain = plain[0][:, r0:r1], plain[1][:, j0:j1]
            state = (m[:, r0:r1], l[:, r0:r1], acc[:, r0:r1])  # views
            _exact_step(q_i, k_plain, v_j, tile, *state)
            q_aug[:, r0:r1, -1:] = -m[:, r0:r1]  # the products subtract the new m


def _exact_step(q_i, k_j, v_j, tile, m_i, l_i, acc_i):
    """One step of the recurrence as written, in place: ``q_i = t Q_i``, ``k_j``,
    ``v_j``, ``tile`` the rest of :func:`_tile_scores`' arguments, ``m_i, l_i``
    ``(N, bq * G, 1)`` and ``acc_i`` views of the running state."""
    scores = _tile_scores(q_i, k_j, *tile)  # S_ij (N, bq * G, bk)
    # m_new = max(m, rowmax S_ij)
    m_new = torch.maximum(m_i, scores.amax(dim=-1, keepdim=True))
    p = scores.sub_(m_new).exp_()  # P~ = exp(S_ij - m_new), in place
    c = m_i.sub(m_new).exp_()  # c = exp(m - m_new)
    l_i.mul_(c).add_(p.sum(dim=-1, keepdim=True))  # l = c l + rowsum P~
    acc_i.mul_(c).baddbmm_(p, v_j)  # O~ = c O~ + P~ V_j
    m_i.copy_(m_new)


def _backward_steps(q, k, v, mask, do, delta, lse, plan, sizes, dq, dk, dv):
    """The backward recurrence over ``plan``, accumulating into ``dq, dk, dv``."""
    group, L, S, causal, window = sizes
    for j0, j1, chunks in plan:
        k_j, v_j = k[:, j0:j1], v[:, j0:j1]
        dk_j, dv_j = dk[:, j0:j1], dv[:, j0:j1]  # views
        for i0, i1, full in chunks:
            r0, r1 = i0 * group, i1 * group
            band = (
                None if full else _band(i0, i1, j0, j1, L, S, causal, window, q.device)
            )
            q_i, do_i = q[:, r0:r1], do[:, r0:r1]
            scores = _tile_scores(q_i, k_j, mask, band, i0, i1, j0, j1, group)
            p = scores.sub_(lse[:, r0:r1]).exp_()  # P_ij (N, bq * G, bk)
            dv_j.baddbmm_(p.transpose(1, 2), do_i)  # dV_j += P^T dO_i
            # dS = P * (dO_i V_j^T - Delta_i)
            grad_s = torch.bmm(do_i, v_j.transpose(1, 2))
            grad_s.sub_(delta[:, r0:r1]).mul_(p)
            dq[:, r0:r1].baddbmm_(grad_s, k_j)  # dQ_i += dS K_j
            dk_j.baddbmm_(grad_s.transpose(1, 2), q_i)  # dK_j += dS^T tQ_i


# Split the query rows between Python threads (each running torch on one thread) from
# this many scores on: one parallel region per call instead of one per torch op, which
# keeps two threads useful on a busy machine, where every op's barrier waits for both.
_SPLIT_SCORES = 1 << 20


def _run_split(work, plan, sizes, q):
    """Run ``work(plan part)`` for the whole plan, split by query rows over threads.

    With ``torch.get_num_threads() > 1`` on CPU and a large problem, the rows are cut
    into one range per thread of about equal work (a row's work is the number of keys
    it sees), each worker runs its rows with ``torch.set_num_threads(1)`` (a per-thread
    setting) and no autograd; otherwise ``work`` runs once, here, on the whole plan.
    """
    group, L, S, causal, window = sizes
    threads = torch.get_num_threads()
    scores = q.shape[0] * q.shape[1] * S  # an upper bound of the work
    if threads <= 1 or q.device.type != "cpu" or scores < _SPLIT_SCORES:
        work(plan)
        return
    ranges = _balanced_rows(L, S, causal, window, min(threads, max(1, L // 16)))
    parts = [_rows_of(plan, a, b) for a, b in ranges]

    def run(part):
        torch.set_num_threads(1)
        with torch.no_grad():
            work(part)

    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            for future in [pool.submit(run, part) for part in parts]:
                future.result()  # re-raise a worker's exception here
    finally:
        # torch.set_num_threads also records the count that threads started later
        # begin with: restore this thread's count there
        torch.set_num_threads(threads)


def _balanced_rows(L, S, causal, window, parts):
    """``parts`` contiguous query row ranges of about equal work (keys seen + 16)."""
    position = torch.arange(L, dtype=torch.float64) + (S - L)
    hi = torch.full_like(position, S)
    lo = torch.zeros_like(position)
    left, right = _tiling.bounds(causal, window)
    if right is not None:
        hi = torch.clamp(position + right + 1, max=S)
    if left is not None:
        lo = torch.clamp(position - left, min=0)
    cost = torch.cumsum(torch.clamp(hi - lo, min=0) + 16, 0)  # (L,)
    targets = cost[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = [0, *torch.searchsorted(cost, targets).tolist(), L]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _rows_of(plan, a, b):
    """The part of a key plan that concerns query rows ``[a, b)``."""
    part = []
    for j0, j1, chunks in plan:
        kept = tuple(
            (max(i0, a), min(i1, b), full)
            for i0, i1, full in chunks
            if max(i0, a) < min(i1, b)
        )
        if kept:
            part.append(_tiling.KeyBlock(j0, j1, kept))
    return part


def attention_tiled(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    r"""Scaled dot-product attention by FlashAttention-2 tiles; the reference's result.

    Computes :func:`scaled_dot_product_attention_reference` one ``block_q x block_k``
    tile at a time with the online softmax (the recurrence is in
    :class:`TiledAttentionFunction` and in the book), for all batch elements and heads
    at once, never holding an ``L x S`` matrix of scores (at most ``block_q x block_k``
    scores per head per step). Tiles that ``causal``
    (bottom-right) or ``window`` hide entirely are skipped (see
    ``companion._tiling``): the work is about half for causal attention and
    ``O(L * window)`` with a window. The backward pass is the
    FlashAttention-2 backward: it recomputes each tile's probabilities from the saved
    log-sum-exp. Gradients flow to ``query``, ``key`` and ``value``; **not** to a float
    ``mask`` (treated as a constant).

    Shapes, mask, causal, window, grouped-query and dtype rules are those of the
    reference: ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``,
    ``value (..., H_kv, S, D_v)`` -> ``(..., H, L, D_v)``. Grouped query heads read
    their key/value head in place (the ``G`` query heads of a group become rows of one
    matmul). ``block_q`` and ``block_k`` need not divide ``L`` and ``S``; by default
    they are chosen from the shapes (``_default_blocks``: steps of about 2^18 scores
    for all heads together, 1024 query rows x 256 keys for one head).

    Explained in the book chapter *Making it fast*.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    shapes = _check_inputs(query, key, value)
    scale = _checks.resolve_scale(scale, shapes.D)
    batch, H, H_kv, L, S = shapes.batch, shapes.H, shapes.H_kv, shapes.L, shapes.S
    G, D, D_v = shapes.group, shapes.D, shapes.D_v
    N = H_kv * math.prod(batch)
    default_q, default_k = _default_blocks(N * G * L, L, S)
    block_q = default_q if block_q is None else _checks.check_int("block_q", block_q)
    block_k = default_k if block_k is None else _checks.check_int("block_k", block_k)
    compute = _compute_dtype(query.dtype)
    mask = _as_mask(mask, shapes, query.device, compute)
    if L == 0 or N == 0:
        return torch.zeros(*batch, H, L, D_v, dtype=query.dtype, device=query.device)
    # (..., H_kv, G, L, D) -> (N, L, G, D) -> (N, L * G, D): a copy of the queries only
    q = _split_heads(query.expand(*batch, H, L, D).to(compute) * scale, H_kv)
    q = q.reshape(N, G, L, D).transpose(1, 2).reshape(N, L * G, D)
    k = key.expand(*batch, H_kv, S, D).to(compute).reshape(N, S, D)  # (N, S, D)
    v = value.expand(*batch, H_kv, S, D_v).to(compute).reshape(N, S, D_v)
    if mask is not None:
        # (..., H_kv, G, L, S), a broadcast view
        mask = _split_heads(mask.detach().expand(*shapes.scores), H_kv)
    plan = _tiling.key_plan(L, S, block_q, block_k, causal, window)
    output = TiledAttentionFunction.apply(q, k, v, mask, plan, G, causal, window)
    # (N, L * G, D_v) -> (N, G, L, D_v) -> (..., H, L, D_v)
    output = output.view(N, L, G, D_v).transpose(1, 2).reshape(*batch, H, L, D_v)
    return output.to(query.dtype)
