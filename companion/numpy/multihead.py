r"""Multi-head (and grouped-query) attention layers in numpy, with a key/value cache.

.. math::

    \operatorname{MHA}(X_q, X_{kv}) = \operatorname{concat}_h\big(
        \operatorname{Attention}(X_q W_q^{(h)},\; X_{kv} W_k^{(g(h))},\;
        X_{kv} W_v^{(g(h))})\big)\, W_o + b_o,
    \qquad g(h) = h \,//\, (H / H_{kv})

One set of projection weights is shared by every position of every sequence (the
parameter sharing of the book's first half); the heads split the projected width
``H * D`` into ``H`` slices of ``D``. Weights are applied as ``y = x @ W + b``.

:class:`MultiHeadParams` is defined here once; the torch and TensorFlow namespaces
re-export this class and convert its arrays to their own tensors.

Explained in the book chapters *Attention: algorithm and math* and *Making it fast*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion import _checks, _positions, _sinks
from companion._implementation import NUMPY_TILED_FROM_SCORES as TILED_FROM_SCORES
from companion._implementation import choose_implementation as _choose_implementation
from companion._kvcache import (
    KVCacheBase,
    check_some_keys,
    unchanged_on_error,
    window_for_cache,
)
from companion.conventions import gqa_group_size
from companion.numpy.attention import (
    _check_flag,
    _compute_dtype,
    _grouped_weights,
    _validated,
    attention_tiled,
)
from companion.numpy.positions import _rotate_queries_and_keys

__all__ = ["MultiHeadParams", "KVCache", "multi_head_attention"]


def _array(x) -> np.ndarray:
    """A numpy copy of a numpy array, torch tensor or Keras/TF variable (duck-typed, no
    imports)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor / Parameter
        return x.detach().cpu().numpy().copy()
    if hasattr(x, "numpy") and callable(x.numpy):  # tf.Variable, keras Variable
        return np.array(x.numpy())
    # keras Variable wrapper
    if hasattr(x, "value") and hasattr(x.value, "numpy"):
        return np.array(x.value.numpy())
    return np.array(x)


@dataclass
class MultiHeadParams:
    r"""The weights of one multi-head attention layer, applied as ``y = x @ W + b``.

    ================  =======================  =====================================
    field             shape                    role
    ================  =======================  =====================================
    ``w_q``           ``(E_q, H * D)``         query projection; head ``h`` = columns
                                               ``h*D:(h+1)*D``
    ``b_q``           ``(H * D,)`` or None
    ``w_k``           ``(E_kv, H_kv * D)``     key projection
    ``b_k``           ``(H_kv * D,)`` or None
    ``w_v``           ``(E_kv, H_kv * D_v)``   value projection
    ``b_v``           ``(H_kv * D_v,)`` or
                      None
    ``w_o``           ``(H * D_v, E_out)``     output projection of the concatenated
                                               heads
    ``b_o``           ``(E_out,)`` or None
    ``num_heads``     ``H``
    ``num_kv_heads``  ``H_kv``                 divides ``H``; ``H_kv < H`` is
                                               grouped-query attention
    ================  =======================  =====================================
    """

    w_q: np.ndarray
    b_q: np.ndarray | None
    w_k: np.ndarray
    b_k: np.ndarray | None
    w_v: np.ndarray
    b_v: np.ndarray | None
    w_o: np.ndarray
    b_o: np.ndarray | None
    num_heads: int
    num_kv_heads: int | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        H, H_kv = self.num_heads, self.num_kv_heads
        gqa_group_size(H, H_kv)  # ValueError unless H_kv divides H
        for name in ("w_q", "w_k", "w_v", "w_o"):
            w = getattr(self, name)
            if getattr(w, "ndim", None) != 2:
                raise ValueError(
                    f"{name} must be a 2-D array (in, out), got {type(w).__name__} "
                    f"of shape {getattr(w, 'shape', None)}"
                )
        for name, w, heads in (
            ("w_q", self.w_q, H),
            ("w_k", self.w_k, H_kv),
            ("w_v", self.w_v, H_kv),
        ):
            if w.shape[1] % heads:
                raise ValueError(
                    f"{name} of shape {tuple(w.shape)} must have a multiple of {heads} "
                    "heads "
                    "as output width"
                )
        if self.w_k.shape[1] // H_kv != self.w_q.shape[1] // H:
            raise ValueError(
                f"the query head dimension (w_q {tuple(self.w_q.shape)}, H={H}) and "
                "the key head "
                f"dimension (w_k {tuple(self.w_k.shape)}, H_kv={H_kv}) differ"
            )
        if self.w_k.shape[0] != self.w_v.shape[0]:
            raise ValueError(
                f"w_k {tuple(self.w_k.shape)} and w_v {tuple(self.w_v.shape)} must "
                "read the same "
                "input width E_kv"
            )
        if self.w_o.shape[0] != H * self.value_head_dim:
            raise ValueError(
                f"w_o of shape {tuple(self.w_o.shape)} must have H * D_v = "
                f"{H * self.value_head_dim} rows"
            )
        for name, w in (
            ("b_q", self.w_q),
            ("b_k", self.w_k),
            ("b_v", self.w_v),
            ("b_o", self.w_o),
        ):
            b = getattr(self, name)
            if b is not None and tuple(b.shape) != (w.shape[1],):
                raise ValueError(
                    f"{name} must have shape ({w.shape[1]},), got {tuple(b.shape)}"
                )

    @property
    def head_dim(self) -> int:
        """``D``, the width of one query/key head."""
        return self.w_q.shape[1] // self.num_heads

    @property
    def value_head_dim(self) -> int:
        """``D_v``, the width of one value head."""
        return self.w_v.shape[1] // self.num_kv_heads

    @classmethod
    def random(
        cls,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = True,
        seed: int = 0,
        dtype="float64",
    ) -> "MultiHeadParams":
        """Random weights ``U(-1/sqrt(E), 1/sqrt(E))`` for ``E = embed_dim``, ``D = E //
        H``."""
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        gqa_group_size(num_heads, num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}"
            )
        D = embed_dim // num_heads
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(embed_dim)

        def uniform(*shape):
            return rng.uniform(-bound, bound, size=shape).astype(dtype)

        widths = {"q": num_heads * D, "k": num_kv_heads * D, "v": num_kv_heads * D}
        return cls(
            w_q=uniform(embed_dim, widths["q"]),
            b_q=uniform(widths["q"]) if bias else None,
            w_k=uniform(embed_dim, widths["k"]),
            b_k=uniform(widths["k"]) if bias else None,
            w_v=uniform(embed_dim, widths["v"]),
            b_v=uniform(widths["v"]) if bias else None,
            w_o=uniform(num_heads * D, embed_dim),
            b_o=uniform(embed_dim) if bias else None,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
        )

    @classmethod
    def from_torch(cls, module) -> "MultiHeadParams":
        """The weights of a ``torch.nn.MultiheadAttention`` (torch is not imported
        here).

        torch stores ``in_proj_weight (3E, E) = [W_q; W_k; W_v]`` applied as
        ``x @ W.T``, so ``w_q = in_proj_weight[:E].T``; with ``kdim``/``vdim`` different
        from ``E`` it keeps ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
        instead.
        """
        if getattr(module, "bias_k", None) is not None or getattr(
            module, "add_zero_attn", False
        ):
            raise ValueError(
                "MultiheadAttention with add_bias_kv or add_zero_attn has no "
                "MultiHeadParams equivalent"
            )
        E = module.embed_dim
        if getattr(module, "in_proj_weight", None) is not None:
            w = _array(module.in_proj_weight)  # (3E, E)
            w_q, w_k, w_v = w[:E].T, w[E : 2 * E].T, w[2 * E :].T  # (E, E) each
        else:
            w_q = _array(module.q_proj_weight).T  # (E, E)
            w_k = _array(module.k_proj_weight).T  # (kdim, E)
            w_v = _array(module.v_proj_weight).T  # (vdim, E)
        b_q = b_k = b_v = None
        if getattr(module, "in_proj_bias", None) is not None:
            b = _array(module.in_proj_bias)  # (3E,)
            b_q, b_k, b_v = b[:E], b[E : 2 * E], b[2 * E :]
        w_o = _array(module.out_proj.weight).T  # (E, E)
        b_o = None if module.out_proj.bias is None else _array(module.out_proj.bias)
        return cls(
            np.ascontiguousarray(w_q),
            b_q,
            np.ascontiguousarray(w_k),
            b_k,
            np.ascontiguousarray(w_v),
            b_v,
            np.ascontiguousarray(w_o),
            b_o,
            num_heads=module.num_heads,
            num_kv_heads=module.num_heads,
        )

    @classmethod
    def from_keras(cls, layer) -> "MultiHeadParams":
        """The weights of a built ``keras.layers.MultiHeadAttention`` (keras is not
        imported here).

        Keras keeps kernels ``(dim, heads, head_dim)`` (reshaped to
        ``(dim, heads * head_dim)``), biases ``(heads, head_dim)`` and the output kernel
        ``(heads, value_dim, out)`` (reshaped to ``(heads * value_dim, out)``). Keras
        scales the query by ``1 / sqrt(key_dim)``, the default scale here.
        """
        dense = {
            name: getattr(layer, f"{name}_dense", None)
            or getattr(layer, f"_{name}_dense", None)
            for name in ("query", "key", "value", "output")
        }
        if any(d is None or getattr(d, "kernel", None) is None for d in dense.values()):
            raise ValueError(
                "the Keras MultiHeadAttention layer must be built (call it once) "
                "before reading it"
            )

        def kernel(name):
            k = _array(dense[name].kernel)
            return (
                k.reshape(k.shape[0], -1)
                if name != "output"
                else k.reshape(-1, k.shape[-1])
            )

        def bias(name):
            b = getattr(dense[name], "bias", None)
            return None if b is None else _array(b).reshape(-1)

        H = layer.num_heads
        return cls(
            kernel("query"),
            bias("query"),
            kernel("key"),
            bias("key"),
            kernel("value"),
            bias("value"),
            kernel("output"),
            bias("output"),
            num_heads=H,
            num_kv_heads=H,
        )

    @classmethod
    def from_hf(cls, module) -> "MultiHeadParams":
        """The weights of a Hugging Face GPT-2, BERT, ALBERT or Llama-style attention.

        See :func:`companion.hf.attention_params` (``transformers`` is not imported).
        """
        from companion.hf import attention_params

        return attention_params(module)


class KVCache(KVCacheBase):
    r"""Keys and values of the positions seen so far, for decoding one step at a time.

    ``append(key, value)`` with ``key (B, H_kv, S_new, D)``,
    ``value (B, H_kv, S_new, D_v)`` returns every cached
    ``(key (B, H_kv, S, D), value (B, H_kv, S, D_v))``. Storage grows by doubling its
    capacity along ``S``: appending ``n`` tokens one at a time copies ``O(n)`` elements
    in all (amortised ``O(1)`` per token), not the ``O(n^2)`` of re-concatenating every
    step. ``key`` and ``value`` are read-only views of the filled part.

    Explained in the book chapter *Making it fast*.
    """

    def _convert(self, name: str, x) -> np.ndarray:
        return np.asarray(x)

    def _empty(self, like: np.ndarray, capacity: int) -> np.ndarray:
        B, H_kv, _, dim = like.shape
        # (B, H_kv, capacity, dim)
        return np.empty((B, H_kv, capacity, dim), like.dtype)

    def _write(self, storage: np.ndarray, start: int, stop: int, x) -> None:
        storage[:, :, start:stop] = x

    def _view(self, storage: np.ndarray, length: int) -> np.ndarray:
        # read-only: the cache cannot be changed behind its back
        view = storage[:, :, :length]
        view.flags.writeable = False
        return view


def _sink_attention_weights(q, k, sinks, mask, causal, window) -> np.ndarray:
    """The weights ``(B, H, L, S)`` with one sink logit per head in the softmax's
    denominator (:func:`companion.numpy.attention_with_sinks`)."""
    from companion.numpy.sinks import _sink_weights  # sinks.py imports KVCache

    sinks = sinks.astype(q.dtype, copy=False)
    return _sink_weights(
        q, k, sinks, mask=mask, causal=causal, scale=None, window=window
    )


def _project(x: np.ndarray, w, b, heads: int, dtype) -> np.ndarray:
    """``x @ W + b`` split into heads: ``(B, T, E) -> (B, heads, T, width/heads)``."""
    y = x @ np.asarray(w, dtype=dtype)  # (B, T, heads * D)
    if b is not None:
        y = y + np.asarray(b, dtype=dtype)
    B, T, width = y.shape
    # (B, heads, T, D)
    return y.reshape(B, T, heads, width // heads).transpose(0, 2, 1, 3)


def multi_head_attention(
    x_q,
    x_kv,
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

    Parameters
    ----------
    x_q : ``(B, L, E_q)``
    x_kv : ``(B, S_new, E_kv)``
        Pass ``x_q`` again for self-attention.
    params : MultiHeadParams
    mask : optional
        bool (True = attend) or float, broadcastable to ``(B, H, L, S)`` where ``S``
        counts every cached position.
    causal : bool
        Bottom-right aligned (see :func:`companion.numpy.causal_mask`): with a cache,
        the ``L`` queries are the last ``L`` positions, so feeding a sequence one token
        at a time with ``causal=True`` equals full causal self-attention.
    cache : KVCache, optional
        The projected keys and values of ``x_kv`` are appended to it and attention runs
        over everything cached. A call that raises leaves the cache as it was.
    return_weights : bool
        Also return the weights ``(B, H, L, S)`` (per head, not averaged).
    implementation : ``"auto"``, ``"reference"`` or ``"tiled"``
        Where the heads' attention comes from: the reference (forms the weights) or
        :func:`companion.numpy.attention_tiled` (never holds an ``L x S`` matrix).
        ``"auto"`` takes the tiled kernel from ``L * S >= TILED_FROM_SCORES`` on, unless
        ``return_weights``. Both give the same outputs.
    rope : optional
        Rotary embeddings (:func:`companion.numpy.rotary_embedding`) for the queries and
        keys: ``True``, a base, a dict or a :class:`~companion.numpy.RotaryConfig`. The
        new keys sit at ``cache.seen ..`` (0 .. without a cache) and the queries are
        the last ``L`` of those positions; the cache stores rotated keys, so decoding
        one token at a time equals the full causal pass.
    window : int, optional
        Sliding-window attention (:func:`companion.numpy.causal_mask`): query position
        ``p`` sees keys ``p - window < j <= p`` (with ``causal``). With a rolling
        ``KVCache(max_length=W)`` the window defaults to ``W`` and may not exceed it;
        decoding one token at a time then equals full sliding-window attention.
    sinks : ``(H,)``, optional
        A learned sink logit per query head in the softmax's denominator only
        (GPT-OSS): ``w = e^s / (e^sinks[h] + sum e^s)``, the math of
        :func:`companion.numpy.attention_with_sinks`. Only the reference forms that
        softmax: ``"auto"`` takes it, ``"tiled"`` is refused. ``-inf`` everywhere is
        plain attention; the weights returned then sum to less than 1 per row.

    Returns
    -------
    ``(B, L, E_out)``, or ``(output, weights)`` with ``return_weights=True``. The dtype
    of ``x_q``; float16 is computed in float32.
    """
    causal = _check_flag("causal", causal)
    return_weights = _check_flag("return_weights", return_weights)
    # checked before the cache changes (the sizes come later)
    _choose_implementation(implementation, 0, 0, return_weights, TILED_FROM_SCORES)
    if sinks is not None:  # only the reference forms the softmax they join
        implementation = _sinks.choose_with_sinks(implementation)
        sinks = np.asarray(sinks)
        _checks.check_float("sinks", sinks.dtype)
        _sinks.check_sink_logits(sinks.shape, params.num_heads)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a companion.numpy.KVCache, got {type(cache).__name__}"
        )
    window = window_for_cache(window, cache)
    if not isinstance(params, MultiHeadParams):
        raise TypeError(
            f"params must be a MultiHeadParams, got {type(params).__name__}"
        )
    x_q, x_kv = np.asarray(x_q), np.asarray(x_kv)
    for name, x, width in (
        ("x_q", x_q, params.w_q.shape[0]),
        ("x_kv", x_kv, params.w_k.shape[0]),
    ):
        _checks.check_float(name, x.dtype)
        if x.ndim != 3 or x.shape[2] != width:
            raise ValueError(
                f"{name} must have shape (B, length, {width}) for these params, got "
                f"shape {x.shape}"
            )
    if x_q.dtype != x_kv.dtype:
        raise TypeError(
            f"x_q and x_kv must have the same dtype, got {x_q.dtype} and {x_kv.dtype}"
        )
    if x_q.shape[0] != x_kv.shape[0]:
        raise ValueError(
            f"x_q {x_q.shape} and x_kv {x_kv.shape} must have the same batch size B"
        )
    check_some_keys("x_kv", x_kv.shape[1], cache)
    dtype = _compute_dtype(x_q.dtype)
    # [book: multi-head projections]
    H, H_kv = params.num_heads, params.num_kv_heads
    # (B, H, L, D)
    q = _project(x_q.astype(dtype, copy=False), params.w_q, params.b_q, H, dtype)
    # (B, H_kv, S_new, D)
    k = _project(x_kv.astype(dtype, copy=False), params.w_k, params.b_k, H_kv, dtype)
    # (B, H_kv, S_new, D_v)
    v = _project(x_kv.astype(dtype, copy=False), params.w_v, params.b_v, H_kv, dtype)
    # [/book: multi-head projections]
    rope = _positions.as_rotary(rope)
    if rope is not None:  # at absolute positions, from cache.seen on
        start = 0 if cache is None else cache.seen
        q, k = _rotate_queries_and_keys(q, k, rope, start)
    # a call that fails after the append (a mask that does not fit every cached
    # position, say) leaves the cache as it was
    with unchanged_on_error(cache):
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H_kv, S, D), (B, H_kv, S, D_v)
        B, L = x_q.shape[:2]
        chosen = _choose_implementation(
            implementation, L, k.shape[2], return_weights, TILED_FROM_SCORES
        )
        # [book: multi-head core]
        if chosen == "tiled":
            # (B, H, L, D_v)
            heads = attention_tiled(q, k, v, mask=mask, causal=causal, window=window)
            D_v = heads.shape[-1]
        elif sinks is not None:
            weights = _sink_attention_weights(q, k, sinks, mask, causal, window)
            group = H // H_kv
            # (B, H, L, D_v): the weights of a row sum to less than 1
            heads = weights @ np.repeat(v, group, axis=1).astype(weights.dtype)
            D_v = heads.shape[-1]
        else:
            q, k, v, shapes, mask = _validated(q, k, v, mask)
            # (B, H_kv, group, L, S)
            weights = _grouped_weights(q, k, mask, causal, None, shapes, window)
            heads = weights @ v[:, :, None, :, :]  # (B, H_kv, group, L, D_v)
            D_v = shapes.D_v
            heads = heads.reshape(B, H, L, D_v)  # (B, H, L, D_v)
        # (B, L, H * D_v)
        merged = heads.transpose(0, 2, 1, 3).reshape(B, L, H * D_v)
        output = merged @ np.asarray(params.w_o, dtype=dtype)  # (B, L, E_out)
        if params.b_o is not None:
            output = output + np.asarray(params.b_o, dtype=dtype)
        # [/book: multi-head core]
    output = output.astype(x_q.dtype, copy=False)
    if return_weights:
        if sinks is None:
            weights = weights.reshape(shapes.scores)  # (B, H, L, S)
        return output, weights.astype(x_q.dtype, copy=False)
    return output
