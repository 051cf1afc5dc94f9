r"""Multi-head (and grouped-query) attention for TensorFlow: a function, a KV cache and
a Keras 3 layer.

The same names and semantics as :mod:`companion.numpy.multihead`:

* :func:`multi_head_attention` applies a
  :class:`~companion.numpy.multihead.MultiHeadParams` (the one parameter class of the
  package, re-exported here) to batch-first ``(B, L, E)`` tensors;
* :class:`KVCache` stores projected keys and values for decoding, growing by doubling;
* :class:`MultiHeadAttention` is a ``keras.layers.Layer`` with grouped-query heads and a
  KV cache whose weights load from ``keras.layers.MultiHeadAttention``.

For one layer, with ``x_q (B, L, E_q)`` and ``x_kv (B, S, E_kv)``:

.. math::
    Q = x_q W_q + b_q, \quad K = x_{kv} W_k + b_k, \quad V = x_{kv} W_v + b_v, \qquad
    \text{head}_h = \operatorname{Attention}(Q_h, K_{h // (H/H_{kv})},
        V_{h // (H/H_{kv})}), \qquad
    y = [\text{head}_0, \dots, \text{head}_{H-1}]\, W_o + b_o

Conventions (bottom-right causal, ``True`` = attend, fully masked rows exactly 0):
:mod:`companion.conventions`. Explained in the book chapters *Attention: algorithm and
math* and *Making it fast*.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from companion import _checks, _positions, _sinks
from companion._implementation import TENSORFLOW_TILED_FROM_SCORES
from companion._implementation import choose_implementation as _choose_implementation
from companion._kvcache import (
    KVCacheBase,
    check_some_keys,
    unchanged_on_error,
    window_for_cache,
)
from companion.conventions import gqa_group_size
from companion.numpy.multihead import MultiHeadParams
from companion.tensorflow.attention import (
    _attention_and_weights,
    _check_flag,
    attention_tiled,
)
from companion.tensorflow.positions import _rotate_queries_and_keys

__all__ = ["MultiHeadParams", "multi_head_attention", "KVCache", "MultiHeadAttention"]

_HALF_PRECISION = ("float16", "bfloat16")
# "auto" takes the tiled kernel from this many scores per head (L * S) on
# (measured crossover, the run cited in companion/_implementation.py)
TILED_FROM_SCORES = TENSORFLOW_TILED_FROM_SCORES


def _heads(
    query,
    key,
    value,
    mask,
    causal,
    return_weights,
    implementation,
    window=None,
    sinks=None,
):
    """Every head's attention ``(B, H, L, D_v)`` and the weights (``None`` if tiled).

    ``sinks (H,)``: one logit per head in the softmax's denominator, the reference
    path of :func:`companion.tensorflow.attention_with_sinks`."""
    if sinks is not None:
        from companion.tensorflow.sinks import _sink_weights  # imports KVCache

        dtype = query.dtype
        work = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
        query, key = tf.cast(query, work), tf.cast(key, work)
        weights = _sink_weights(  # (B, H, L, S): a row sums to less than 1
            query, key, sinks, mask=mask, causal=causal, scale=None, window=window
        )
        group = int(query.shape[1]) // int(key.shape[1])
        value = tf.repeat(tf.cast(value, work), group, axis=1)  # (B, H, S, D_v)
        heads = tf.matmul(weights, value)  # (B, H, L, D_v)
        return heads, tf.cast(weights, dtype)
    chosen = _choose_implementation(
        implementation,
        query.shape[2],
        key.shape[2],
        return_weights,
        TILED_FROM_SCORES,
    )
    if chosen == "tiled":
        tiled = attention_tiled(
            query, key, value, mask=mask, causal=causal, window=window
        )
        return tiled, None
    return _attention_and_weights(
        query, key, value, mask=mask, causal=causal, window=window
    )


# --------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------


class KVCache(KVCacheBase):
    """Keys ``(B, H_kv, S, D)`` and values ``(B, H_kv, S, D_v)`` of the positions seen
    so far.

    :meth:`~companion._kvcache.KVCacheBase.append` writes the new positions into
    preallocated ``tf.Variable`` storage whose capacity doubles when it is full, so
    appending one position costs amortised O(1) copies instead of re-concatenating the
    whole cache every step. Meant for eager decoding loops (variables are created when
    the storage grows).
    """

    def _convert(self, name: str, x):
        return tf.convert_to_tensor(x)

    def _empty(self, like, capacity: int):
        B, H_kv, _, dim = like.shape
        # (B, H_kv, cap, dim)
        return tf.Variable(
            tf.zeros((B, H_kv, capacity, dim), like.dtype), trainable=False
        )

    def _write(self, storage, start: int, stop: int, x) -> None:
        storage[:, :, start:stop, :].assign(x)

    def _view(self, storage, length: int):
        return storage[:, :, :length, :]


# --------------------------------------------------------------------------------
# the function
# --------------------------------------------------------------------------------


def _tensor(array, dtype):
    """A parameter array (numpy or tensor) as a tensor of ``dtype``."""
    return None if array is None else tf.cast(tf.convert_to_tensor(array), dtype)


def _project(x, weight, bias, heads: int):
    """``x W + b`` split into heads: ``(B, T, E) -> (B, heads, T, dim)``."""
    B, T, _ = x.shape
    y = tf.linalg.matmul(x, weight)  # x W: (B, T, heads * dim)
    if bias is not None:
        y = y + bias  # + b
    y = tf.reshape(y, (B, T, heads, -1))  # (B, T, heads, dim)
    return tf.transpose(y, (0, 2, 1, 3))  # (B, heads, T, dim)


def _check_layer_inputs(x_q, x_kv, params: MultiHeadParams):
    q, kv = tuple(x_q.shape), tuple(x_kv.shape)
    for name, shape in (("x_q", q), ("x_kv", kv)):
        if len(shape) != 3:
            raise ValueError(f"{name} must be batch-first (B, L, E), got shape {shape}")
    if q[0] != kv[0]:
        raise ValueError(f"x_q {q} and x_kv {kv} must have the same batch size B")
    E_q, E_kv = np.shape(params.w_q)[0], np.shape(params.w_k)[0]
    if q[2] != E_q:
        raise ValueError(
            f"x_q {q} has width E={q[2]} but params.w_q {tuple(np.shape(params.w_q))} "
            f"expects {E_q}"
        )
    if kv[2] != E_kv:
        raise ValueError(
            f"x_kv {kv} has width E={kv[2]} but params.w_k "
            f"{tuple(np.shape(params.w_k))} expects {E_kv}"
        )


def multi_head_attention(
    x_q,
    x_kv,
    params,
    *,
    mask=None,
    causal=False,
    cache=None,
    return_weights=False,
    implementation="auto",
    rope=None,
    window=None,
    sinks=None,
):
    r"""Multi-head attention with ``params`` on batch-first tensors: ``(B, L, E_q), (B,
    S, E_kv) -> (B, L, E_out)``.

    See the module docstring for the equation. ``params`` is a
    :class:`MultiHeadParams` (``num_kv_heads < num_heads`` gives grouped-query
    attention). ``mask`` (boolean, ``True`` = attend, or float, added) broadcasts to
    ``(B, H, L, S)``; ``causal`` is bottom-right aligned. With ``cache`` (a
    :class:`KVCache`), the projected keys and values of ``x_kv`` are appended to it and
    attention runs over every cached position, so feeding a sequence one token at a time
    with ``causal=True`` reproduces full causal self-attention. With ``return_weights``,
    returns ``(output, weights (B, H, L, S))``. float16/bfloat16 are computed in
    float32. ``implementation`` (``"auto"``, ``"reference"``, ``"tiled"``) picks the
    heads' attention: the reference or :func:`companion.tensorflow.attention_tiled`
    (outputs and gradients agree); ``"auto"`` is tiled from
    ``L * S >= TILED_FROM_SCORES`` on, unless ``return_weights``. ``rope`` (``True``, a
    base, a dict or a :class:`~companion.numpy.RotaryConfig`) rotates queries and keys
    at their absolute positions (the new keys from ``cache.seen`` on), as in
    :func:`companion.numpy.multi_head_attention`. ``window`` is sliding-window
    attention, as there (a rolling ``KVCache(max_length=W)`` defaults it to ``W``).
    ``sinks`` (``(H,)``) adds one learned logit per head to the softmax's denominator
    (GPT-OSS; :func:`companion.tensorflow.attention_with_sinks`); only the reference
    forms that softmax, so ``"auto"`` takes it and ``"tiled"`` is refused.
    """
    if not isinstance(params, MultiHeadParams):
        raise TypeError(
            f"params must be a MultiHeadParams, got {type(params).__name__}"
        )
    causal = _check_flag("causal", causal)
    return_weights = _check_flag("return_weights", return_weights)
    # checked before the cache changes (the sizes come later)
    _choose_implementation(implementation, 0, 0, return_weights, TILED_FROM_SCORES)
    if sinks is not None:  # only the reference forms the softmax they join
        implementation = _sinks.choose_with_sinks(implementation)
        sinks = tf.convert_to_tensor(sinks)
        _checks.check_float("sinks", sinks.dtype)
        _sinks.check_sink_logits(sinks.shape, params.num_heads)
    window = window_for_cache(window, cache)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a companion.tensorflow.KVCache, got {type(cache).__name__}"
        )
    x_q, x_kv = tf.convert_to_tensor(x_q), tf.convert_to_tensor(x_kv)
    names = (
        _checks.check_float("x_q", x_q.dtype),
        _checks.check_float("x_kv", x_kv.dtype),
    )
    if names[0] != names[1]:
        raise TypeError(
            f"x_q and x_kv must have the same dtype, got {names[0]} and {names[1]}"
        )
    _check_layer_inputs(x_q, x_kv, params)
    check_some_keys("x_kv", x_kv.shape[1], cache)
    work = tf.float32 if names[0] in _HALF_PRECISION else x_q.dtype
    H, H_kv = params.num_heads, params.num_kv_heads

    xq, xkv = tf.cast(x_q, work), tf.cast(x_kv, work)
    # (B, H, L, D)
    query = _project(xq, _tensor(params.w_q, work), _tensor(params.b_q, work), H)
    # (B, H_kv, S, D)
    key = _project(xkv, _tensor(params.w_k, work), _tensor(params.b_k, work), H_kv)
    # (B, H_kv, S, D_v)
    value = _project(xkv, _tensor(params.w_v, work), _tensor(params.b_v, work), H_kv)
    # heads in the input dtype
    query, key, value = (tf.cast(t, x_q.dtype) for t in (query, key, value))
    rope = _positions.as_rotary(rope)
    if rope is not None:  # at absolute positions, from cache.seen on
        start = 0 if cache is None else cache.seen
        query, key = _rotate_queries_and_keys(query, key, rope, start)
    # a call that fails after the append (a mask that does not fit every cached
    # position, say) leaves the cache as it was
    with unchanged_on_error(cache):
        if cache is not None:
            # everything cached: (B, H_kv, S_total, D), (B, H_kv, S_total, D_v)
            key, value = cache.append(key, value)
        # (B, H, L, D_v)
        heads, weights = _heads(
            query,
            key,
            value,
            mask,
            causal,
            return_weights,
            implementation,
            window,
            sinks,
        )
        B, _, L, D_v = heads.shape
        # (B, L, H*D_v)
        concatenated = tf.reshape(
            tf.transpose(tf.cast(heads, work), (0, 2, 1, 3)), (B, L, H * D_v)
        )
        # [head_0..head_H-1] W_o: (B, L, E_out)
        output = tf.linalg.matmul(concatenated, _tensor(params.w_o, work))
        if params.b_o is not None:
            output = output + _tensor(params.b_o, work)  # + b_o
    output = tf.cast(output, x_q.dtype)
    return (output, weights) if return_weights else output


# --------------------------------------------------------------------------------
# the Keras layer
# --------------------------------------------------------------------------------


class MultiHeadAttention(keras.layers.Layer):
    """A Keras 3 multi-head attention layer with grouped-query heads and a KV cache.

    Weights use the layout of ``keras.layers.MultiHeadAttention`` (query kernel
    ``(E_q, H, key_dim)``, bias ``(H, key_dim)``, key/value kernels
    ``(E_kv, H_kv, key_dim / value_dim)``, output kernel
    ``(H, value_dim, output_dim)``), so :meth:`load_from_keras` copies a Keras layer's
    weights (with ``num_kv_heads == num_heads``) and the two layers then agree, with the
    differences documented in :mod:`companion.conventions`: ``use_causal_mask`` is
    bottom-right aligned here (top-left in Keras when ``L != S``), and a query with
    nothing to attend to gives 0 here (uniform weights in Keras).

    Parameters
    ----------
    num_heads : int
        Query heads ``H``.
    key_dim : int
        Head dimension ``D`` of queries and keys.
    num_kv_heads : int, optional
        Key/value heads ``H_kv`` (divides ``H``); default ``H``. ``1`` is multi-query.
    value_dim : int, optional
        Head dimension ``D_v`` of values; default ``key_dim``.
    use_bias : bool
        Biases on all four projections.
    output_dim : int, optional
        Width of the output; default the query's width ``E_q``.

    Call ``layer(query (B, L, E_q), value (B, S, E_kv), key=None,
    attention_mask=None, use_causal_mask=False, cache=None,
    return_attention_scores=False)``; ``attention_mask`` is ``(B, L, S)`` or
    ``(B, H, L, S)``, ``True`` (nonzero) = attend, as in Keras. ``implementation``
    (``"auto"``, ``"reference"``, ``"tiled"``): where the heads' attention comes from,
    as in :func:`multi_head_attention`. ``rope`` (``True``, a base, a dict or a
    :class:`~companion.numpy.RotaryConfig`) rotates queries and keys
    at their absolute positions in every call, as in :func:`multi_head_attention`.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        num_kv_heads=None,
        value_dim=None,
        use_bias=True,
        output_dim=None,
        implementation="auto",
        rope=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rope = _positions.as_rotary(rope)  # RotaryConfig or None
        _choose_implementation(implementation, 0, 0, False, TILED_FROM_SCORES)
        self.implementation = implementation
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        gqa_group_size(num_heads, num_kv_heads)  # ValueError unless H_kv divides H
        for name, size in (
            ("key_dim", key_dim),
            ("value_dim", value_dim),
            ("output_dim", output_dim),
        ):
            if size is not None:
                _checks.check_int(name, size)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.key_dim = key_dim
        self.value_dim = key_dim if value_dim is None else value_dim
        self.use_bias = _check_flag("use_bias", use_bias)
        self.output_dim = output_dim

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            num_kv_heads=self.num_kv_heads,
            value_dim=self.value_dim,
            use_bias=self.use_bias,
            output_dim=self.output_dim,
            implementation=self.implementation,
            rope=None if self.rope is None else _positions.rotary_dict(self.rope),
        )
        return config

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        E_q, E_k, E_v = query_shape[-1], key_shape[-1], value_shape[-1]
        H, H_kv, D, D_v = (
            self.num_heads,
            self.num_kv_heads,
            self.key_dim,
            self.value_dim,
        )
        E_out = E_q if self.output_dim is None else self.output_dim

        def weight(name, shape, bias=False):
            init = "zeros" if bias else "glorot_uniform"
            return self.add_weight(name=name, shape=shape, initializer=init)

        self.query_kernel = weight("query_kernel", (E_q, H, D))  # (E_q, H, D)
        self.key_kernel = weight("key_kernel", (E_k, H_kv, D))  # (E_kv, H_kv, D)
        # (E_kv, H_kv, D_v)
        self.value_kernel = weight("value_kernel", (E_v, H_kv, D_v))
        self.output_kernel = weight("output_kernel", (H, D_v, E_out))  # (H, D_v, E_out)
        if self.use_bias:
            self.query_bias = weight("query_bias", (H, D), bias=True)  # (H, D)
            self.key_bias = weight("key_bias", (H_kv, D), bias=True)  # (H_kv, D)
            # (H_kv, D_v)
            self.value_bias = weight("value_bias", (H_kv, D_v), bias=True)
            self.output_bias = weight("output_bias", (E_out,), bias=True)  # (E_out,)
        else:
            self.query_bias = self.key_bias = self.value_bias = self.output_bias = None

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        use_causal_mask=False,
        cache=None,
        return_attention_scores=False,
    ):
        _choose_implementation(
            self.implementation, 0, 0, bool(return_attention_scores), TILED_FROM_SCORES
        )
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(
                "cache must be a companion.tensorflow.KVCache, got "
                f"{type(cache).__name__}"
            )
        key = value if key is None else key
        dtype = query.dtype
        B, L, _ = query.shape

        def project(x, kernel, bias):  # (B, T, E) -> (B, heads, T, dim)
            # x W: (B, heads, T, dim)
            y = tf.einsum("bte,ehd->bhtd", x, tf.cast(kernel, dtype))
            # + b
            return y if bias is None else y + tf.cast(bias, dtype)[None, :, None, :]

        q = project(query, self.query_kernel, self.query_bias)  # (B, H, L, D)
        k = project(key, self.key_kernel, self.key_bias)  # (B, H_kv, S, D)
        v = project(value, self.value_kernel, self.value_bias)  # (B, H_kv, S, D_v)
        if self.rope is not None:  # at absolute positions, from cache.seen on
            start = 0 if cache is None else cache.seen
            q, k = _rotate_queries_and_keys(q, k, self.rope, start)
        with unchanged_on_error(cache):  # a failed call leaves the cache as it was
            if cache is not None:
                # (B, H_kv, S_total, D), (B, H_kv, S_total, D_v)
                k, v = cache.append(k, v)
            mask = None
            if attention_mask is not None:
                mask = tf.convert_to_tensor(attention_mask)
                # Keras: nonzero = attend
                mask = mask if mask.dtype == tf.bool else tf.not_equal(mask, 0)
                if mask.shape.rank == 3:
                    mask = mask[:, None, :, :]  # (B, 1, L, S): the same for every head
            # (B, H, L, D_v)
            heads, weights = _heads(
                q,
                k,
                v,
                mask,
                bool(use_causal_mask),
                bool(return_attention_scores),
                self.implementation,
                window_for_cache(None, cache),  # a rolling cache's window
            )
            # (B, L, E_out)
            output = tf.einsum(
                "bhld,hde->ble", heads, tf.cast(self.output_kernel, dtype)
            )
            if self.output_bias is not None:
                output = output + tf.cast(self.output_bias, dtype)  # + b_o
        return (output, weights) if return_attention_scores else output

    # --- parameters: MultiHeadParams and keras.layers.MultiHeadAttention --------------

    def to_params(self) -> MultiHeadParams:
        """This layer's weights as a :class:`MultiHeadParams` of numpy arrays (``y = x @
        W + b``)."""
        if not self.built:
            raise ValueError(
                "the layer has no weights yet: call it once (or build it) before "
                "to_params()"
            )

        def flat(w, rows):
            # a copy, not a view
            return None if w is None else np.array(w.numpy()).reshape(rows, -1)

        H, D_v = self.num_heads, self.value_dim
        return MultiHeadParams(
            w_q=flat(self.query_kernel, self.query_kernel.shape[0]),  # (E_q, H*D)
            # (H*D,)
            b_q=None if self.query_bias is None else flat(self.query_bias, 1)[0],
            w_k=flat(self.key_kernel, self.key_kernel.shape[0]),  # (E_kv, H_kv*D)
            # (H_kv*D,)
            b_k=None if self.key_bias is None else flat(self.key_bias, 1)[0],
            w_v=flat(self.value_kernel, self.value_kernel.shape[0]),  # (E_kv, H_kv*D_v)
            # (H_kv*D_v,)
            b_v=None if self.value_bias is None else flat(self.value_bias, 1)[0],
            w_o=flat(self.output_kernel, H * D_v),  # (H*D_v, E_out)
            # (E_out,)
            b_o=None if self.output_bias is None else flat(self.output_bias, 1)[0],
            num_heads=H,
            num_kv_heads=self.num_kv_heads,
        )

    def set_params(self, params: MultiHeadParams) -> None:
        """Copy the weights of ``params`` (shapes must match this built layer)."""
        H, H_kv, D, D_v = (
            self.num_heads,
            self.num_kv_heads,
            self.key_dim,
            self.value_dim,
        )
        if (params.num_heads, params.num_kv_heads) != (H, H_kv):
            raise ValueError(
                f"params have H={params.num_heads}, H_kv={params.num_kv_heads}; the "
                "layer has "
                f"H={H}, H_kv={H_kv}"
            )
        pairs = [
            (self.query_kernel, params.w_q),
            (self.key_kernel, params.w_k),
            (self.value_kernel, params.w_v),
            (self.output_kernel, params.w_o),
        ]
        biases = (params.b_q, params.b_k, params.b_v, params.b_o)
        if self.use_bias != (biases[0] is not None) or any(
            (b is None) != (biases[0] is None) for b in biases
        ):
            raise ValueError(
                f"the layer has use_bias={self.use_bias}; params must have all four "
                "biases or none"
            )
        if self.use_bias:
            pairs += list(
                zip(
                    (self.query_bias, self.key_bias, self.value_bias, self.output_bias),
                    biases,
                )
            )
        for variable, array in pairs:
            array = np.asarray(array)
            if array.size != int(np.prod(variable.shape)):
                raise ValueError(
                    f"params array of shape {array.shape} does not fit weight "
                    f"{variable.path} "
                    f"of shape {tuple(variable.shape)} (H={H}, H_kv={H_kv}, D={D}, "
                    f"D_v={D_v})"
                )
            variable.assign(array.reshape(variable.shape).astype(variable.dtype))

    @classmethod
    def from_params(cls, params: MultiHeadParams, **kwargs) -> "MultiHeadAttention":
        """A built layer holding the weights of ``params``."""
        E_q, E_kv = np.shape(params.w_q)[0], np.shape(params.w_k)[0]
        layer = cls(
            params.num_heads,
            params.head_dim,
            num_kv_heads=params.num_kv_heads,
            value_dim=params.value_head_dim,
            use_bias=params.b_q is not None,
            output_dim=np.shape(params.w_o)[1],
            **kwargs,
        )
        layer.build((None, None, E_q), (None, None, E_kv))
        layer.set_params(params)
        return layer

    def load_from_keras(self, keras_layer) -> "MultiHeadAttention":
        """Copy the weights of a built ``keras.layers.MultiHeadAttention`` (same sizes;
        ``H_kv == H``)."""
        params = MultiHeadParams.from_keras(keras_layer)
        if not self.built:
            self.build(
                (None, None, np.shape(params.w_q)[0]),
                (None, None, np.shape(params.w_v)[0]),
                (None, None, np.shape(params.w_k)[0]),
            )
        self.set_params(params)
        return self
