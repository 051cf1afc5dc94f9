r"""Scaled dot-product attention in numpy: the readable reference and the tiled one.

The conventions (layouts, masks, bottom-right causal alignment, grouped-query heads,
fully masked rows, dtypes, errors) are those of :mod:`companion.conventions`; every
function here validates its input through :mod:`companion._checks`, as the torch and
TensorFlow namespaces do, so that all three reject bad input with the same words.

The equation, for one head (queries ``Q (L, D)``, keys ``K (S, D)``, values
``V (S, D_v)``)::

    scores  = t Q K^T + bias          (L, S)   t = scale = 1 / sqrt(D) by default
    weights = softmax_rows(scores)    (L, S)   masked entries -> exactly 0
    output  = weights V               (L, D_v)

:func:`scaled_dot_product_attention_reference` computes it as written (it holds the
``L x S`` weights); :func:`attention_tiled` computes the same output one block at a time
with the online softmax of FlashAttention-2 and never holds an ``L x S`` matrix.

Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from companion import _checks, _tiling

__all__ = [
    "softmax",
    "causal_mask",
    "padding_mask",
    "attention_weights",
    "scaled_dot_product_attention_reference",
    "attention_tiled",
]

_MAX_DEFAULT_THREADS = 8


# --------------------------------------------------------------------------- helpers


def _float_array(name: str, x) -> np.ndarray:
    """``x`` as a numpy array of a floating dtype (else ``TypeError``); never a copy."""
    array = np.asarray(x)
    _checks.check_float(name, array.dtype)
    return array


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype arithmetic runs in: float16 accumulates in float32, the rest stay."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _check_flag(name: str, value) -> bool:
    return _checks.check_flag(name, value)


def _validated(query, key, value, mask):
    """Arrays, sizes and mask of one attention call, checked by ``_checks``."""
    query = _float_array("query", query)
    key = _float_array("key", key)
    value = _float_array("value", value)
    shapes = _checks.attention_shapes(query.shape, key.shape, value.shape)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must have the same dtype, got {query.dtype}, "
            f"{key.dtype} and {value.dtype}"
        )
    return query, key, value, shapes, _validated_mask(mask, shapes)


def _validated_mask(mask, shapes: _checks.AttentionShapes):
    """``None``, a bool mask (True = attend) or a float mask (added to the scores)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(
            "mask must be boolean (True = attend) or floating (added to the scaled "
            "scores), "
            f"got dtype {mask.dtype} with shape {mask.shape}"
        )
    _checks.check_mask_shape(mask.shape, shapes)
    return mask


def _split_query_heads(x: np.ndarray, shapes: _checks.AttentionShapes) -> np.ndarray:
    """``(..., H, L, X) -> (..., H_kv, group, L, X)``: head ``h`` in ``h // group``.

    A reshape (a view for contiguous input), not a copy: this is the grouped-query head
    map ``h -> h // (H // H_kv)`` of :mod:`companion.conventions`::

        H = 6, H_kv = 2       query heads  0 1 2 | 3 4 5
                              k/v head     0 0 0 | 1 1 1
    """
    return x.reshape(*x.shape[:-3], shapes.H_kv, shapes.group, *x.shape[-2:])


def _split_mask_heads(mask: np.ndarray, shapes: _checks.AttentionShapes) -> np.ndarray:
    """A mask for ``(..., H, L, S)`` made broadcastable to ``(..., H_kv, G, L, S)``."""
    # (..., H|1, L|1, S|1)
    mask = mask.reshape((1,) * (len(shapes.scores) - mask.ndim) + mask.shape)
    if mask.shape[-3] == 1:
        return mask[..., None, :, :]  # (..., 1, 1, L|1, S|1)
    return _split_query_heads(mask, shapes)  # (..., H_kv, group, L|1, S|1)


# --------------------------------------------------------------------------- masks


def causal_mask(L: int, S: int, *, window: int | None = None) -> np.ndarray:
    r"""The bottom-right aligned causal mask: query ``i`` sees keys ``j <= i + S - L``.

    Parameters
    ----------
    L, S : int
        Query and key lengths.
    window : int, optional
        Sliding-window attention (Mistral's convention): query ``i``, at absolute
        position ``p = i + (S - L)``, sees only the last ``window`` keys, itself
        included, ``p - window < j <= p``::

            causal_mask(5, 5, window=2)     causal_mask(2, 5, window=3)
            1 0 0 0 0                       0 1 1 1 0
            1 1 0 0 0                       0 0 1 1 1
            0 1 1 0 0
            0 0 1 1 0
            0 0 0 1 1

        A pair ``(left, right)`` is FlashAttention's ``window_size``: ``p - left <= j
        <= p + right`` (``-1`` or ``None``: unbounded), capped at ``j <= p`` here;
        ``window=W`` is the shorthand for ``(W - 1, 0)``.

    Returns
    -------
    numpy.ndarray
        bool ``(L, S)``, ``True`` = may attend. The last query sees every key, which is
        what decoding with a KV cache needs (the ``L`` new queries are the last ``L``
        positions of the sequence)::

            causal_mask(3, 3)     causal_mask(2, 5)      causal_mask(4, 2)
            1 0 0                 1 1 1 1 0              0 0   <- sees nothing: its
            1 1 0                 1 1 1 1 1              0 0      output row is 0
            1 1 1                                        1 0
                                                         1 1

    Explained in the book chapter *Attention: algorithm and math*.
    """
    for name, size in (("L", L), ("S", S)):
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, np.integer))
            or size < 0
        ):
            raise ValueError(f"{name} must be a non-negative int, got {size!r}")
    window = _tiling.check_window(window)
    return _band(0, int(L), 0, int(S), int(L), int(S), True, window)  # (L, S)


def _band(i0, i1, j0, j1, L, S, causal, window) -> np.ndarray:
    """Bool ``(i1 - i0, j1 - j0)``: which keys each query may see (``_tiling``).

    Query ``i`` sits at position ``p = i + (S - L)``; with ``d = j - p`` it sees key
    ``j`` iff ``-left <= d <= right``, ``(left, right) = _tiling.bounds(causal,
    window)``: ``d <= 0`` (causal), ``-window < d`` (a window) and, without causal,
    ``d < window``; a pair ``(left, right)`` as FlashAttention's ``window_size``.
    """
    # d = j - p: (bq, bk)
    d = np.arange(j0, j1)[None, :] - (np.arange(i0, i1)[:, None] + (S - L))
    left, right = _tiling.bounds(causal, window)
    visible = np.ones(d.shape, dtype=bool)
    if right is not None:
        visible &= d <= right
    if left is not None:
        visible &= d >= -left
    return visible


def padding_mask(lengths, S: int) -> np.ndarray:
    r"""Key padding mask: key ``j`` of sequence ``b`` is real iff ``j < lengths[b]``.

    Parameters
    ----------
    lengths : array_like of int, shape ``(B,)``
        The number of real (unpadded) keys of each sequence, ``0 <= lengths[b] <= S``.
    S : int
        The padded key length.

    Returns
    -------
    numpy.ndarray
        bool ``(B, 1, 1, S)``, broadcastable to the weights ``(B, H, L, S)``::

            padding_mask([3, 1], 4)[:, 0, 0]
            1 1 1 0
            1 0 0 0
    """
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 0:
        raise ValueError(f"S must be a non-negative int, got {S!r}")
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(
            f"lengths must be 1-D (one length per sequence), got shape {lengths.shape}"
        )
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > S):
        raise ValueError(
            f"lengths must lie in [0, S={S}], got values from {lengths.min()} to "
            f"{lengths.max()}"
        )
    positions = np.arange(S)  # (S,)
    is_real = positions[None, :] < lengths[:, None]  # (B, S)
    return is_real[:, None, None, :]  # (B, 1, 1, S)


# --------------------------------------------------------------------------- softmax


def softmax(x, axis: int = -1, mask=None) -> np.ndarray:
    r"""Numerically stable softmax along ``axis``; masked entries get exactly 0.

    .. math::

        \operatorname{softmax}(x)_j =
        \frac{m_j\, e^{x_j - M}}{\sum_k m_k\, e^{x_k - M}},
        \qquad M = \max_{k:\, m_k} x_k

    Subtracting the maximum ``M`` changes nothing mathematically and keeps ``exp`` from
    overflowing. A row whose entries are all masked (or all ``-inf``) gives 0
    everywhere, never NaN and never uniform weights.

    Parameters
    ----------
    x : numpy.ndarray, floating
    axis : int
    mask : numpy.ndarray of bool, optional
        Broadcastable to ``x.shape``; ``True`` = keep.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x`` (float16 is computed in float32).
    """
    x = _float_array("x", x)
    work = x.astype(_compute_dtype(x.dtype), copy=False)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be boolean (True = keep), got dtype {mask.dtype}"
            )
        try:
            shape = _checks.broadcast_shape(mask.shape, x.shape)
        except ValueError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"mask of shape {mask.shape} does not broadcast to x of shape {x.shape}"
            )
        work = np.where(mask, work, -np.inf)  # masked entries -> -inf (a new array)
    row_max = np.max(work, axis=axis, keepdims=True, initial=-np.inf)  # M
    # all masked: exp(-inf - 0) = 0, not NaN
    row_max = np.where(np.isneginf(row_max), 0, row_max)
    exp = np.exp(work - row_max)  # e^{x_j - M}, 0 where masked
    total = np.sum(exp, axis=axis, keepdims=True)  # sum_k e^{x_k - M}
    # 0 for empty rows
    weights = np.divide(exp, total, out=np.zeros_like(exp), where=total > 0)
    return weights.astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- reference


def _grouped_weights(query, key, mask, causal, scale, shapes, window=None):
    """Softmax weights, query heads split by k/v head: ``(..., H_kv, G, L, S)``."""
    dtype = _compute_dtype(query.dtype)
    t = _checks.resolve_scale(scale, shapes.D)
    # (..., H_kv, group, L, D)
    q = _split_query_heads(query.astype(dtype, copy=False), shapes)
    # (..., H_kv, 1, S, D): broadcast, not repeated
    k = key.astype(dtype, copy=False)[..., :, None, :, :]
    scores = t * (q @ np.swapaxes(k, -1, -2))  # t Q K^T: (..., H_kv, group, L, S)
    keep = None  # True = may attend, broadcastable to scores
    if mask is not None and mask.dtype == np.bool_:
        keep = _split_mask_heads(mask, shapes)  # (..., H_kv|1, group|1, L|1, S|1)
    elif mask is not None:
        # + bias
        scores = scores + _split_mask_heads(mask.astype(dtype, copy=False), shapes)
    if causal or window is not None:
        L, S = shapes.L, shapes.S
        visible = _band(0, L, 0, S, L, S, causal, window)  # (L, S)
        keep = visible if keep is None else keep & visible
    if keep is not None:
        keep = np.broadcast_to(keep, scores.shape)  # (..., H_kv, group, L, S)
    return softmax(scores, axis=-1, mask=keep)  # (..., H_kv, group, L, S)


def attention_weights(
    query,
    key,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
) -> np.ndarray:
    r"""The attention weights ``softmax(t Q K^T + bias)``, shape ``(..., H, L, S)``.

    Parameters
    ----------
    query : numpy.ndarray ``(..., H, L, D)``
    key : numpy.ndarray ``(..., H_kv, S, D)``
        ``H_kv`` divides ``H``; query head ``h`` reads key head ``h // (H // H_kv)``.
    mask : numpy.ndarray, optional
        bool (``True`` = attend) or float (added to the scaled scores), broadcastable to
        ``(..., H, L, S)``.
    causal : bool
        Apply :func:`causal_mask` (bottom-right aligned) as well.
    scale : float, optional
        ``t``; default ``1 / sqrt(D)``.
    window : int, optional
        Keep only keys near each query (position ``p = i + (S - L)``): with ``causal``
        the last ``window`` keys, ``p - window < j <= p`` (see :func:`causal_mask`);
        without, a symmetric band ``|p - j| < window``.

    Returns
    -------
    numpy.ndarray ``(..., H, L, S)``
        Each row sums to 1, or is exactly 0 where the query may attend to nothing.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    query, key, _, shapes, mask = _validated(query, key, key, mask)
    # (..., H_kv, group, L, S)
    weights = _grouped_weights(query, key, mask, causal, scale, shapes, window)
    weights = weights.reshape(shapes.scores)  # (..., H, L, S)
    return weights.astype(query.dtype, copy=False)


def scaled_dot_product_attention_reference(
    query,
    key,
    value,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
) -> np.ndarray:
    r"""Scaled dot-product attention as written: ``softmax(t Q K^T + bias) V``.

    .. math::

        \operatorname{Attention}(Q, K, V) =
        \operatorname{softmax}\!\Big(\frac{Q K^\top}{\sqrt{D}} + \text{bias}\Big) V

    Shapes: ``query (..., H, L, D)``, ``key (..., H_kv, S, D)``,
    ``value (..., H_kv, S, D_v)`` -> ``(..., H, L, D_v)``. Grouped-query attention when
    ``H_kv < H``: the query heads are reshaped to ``(..., H_kv, H // H_kv, L, D)`` and
    broadcast against the key/value heads ``(..., H_kv, 1, S, D)``; no key or value
    head is copied.

    Masks (see :mod:`companion.conventions`): a bool ``mask`` keeps ``True`` entries, a
    float ``mask`` is added to the scaled scores, ``causal=True`` applies the
    bottom-right aligned :func:`causal_mask`::

        L = 2, S = 5, causal    keys  0 1 2 3 4
                      query 0         1 1 1 1 0
                      query 1         1 1 1 1 1

    ``window = w`` keeps only the keys within ``w`` positions of each query (position
    ``p = i + (S - L)``): ``p - w < j <= p`` with ``causal`` (sliding-window attention),
    ``|p - j| < w`` without (a symmetric band)::

        L = S = 5, window = 2     causal        not causal
                                  1 0 0 0 0     1 1 0 0 0
                                  1 1 0 0 0     1 1 1 0 0
                                  0 1 1 0 0     0 1 1 1 0
                                  0 0 1 1 0     0 0 1 1 1
                                  0 0 0 1 1     0 0 0 1 1

    ``window = (left, right)`` is FlashAttention's ``window_size``: keys
    ``p - left <= j <= p + right`` (``-1`` or ``None``: that side unbounded;
    ``causal`` caps ``right`` at 0). ``window = w`` is the shorthand for
    ``(w - 1, 0)`` with ``causal`` and ``(w - 1, w - 1)`` without.

    A query that may attend to nothing gets an output row of exactly 0.

    This is the single oracle of the test suite when called with float64 arrays. float32
    stays float32; float16 is computed in float32 and returned as float16.

    Explained in the book chapter *Attention: algorithm and math*.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    query, key, value, shapes, mask = _validated(query, key, value, mask)
    # (..., H_kv, group, L, S)
    weights = _grouped_weights(query, key, mask, causal, scale, shapes, window)
    # (..., H_kv, 1, S, D_v)
    v = value.astype(weights.dtype, copy=False)[..., :, None, :, :]
    output = weights @ v  # (..., H_kv, group, L, D_v)
    # (..., H, L, D_v)
    output = output.reshape(*shapes.batch, shapes.H, shapes.L, shapes.D_v)
    return output.astype(query.dtype, copy=False)


# ------------------------------------------------------------------------ tiled (flash)


L2_CACHE_ENV = "COMPANION_L2_CACHE_BYTES"


def _l2_cache_bytes() -> int:
    """One core's L2 cache in bytes: the environment variable
    ``COMPANION_L2_CACHE_BYTES`` if set (to size the default blocks as another CPU
    would, e.g. in ``make test``'s second-machine run), else Linux sysfs, else 1 MiB."""
    override = os.environ.get(L2_CACHE_ENV)
    if override is not None:
        try:
            value = int(override)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(
                f"{L2_CACHE_ENV} must be a positive number of bytes, got {override!r}"
            )
        return value
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            folder = os.path.join(base, index)
            if not index.startswith("index"):
                continue
            with open(os.path.join(folder, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(folder, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(folder, "size")) as f:
                    size = f.read().strip().upper()
                factor = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * factor
    except (OSError, ValueError):
        pass
    return 1 << 20


@functools.lru_cache(maxsize=None)
def _block_side(itemsize: int) -> int:
    """The largest power of two ``b`` (128 to 1024) whose ``b x b`` scores fill at most
    half a core's L2 cache: the matmul, ``exp`` and reductions of a tile then run from
    the cache."""
    budget = _l2_cache_bytes() // 2 // itemsize  # numbers
    side = 128
    while side < 1024 and (2 * side) ** 2 <= budget:
        side *= 2
    return side


def _default_blocks(L: int, S: int, itemsize: int) -> tuple[int, int]:
    """``(block_q, block_k)`` from the L2 cache (``_block_side``), whatever ``L, S``.

    Blocks larger than the sequence are cut to it by the plan; the scratch buffers keep
    the full block size, so that the kernel's extra memory does not depend on ``n``.
    """
    side = _block_side(itemsize)
    return side, side


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_DEFAULT_THREADS))


# A tile whose probabilities, taken against the row's running maximum ``m`` as it was,
# sum to at most this needs no new maximum (``_tiled_query_block``): every entry is then
# at most 2^20 (the maximum moved up by at most 13.9), far from float32's overflow.
_STALE_MAX_LIMIT = float(2**20)


class _BlockBuffers:
    """One worker's scratch space, allocated once and reused for each of its blocks.

    The query block carries one more column, ``-m``, and the key and value tiles a
    column of ones: ``[t Q_i | -m] [K_j | 1]^T = t Q_i K_j^T - m`` and
    ``P~ [V_j | 1] = [P~ V_j | rowsum P~]``, so the matrix products subtract the
    running maximum and sum the probabilities (``_tiled_query_block``).
    """

    def __init__(self, block_q, block_k, D, D_v, dtype, masked):
        self.block_q, self.block_k = block_q, block_k
        self.q = np.empty(block_q * (D + 1), dtype)  # [t Q_i | -m]
        self.scores = np.empty(block_q * block_k, dtype)  # S_ij, then P~_ij in place
        # masked entries
        self.hidden = np.empty(block_q * block_k, np.bool_) if masked else None
        self.acc = np.empty(block_q * D_v, dtype)  # O~
        self.pv = np.empty(block_q * (D_v + 1), dtype)  # [P~_ij V_j | rowsum P~_ij]
        # m, m_new, rowmax / rowsum, c, l
        self.vectors = np.empty((5, block_q), dtype)
        self.fine = np.empty(block_q, np.bool_)  # rows whose stale maximum held
        # [K_j | 1] and [V_j | 1] (also the float16 -> float32 copies); the ones
        # column sits at the same places whatever the tile's rows
        self.k = np.ones(block_k * (D + 1), dtype)
        self.v = np.ones(block_k * (D_v + 1), dtype)

    @staticmethod
    def view(flat, rows, cols):
        return flat[: rows * cols].reshape(rows, cols)  # contiguous (rows, cols)


def _tiled_query_block(
    q_rows,
    k_head,
    v_head,
    float_bias,
    keep,
    tiles,
    band,
    scale,
    i0,
    buffers,
    out_rows,
    lse_rows,
):
    """FlashAttention-2 forward for query rows ``i0 : i0 + bq`` of one head.

    ``q_rows (bq, D)``, ``k_head (S, D)``, ``v_head (S, D_v)``; ``float_bias`` and
    ``keep`` are ``(L|1, S|1)`` views or ``None``; ``tiles`` the key blocks
    ``(j0, j1, full)`` the rows may see (``companion._tiling.plan``: blocks that
    causal or a window hide are absent); ``band(i0, i1, j0, j1)`` the bool ``(bq, bk)``
    visibility of a tile that is not ``full``. Writes ``out_rows (bq, D_v)`` and
    ``lse_rows (bq,)``.

    The first tile takes the step of the recurrence as written. Each later tile first
    keeps every row's maximum ``m`` as it is (FlashAttention-4's conditional
    rescaling): ``P~ = exp(S_ij - m)`` comes from one matrix product and one ``exp``,
    and ``[P~ V_j | rowsum P~]`` from one more, with no pass for the row maximum,
    the subtraction, the sum or the rescaling ``c``. The rows whose sum exceeds
    ``_STALE_MAX_LIMIT`` (their maximum moved up by more than about 13.9; ``inf`` or
    NaN included) take the exact step instead (``_exact_rows``). The softmax does not
    depend on which ``m`` is subtracted, so the result is that of the recurrence; with
    random scores after the first tile no row needs the exact step.
    """
    bq, D = q_rows.shape
    S, D_v = v_head.shape
    # [book: tiled start]
    q = buffers.view(buffers.q, bq, D + 1)  # [t Q_i | -m]
    np.multiply(q_rows, scale, out=q[:, :D])  # t Q_i: the scale folded into the query
    q[:, D] = 0.0  # (the first tile's scores are S_ij itself)
    acc = buffers.view(buffers.acc, bq, D_v)  # O~ (bq, D_v)
    acc.fill(0.0)
    # (bq,) each
    m, m_new, row_stat, c, l = (row[:bq] for row in buffers.vectors)
    # the running max starts at the lowest finite number, not -inf, so that
    # exp(S_ij - m_new) and exp(m - m_new) need no guard for rows that saw nothing yet
    m.fill(np.finfo(m.dtype).min)
    l.fill(0.0)
    # [/book: tiled start]
    pv_all = buffers.view(buffers.pv, bq, D_v + 1)  # [P~ V_j | rowsum P~]
    pv, tile_sum = pv_all[:, :D_v], pv_all[:, D_v]  # views
    for t, (j0, j1, full) in enumerate(tiles):  # hidden blocks are not in the plan
        bk = j1 - j0
        k_ones = buffers.view(buffers.k, bk, D + 1)  # [K_j | 1]
        np.copyto(k_ones[:, :D], k_head[j0:j1])  # (float16 -> float32)
        v_ones = buffers.view(buffers.v, bk, D_v + 1)  # [V_j | 1]
        np.copyto(v_ones[:, :D_v], v_head[j0:j1])
        k_block, v_block = k_ones[:, :D], v_ones[:, :D_v]  # (bk, D), (bk, D_v)
        scores = buffers.view(buffers.scores, bq, bk)
        np.matmul(q, k_ones.T, out=scores)  # S_ij - m = [t Q_i | -m] [K_j | 1]^T
        hidden = (
            None if buffers.hidden is None else buffers.view(buffers.hidden, bq, bk)
        )
        if float_bias is not None:
            np.add(scores, float_bias[i0 : i0 + bq, j0:j1], out=scores)  # + bias
        if keep is not None:
            np.logical_not(keep[i0 : i0 + bq, j0:j1], out=hidden)  # (bq, bk)
            np.copyto(scores, -np.inf, where=hidden)  # masked -> -inf
        if not full:  # the block straddles the causal diagonal or the window's edge
            np.logical_not(band(i0, i0 + bq, j0, j1), out=hidden)  # (bq, bk)
            np.copyto(scores, -np.inf, where=hidden)
        if t > 0:  # m kept: P~ = exp(S_ij - m), [P~ V_j | rowsum P~], O~ += P~ V_j
            # rows that saw no key yet have m = lowest: exp overflows, and they are
            # among the rows that take the exact step below
            with np.errstate(over="ignore", invalid="ignore"):
                np.exp(scores, out=scores)
                np.matmul(scores, v_ones, out=pv_all)  # (bq, D_v + 1)
            fine = np.less_equal(tile_sum, _STALE_MAX_LIMIT, out=buffers.fine[:bq])
            if not fine.all():  # some rows' maximum moved too far: exact step
                rows = np.flatnonzero(~fine)
                pv_all[rows] = 0.0
                tile = (float_bias, keep, None if full else band, i0, bq, j0, j1)
                _exact_rows(rows, q, k_block, v_block, tile, m, l, acc)
            np.add(l, tile_sum, out=l)  # l = l + rowsum(P~)
            np.add(acc, pv, out=acc)  # O~ = O~ + P~ V_j
            continue
        # [book: tiled tile step]
        np.max(scores, axis=1, out=row_stat)  # rowmax(S_ij)
        np.maximum(m, row_stat, out=m_new)  # m_new = max(m, rowmax)
        np.subtract(scores, m_new[:, None], out=scores)
        np.exp(scores, out=scores)  # P~ = exp(S_ij - m_new), in place
        np.subtract(m, m_new, out=c)
        np.exp(c, out=c)  # c = exp(m - m_new)
        np.sum(scores, axis=1, out=row_stat)  # rowsum(P~)
        np.multiply(l, c, out=l)
        np.add(l, row_stat, out=l)  # l = c l + rowsum(P~)
        np.multiply(acc, c[:, None], out=acc)  # c O~
        np.matmul(scores, v_block, out=pv)  # P~ V_j: (bq, D_v)
        np.add(acc, pv, out=acc)  # O~ = c O~ + P~ V_j
        m, m_new = m_new, m  # m = m_new (swap the buffers)
        # [/book: tiled tile step]
        np.negative(m, out=q[:, D])  # -m: later tiles' products subtract it
    # [book: tiled finish]
    attended = l > 0  # rows that saw at least one key
    # O_i = O~ / l; 0 rows stay 0
    np.divide(acc, l[:, None], out=acc, where=attended[:, None])
    out_rows[...] = acc  # cast to the output dtype
    np.log(l, out=l, where=attended)
    np.add(m, l, out=lse_rows, where=attended)  # LSE_i = m + log(l)
    lse_rows[~attended] = 0.0  # finite for fully masked rows
    # [/book: tiled finish]


def _exact_rows(rows, q, k_block, v_block, tile, m, l, acc):
    """The recurrence's step, as written, for the query ``rows`` of a block.

    For the rows of a tile whose running maximum ``m`` moved too far for
    ``_tiled_query_block``'s step with ``m`` kept: their scores ``S_ij`` are recomputed
    (``q = [t Q_i | -m]``, ``tile = (float_bias, keep, band or None, i0, bq, j0,
    j1)``), and ``m``, ``l``, ``O~`` and the ``-m`` column of ``q`` are updated in
    place at those rows.
    """
    float_bias, keep, band, i0, bq, j0, j1 = tile
    s = q[rows, :-1] @ k_block.T  # S_ij of the rows: (r, bk)
    if float_bias is not None:
        s += float_bias[i0 : i0 + bq, j0:j1][rows]  # + bias
    if keep is not None:
        s[~keep[i0 : i0 + bq, j0:j1][rows]] = -np.inf  # masked -> -inf
    if band is not None:
        s[~band(i0, i0 + bq, j0, j1)[rows]] = -np.inf
    m_old = m[rows]
    m_new = np.maximum(m_old, s.max(axis=1))  # m_new = max(m, rowmax)
    p = np.exp(s - m_new[:, None])  # P~ = exp(S_ij - m_new)
    c = np.exp(m_old - m_new)  # c = exp(m - m_new)
    l[rows] = c * l[rows] + p.sum(axis=1)  # l = c l + rowsum(P~)
    acc[rows] = c[:, None] * acc[rows] + p @ v_block  # O~ = c O~ + P~ V_j
    m[rows] = m_new
    q[rows, -1] = -m_new


def _attention_tiled_forward(
    query,
    key,
    value,
    *,
    mask=None,
    causal=False,
    scale=None,
    window=None,
    block_q=None,
    block_k=None,
    num_threads=None,
):
    """:func:`attention_tiled` returning ``(output (..., H, L, D_v), lse (..., H, L))``.

    ``lse`` is the log-sum-exp of each row's scaled (and biased, masked) scores,
    ``m + log(l)``, in the compute dtype (float32 for float16 input); 0 for fully masked
    rows. The backward pass of the torch namespace recomputes the weights from it.
    """
    causal = _check_flag("causal", causal)
    window = _tiling.check_window(window)
    block_q = None if block_q is None else _checks.check_int("block_q", block_q)
    block_k = None if block_k is None else _checks.check_int("block_k", block_k)
    if num_threads is None:
        num_threads = _default_threads()
    num_threads = _checks.check_int("num_threads", num_threads)
    query, key, value, shapes, mask = _validated(query, key, value, mask)
    scale = _checks.resolve_scale(scale, shapes.D)
    dtype = _compute_dtype(query.dtype)
    batch, H, L, S = shapes.batch, shapes.H, shapes.L, shapes.S
    default_q, default_k = _default_blocks(L, S, dtype.itemsize)
    block_q = default_q if block_q is None else block_q
    block_k = default_k if block_k is None else block_k
    output = np.zeros((*batch, H, L, shapes.D_v), dtype=query.dtype)  # (..., H, L, D_v)
    lse = np.zeros((*batch, H, L), dtype=dtype)  # (..., H, L)
    # Broadcast views (no copies): every (batch index, head) has its own 2-D slices.
    q_all = np.broadcast_to(query, (*batch, H, L, shapes.D))
    k_all = np.broadcast_to(key, (*batch, shapes.H_kv, S, shapes.D))
    v_all = np.broadcast_to(value, (*batch, shapes.H_kv, S, shapes.D_v))
    float_bias = keep = None
    if mask is not None and mask.dtype == np.bool_:
        keep = np.broadcast_to(mask, shapes.scores)  # (..., H, L, S), a view
    elif mask is not None:
        float_bias = np.broadcast_to(mask, shapes.scores)  # (..., H, L, S), a view
    plan = _tiling.plan(L, S, block_q, block_k, causal, window)

    @functools.lru_cache(maxsize=256)
    def shifted_band(bq, bk, shift):
        return _band(shift, shift + bq, 0, bk, L, S, causal, window)

    def band(i0, i1, j0, j1):  # depends on the shape and on i0 - j0 only
        return shifted_band(i1 - i0, j1 - j0, i0 - j0)

    # the costliest blocks first (causal: the last rows), so that the threads finish
    # together: a greedy longest-first split of the triangle
    plan = sorted(
        plan, key=lambda b: -(b.i1 - b.i0) * sum(t[1] - t[0] for t in b.tiles)
    )
    tasks = [
        (index, h, block)
        for block in plan
        for index in np.ndindex(*batch)
        for h in range(H)
    ]
    next_task = iter(tasks)
    lock = threading.Lock()

    def work() -> None:
        buffers = _BlockBuffers(
            block_q,
            block_k,
            shapes.D,
            shapes.D_v,
            dtype,
            masked=mask is not None or causal or window is not None,
        )
        while True:
            with lock:
                task = next(next_task, None)
            if task is None:
                return
            index, h, (i0, i1, tiles) = task
            kv = h // shapes.group  # the key/value head of query head h
            _tiled_query_block(
                q_all[index][h, i0:i1],
                k_all[index][kv],
                v_all[index][kv],
                None if float_bias is None else float_bias[index][h],
                None if keep is None else keep[index][h],
                tiles,
                band,
                scale,
                i0,
                buffers,
                output[index][h, i0:i1],
                lse[index][h, i0:i1],
            )

    workers = min(num_threads, len(tasks))
    if workers <= 1:
        work()
    else:
        from threadpoolctl import threadpool_limits

        with (
            threadpool_limits(limits=1, user_api="blas"),
            ThreadPoolExecutor(workers) as pool,
        ):
            for future in [pool.submit(work) for _ in range(workers)]:
                future.result()  # re-raise a worker's exception here
    return output, lse


def attention_tiled(
    query,
    key,
    value,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_threads: int | None = None,
) -> np.ndarray:
    r"""Scaled dot-product attention by the FlashAttention-2 forward recurrence.

    Same arguments, conventions and result as
    :func:`scaled_dot_product_attention_reference`, but the ``L x S`` scores are never
    held: for each block of ``block_q`` query rows ``Q_i`` it walks the key/value blocks
    ``K_j, V_j`` of ``block_k`` rows and keeps only a running maximum ``m``, a running
    sum ``l`` and an unnormalised output ``O~``::

        S_ij  = t Q_i K_j^T  (+ bias, masked -> -inf)          (bq, bk)
        m_new = max(m, rowmax(S_ij))                           (bq,)
        P~    = exp(S_ij - m_new)                              (bq, bk)
        c     = exp(m - m_new)                                 (bq,)
        l     = c l + rowsum(P~)                               (bq,)
        O~    = c O~ + P~ V_j                                  (bq, D_v)
        end:  O_i = O~ / l ,  LSE_i = m + log(l)

    With ``causal=True`` (bottom-right aligned) the key blocks entirely above the
    diagonal are skipped and the mask is applied only to the blocks that straddle it::

        blocks of 2 x 2, L = S = 6      key block  0    1    2
                           query block 0         [\ ] skip skip
                           query block 1         [##] [\ ] skip
                           query block 2         [##] [##] [\ ]

    With ``window`` (see :func:`scaled_dot_product_attention_reference`) only the key
    blocks that meet the band are visited, so the work is ``O(L * window)``, not
    ``O(L * S)``.

    The running maximum starts at the lowest finite number, not ``-inf``, so
    ``exp(S - m)`` and ``exp(m_old - m)`` need no guard: masked scores (``-inf``) give
    ``exp(-inf) = 0``. A row that sees no key at all ends with ``l = 0``, and the
    division only where ``l > 0`` makes its output exactly 0, never NaN.

    After a block's first tile the kernel keeps each row's ``m`` unless a tile's
    probabilities against it sum past ``2^20`` (FlashAttention-4's conditional
    rescaling): ``c = 1``, and the matrix products ``[t Q_i | -m] [K_j | 1]^T`` and
    ``P~ [V_j | 1]`` do the subtraction and the row sum, so such a tile costs two
    products and one ``exp`` (``_tiled_query_block``). The softmax does not depend on
    which ``m`` is subtracted, so the result is the same.

    Parameters
    ----------
    query, key, value, mask, causal, scale
        As for :func:`scaled_dot_product_attention_reference`; bool and float masks are
        sliced per block (broadcast views, never expanded to ``L x S``).
    block_q, block_k : int, optional
        Rows of the query and key blocks. By default chosen from the shapes and the
        cache size (``_default_blocks``): square blocks whose scores fill half a
        core's L2 cache (512 x 512 float32, 1 MiB, for a 2 MiB L2).
    num_threads : int, optional
        Worker threads over (batch, head, query block) tasks; default: the available
        cores, at most 8. BLAS is pinned to one thread while they run (numpy releases
        the GIL in ``matmul`` and ``exp``, so the workers run in parallel).

    Returns
    -------
    numpy.ndarray ``(..., H, L, D_v)``, the input dtype. Computed in the input dtype
    (float16 in float32). Extra memory: a few blocks per thread, ``O(L)`` for the
    log-sum-exp, no ``L x S`` matrix.

    Explained in the book chapter *Making it fast*.
    """
    output, _ = _attention_tiled_forward(
        query,
        key,
        value,
        mask=mask,
        causal=causal,
        scale=scale,
        window=window,
        block_q=block_q,
        block_k=block_k,
        num_threads=num_threads,
    )
    return output
