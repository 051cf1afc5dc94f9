"""The TensorFlow attention namespace against Keras's built-in layer and against itself.

* ``keras.layers.MultiHeadAttention`` keeps its weights as kernels
  ``(dim, heads, head_dim)``, biases ``(heads, head_dim)`` and an output kernel
  ``(heads, value_dim, out)``;
  ``MultiHeadParams.from_keras`` and our layer's ``load_from_keras`` read them, and then
  ``multi_head_attention`` and our ``MultiHeadAttention`` layer equal Keras (masks,
  ``use_causal_mask`` for ``L == S``);
* the documented differences, each shown: Keras's causal mask is top-left aligned when
  ``L != S`` (ours is bottom-right, and equals Keras given that mask explicitly); a
  fully masked query gets uniform weights in Keras's default (fused) path but exactly
  0 here;
* our layer's grouped-query parameter count matches the formula; decoding token by token
  with a ``KVCache`` equals full causal self-attention; ``attention_tiled`` inside
  ``tf.function`` equals eager and never touches key blocks the causal mask hides.

The cross-backend comparison with the numpy float64 oracle lives in
``tests/test_attention_pairs.py``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import companion.tensorflow as ctf  # quiets TensorFlow before it is imported
from companion import numpy as cnp
from companion.numpy.multihead import MultiHeadParams
from companion.registry import implementations
from companion.testing import as_backend, assert_close, assert_close_to_oracle

ATTENTION = implementations("attention", backends=("tensorflow",))
ATTENTION_IDS = [f"{backend}-{name}" for backend, name, _ in ATTENTION]
BLOCKS = {"block_q": 3, "block_k": 4}  # divide none of the lengths below


def call(name, fn, *args, **kwargs):
    """Call an attention implementation; tiled with blocks that divide nothing."""
    if name == "attention_tiled":
        kwargs = {**BLOCKS, **kwargs}
    return fn(*args, **kwargs)


def keras_mha(
    rng, *, num_heads, key_dim, value_dim=None, E=8, E_kv=None, use_bias=True
):
    """A built Keras layer with random (non-zero) biases: copying them is tested too."""
    layer = keras.layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=key_dim, value_dim=value_dim, use_bias=use_bias
    )
    # builds it
    layer(np.zeros((1, 2, E), "float32"), np.zeros((1, 3, E_kv or E), "float32"))
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    return layer


def floats(rng, *shape):
    return rng.standard_normal(shape).astype("float32")


def float64(t):
    """The exact float64 values of a tensor of any float dtype (bfloat16 included)."""
    return tf.cast(t, tf.float64).numpy()


# --------------------------------------------------------------------------------------
# softmax, masks, the tiled kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_softmax_fully_masked_row_is_zero_where_tf_nn_softmax_is_nan(dtype):
    x = tf.constant([[-np.inf, -np.inf, -np.inf], [1.0, 2.0, -np.inf]], dtype)
    # the pitfall this guards
    assert np.isnan(tf.nn.softmax(tf.cast(x, "float32")).numpy()[0]).all()
    out = ctf.softmax(x, mask=tf.constant([[True, True, True], [True, False, True]]))
    assert out.dtype == x.dtype
    expected = cnp.softmax(
        np.array([[-np.inf, -np.inf, -np.inf], [1.0, -np.inf, -np.inf]])
    )
    assert_close(out, expected, name=f"softmax {dtype}")


@pytest.mark.parametrize("L,S", [(1, 1), (3, 3), (2, 5), (5, 2)])
def test_causal_and_padding_masks_equal_numpy(L, S):
    assert_close(ctf.causal_mask(L, S), cnp.causal_mask(L, S), name="causal_mask")
    lengths = np.array([0, 1, S])
    assert_close(
        ctf.padding_mask(tf.constant(lengths), S),
        cnp.padding_mask(lengths, S),
        name="padding_mask",
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("_backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tf_function_equals_eager(_backend, name, fn, causal, dtype, rng):
    # H=6, H_kv=2 (grouped), L=5 < S=7 (bottom-right causal), a padding mask.
    q, k, v = (
        as_backend(rng.standard_normal(s), "tensorflow", dtype)
        for s in ((2, 6, 5, 4), (2, 2, 7, 4), (2, 2, 7, 3))
    )
    mask = ctf.padding_mask(tf.constant([7, 4]), 7)
    eager = call(name, fn, q, k, v, mask=mask, causal=causal)
    graph = tf.function(
        lambda a, b, c: call(name, fn, a, b, c, mask=mask, causal=causal)
    )(q, k, v)
    assert graph.dtype == eager.dtype == q.dtype
    assert_close(graph, eager, name=f"tensorflow-{name}-{dtype} tf.function vs eager")
    oracle = cnp.scaled_dot_product_attention_reference(
        *(float64(t) for t in (q, k, v)), mask=mask.numpy(), causal=causal
    )
    baseline = ctf.scaled_dot_product_attention_reference(
        q, k, v, mask=mask, causal=causal
    )
    assert_close_to_oracle(
        graph, baseline, oracle, name=f"tensorflow-{name}-{dtype} in tf.function"
    )


@pytest.mark.parametrize("L,S", [(8, 8), (6, 9)], ids=["L=S", "L<S"])
def test_tiled_causal_never_reads_hidden_key_blocks(L, S, rng):
    """Keys and values the causal mask hides in whole blocks are NaN: tiled skips them.

    The reference multiplies the (zero) weights by every value: NaN reaches every row.
    """
    block = 4
    q = tf.constant(rng.standard_normal((1, 2, L, 4)))
    k_np, v_np = rng.standard_normal((1, 2, S, 4)), rng.standard_normal((1, 2, S, 3))
    # the first key block that rows 0..3 never see
    first_hidden = -(-(block + S - L) // block) * block
    assert first_hidden < S
    k_np[..., first_hidden:, :] = np.nan
    v_np[..., first_hidden:, :] = np.nan
    out = ctf.attention_tiled(
        q,
        tf.constant(k_np),
        tf.constant(v_np),
        causal=True,
        block_q=block,
        block_k=block,
    )
    clean_k, clean_v = np.nan_to_num(k_np), np.nan_to_num(v_np)
    oracle = cnp.scaled_dot_product_attention_reference(
        q.numpy(), clean_k, clean_v, causal=True
    )
    assert_close(
        out[..., :block, :],
        oracle[..., :block, :],
        name="first query block, hidden keys NaN",
    )
    assert np.isnan(
        ctf.scaled_dot_product_attention_reference(
            q, tf.constant(k_np), tf.constant(v_np), causal=True
        ).numpy()[..., :block, :]
    ).any()


@pytest.mark.parametrize("_backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_fully_masked_rows_are_exactly_zero(_backend, name, fn, rng):
    # L=4 > S=2 with causal: queries 0 and 1 see nothing (bottom-right alignment).
    q, k, v = (
        tf.constant(rng.standard_normal(s), tf.float32)
        for s in ((1, 3, 4, 5), (1, 1, 2, 5), (1, 1, 2, 3))
    )
    out = call(name, fn, q, k, v, causal=True).numpy()
    assert not np.isnan(out).any()
    assert (out[..., :2, :] == 0).all() and (out[..., 2:, :] != 0).any()


@pytest.mark.parametrize(
    "key_shape,kwargs,error,words",
    [
        ((1, 4, 7, 4), {}, ValueError, "multiple of the key/value heads"),
        (
            (1, 2, 7, 4),
            {"mask": np.ones((3, 7), bool)},
            ValueError,
            "does not broadcast",
        ),
        ((1, 2, 7, 4), {"mask": np.ones((5, 7), np.int32)}, TypeError, "boolean"),
        ((1, 2, 7, 4), {"block_q": 0}, ValueError, "block_q"),
        ((1, 2, 7, 4), {"causal": tf.constant(True)}, TypeError, "causal"),
    ],
    ids=["H%H_kv", "mask-shape", "mask-dtype", "block", "causal-tensor"],
)
def test_bad_input_is_named(key_shape, kwargs, error, words, rng):
    q = tf.constant(rng.standard_normal((1, 6, 5, 4)))
    k = tf.constant(rng.standard_normal(key_shape))
    v = tf.constant(rng.standard_normal((*key_shape[:3], 3)))
    kwargs = {
        name: tf.constant(value) if name == "mask" else value
        for name, value in kwargs.items()
    }
    with pytest.raises(error, match=words):
        ctf.attention_tiled(q, k, v, **kwargs)


SCORES = {
    "dot_product_scores": lambda q, k, w: (q, k),
    "scaled_dot_product_scores": lambda q, k, w: (q, k),
    "additive_scores": lambda q, k, w: (q, k, w["w_q"], w["w_k"], w["v"]),
    "multiplicative_scores": lambda q, k, w: (q, k, w["w"]),
    "negative_distance_scores": lambda q, k, w: (q, k),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SCORES))
def test_score_functions_equal_numpy(name, dtype, rng):
    # batch axes broadcast
    q, k = rng.standard_normal((2, 5, 4)), rng.standard_normal((1, 7, 4))
    weights = {
        "w_q": rng.standard_normal((4, 3)),
        "w_k": rng.standard_normal((4, 3)),
        "v": rng.standard_normal(3),
        "w": rng.standard_normal((4, 4)),
    }
    args = SCORES[name](q, k, weights)
    ours = getattr(ctf, name)(*(as_backend(a, "tensorflow", dtype) for a in args))
    assert ours.dtype == tf.as_dtype(dtype) and tuple(ours.shape) == (2, 5, 7)
    assert_close(ours, getattr(cnp, name)(*args), name=f"tensorflow-{name}-{dtype}")


@pytest.mark.parametrize("y_shape", [(9,), (9, 2)], ids=["y-1d", "y-2d"])
@pytest.mark.parametrize("x_shape", [(), (3,)], ids=["x-1d", "x-2d"])
def test_nadaraya_watson_equals_numpy(x_shape, y_shape, rng):
    x_query, x_keys = (
        rng.standard_normal((6, *x_shape)),
        rng.standard_normal((9, *x_shape)),
    )
    y = rng.standard_normal(y_shape)
    ours = ctf.nadaraya_watson(
        tf.constant(x_query), tf.constant(x_keys), tf.constant(y), bandwidth=0.3
    )
    assert_close(
        ours,
        cnp.nadaraya_watson(x_query, x_keys, y, bandwidth=0.3),
        name="nadaraya_watson",
    )


# --------------------------------------------------------------------------------------
# Keras's MultiHeadAttention: layouts, equality, documented differences
# --------------------------------------------------------------------------------------


def test_keras_weight_layout_and_from_keras(rng):
    layer = keras_mha(rng, num_heads=2, key_dim=3, value_dim=5, E=8, E_kv=6)
    shapes = {v.path.split("/", 1)[1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "query/kernel": (8, 2, 3),
        "query/bias": (2, 3),
        "key/kernel": (6, 2, 3),
        "key/bias": (2, 3),
        "value/kernel": (6, 2, 5),
        "value/bias": (2, 5),
        "attention_output/kernel": (2, 5, 8),
        "attention_output/bias": (8,),
    }
    params = MultiHeadParams.from_keras(layer)
    assert (params.w_q.shape, params.w_k.shape, params.w_v.shape, params.w_o.shape) == (
        (8, 6),
        (6, 6),
        (6, 10),
        (10, 8),
    )
    assert (params.head_dim, params.value_head_dim) == (3, 5)
    # head h of the query projection is kernel[:, h, :], i.e. columns h*D:(h+1)*D
    assert_close(
        params.w_q[:, 3:6], layer.query_dense.kernel.numpy()[:, 1, :], name="w_q head 1"
    )
    assert_close(
        params.w_o[5:10], layer.output_dense.kernel.numpy()[1], name="w_o head 1"
    )


KERAS_CASES = {
    "self-no-mask": dict(L=5, S=5, mask=False, causal=False),
    "cross-mask": dict(L=3, S=7, mask=True, causal=False),
    "self-causal": dict(L=5, S=5, mask=False, causal=True),
    "self-causal-mask": dict(L=1, S=1, mask=True, causal=True),
}


# Keras, for S = 1
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis")
@pytest.mark.parametrize("case", list(KERAS_CASES), ids=list(KERAS_CASES))
@pytest.mark.parametrize("implementation", ["function", "layer"])
def test_equals_keras_multi_head_attention(case, implementation, rng):
    L, S, use_mask, causal = (
        KERAS_CASES[case][key] for key in ("L", "S", "mask", "causal")
    )
    keras_layer = keras_mha(rng, num_heads=2, key_dim=3, value_dim=4, E=8, E_kv=6)
    x_q, x_kv = floats(rng, 2, L, 8), floats(rng, 2, S, 6)
    mask = rng.random((2, L, S)) > 0.3 if use_mask else None
    if mask is not None:
        mask[..., 0] = True  # no fully masked rows here (they differ, see below)
    expected, expected_weights = keras_layer(
        x_q,
        x_kv,
        attention_mask=mask,
        use_causal_mask=causal,
        return_attention_scores=True,
    )
    # the fused kernel
    fast_path = keras_layer(x_q, x_kv, attention_mask=mask, use_causal_mask=causal)
    if implementation == "function":
        params = MultiHeadParams.from_keras(keras_layer)
        ours, weights = ctf.multi_head_attention(
            tf.constant(x_q),
            tf.constant(x_kv),
            params,
            causal=causal,
            mask=None if mask is None else tf.constant(mask)[:, None],
            return_weights=True,
        )
    else:
        layer = ctf.MultiHeadAttention(2, 3, value_dim=4).load_from_keras(keras_layer)
        ours, weights = layer(
            x_q,
            x_kv,
            attention_mask=mask,
            use_causal_mask=causal,
            return_attention_scores=True,
        )
    assert_close(ours, expected, name=f"{implementation} vs Keras output")
    assert_close(ours, fast_path, name=f"{implementation} vs Keras fused output")
    assert_close(weights, expected_weights, name=f"{implementation} vs Keras weights")


def test_keras_causal_mask_is_top_left_when_L_differs_from_S(rng):
    L, S = 3, 6
    keras_layer = keras_mha(rng, num_heads=2, key_dim=4)
    layer = ctf.MultiHeadAttention(2, 4).load_from_keras(keras_layer)
    x_q, x_kv = floats(rng, 1, L, 8), floats(rng, 1, S, 8)
    keras_causal = keras_layer(x_q, x_kv, use_causal_mask=True)
    ours_causal = layer(x_q, x_kv, use_causal_mask=True)
    with pytest.raises(AssertionError):
        assert_close(ours_causal, keras_causal, name="bottom-right vs top-left")
    bottom_right = ctf.causal_mask(L, S)[None]  # (1, L, S)
    assert_close(
        ours_causal,
        keras_layer(x_q, x_kv, attention_mask=bottom_right),
        name="ours = Keras + our mask",
    )
    top_left = np.tril(np.ones((1, L, S), bool))  # what Keras builds
    assert_close(
        keras_causal,
        layer(x_q, x_kv, attention_mask=top_left),
        name="Keras = ours + its mask",
    )


def test_fully_masked_query_is_zero_here_uniform_in_keras_fused_path(rng):
    keras_layer = keras_mha(rng, num_heads=2, key_dim=3)
    layer = ctf.MultiHeadAttention(2, 3).load_from_keras(keras_layer)
    x_q, x_kv = floats(rng, 1, 3, 8), floats(rng, 1, 5, 8)
    mask = np.ones((1, 3, 5), bool)
    mask[0, 1] = False  # query 1 may attend to nothing
    ours, weights = layer(x_q, x_kv, attention_mask=mask, return_attention_scores=True)
    assert (weights.numpy()[0, :, 1] == 0).all()
    assert_close(
        ours[0, 1],
        keras_layer.output_dense.bias,
        rtol=0,
        atol=0,
        name="masked row = b_o exactly",
    )
    # Keras's fused path (the default call) adds a large negative number: uniform
    # weights, i.e. what a zero query would give (all scores equal).
    params = MultiHeadParams.from_keras(keras_layer)
    zero_query = MultiHeadParams(
        params.w_q * 0,
        params.b_q * 0,
        params.w_k,
        params.b_k,
        params.w_v,
        params.b_v,
        params.w_o,
        params.b_o,
        num_heads=2,
    )
    uniform = cnp.multi_head_attention(
        x_q.astype("float64"), x_kv.astype("float64"), zero_query
    )
    keras_fused = keras_layer(x_q, x_kv, attention_mask=mask)
    assert_close(
        keras_fused[0, 1], uniform[0, 1], name="Keras fused path: uniform weights"
    )
    # With return_attention_scores=True Keras 3.15 takes another path that zeroes
    # masked weights.
    _, keras_weights = keras_layer(
        x_q, x_kv, attention_mask=mask, return_attention_scores=True
    )
    assert (keras_weights.numpy()[0, :, 1] == 0).all()
    assert_close(
        ours.numpy()[0, [0, 2]],
        keras_fused.numpy()[0, [0, 2]],
        name="the other rows agree",
    )


# --------------------------------------------------------------------------------------
# our Keras layer: grouped-query parameters, conversion, KV cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,H_kv", [(6, 6), (6, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_layer_parameter_count_and_params_round_trip(H, H_kv, use_bias, rng):
    E_q, E_kv, D, D_v, E_out = 10, 7, 4, 3, 5
    layer = ctf.MultiHeadAttention(
        H, D, num_kv_heads=H_kv, value_dim=D_v, use_bias=use_bias, output_dim=E_out
    )
    x_q, x_kv = floats(rng, 2, 4, E_q), floats(rng, 2, 6, E_kv)
    out = layer(x_q, x_kv)
    assert tuple(out.shape) == (2, 4, E_out)
    weights = E_q * H * D + E_kv * H_kv * D + E_kv * H_kv * D_v + H * D_v * E_out
    biases = H * D + H_kv * D + H_kv * D_v + E_out
    assert layer.count_params() == weights + (biases if use_bias else 0)
    params = layer.to_params()
    assert (
        params.num_heads,
        params.num_kv_heads,
        params.head_dim,
        params.value_head_dim,
    ) == (H, H_kv, D, D_v)
    oracle = cnp.multi_head_attention(
        x_q.astype("float64"), x_kv.astype("float64"), params
    )
    assert_close(out, oracle, name="layer vs numpy oracle")
    assert_close(
        ctf.MultiHeadAttention.from_params(params)(x_q, x_kv),
        out,
        rtol=0,
        atol=0,
        name="from_params",
    )


@pytest.mark.parametrize("H_kv", [1, 2, 4], ids=["H_kv=1", "H_kv=2", "H_kv=H"])
@pytest.mark.parametrize("implementation", ["function", "layer"])
def test_kv_cache_decoding_equals_full_causal_self_attention(H_kv, implementation, rng):
    B, T, E = 2, 19, 8  # T > 16: the cache grows (16 -> 32) on the way
    params = MultiHeadParams.random(E, 4, H_kv, seed=3, dtype="float32")
    x = floats(rng, B, T, E)
    cache = ctf.KVCache()
    if implementation == "function":
        full = ctf.multi_head_attention(
            tf.constant(x), tf.constant(x), params, causal=True
        )

        def step(x_t):
            return ctf.multi_head_attention(x_t, x_t, params, causal=True, cache=cache)
    else:
        layer = ctf.MultiHeadAttention.from_params(params)
        full = layer(x, x, use_causal_mask=True)

        def step(x_t):
            return layer(x_t, x_t, use_causal_mask=True, cache=cache)

    # a prompt of 3 tokens, then one token at a time
    prompt = step(tf.constant(x[:, :3]))
    steps = [prompt] + [step(tf.constant(x[:, t : t + 1])) for t in range(3, T)]
    assert_close(
        tf.concat(steps, axis=1), full, name=f"{implementation} decoding with KVCache"
    )
    assert cache.length == T and cache.capacity == 32
    assert cache.nbytes == B * H_kv * 32 * (E // 4) * 2 * 4  # keys + values, float32
    assert tuple(cache.key.shape) == (B, H_kv, T, E // 4)
    oracle = cnp.multi_head_attention(
        x.astype("float64"), x.astype("float64"), params, causal=True
    )
    assert_close(full, oracle, name="full causal vs numpy oracle")


def test_kv_cache_rejects_mismatched_shapes_and_resets(rng):
    cache = ctf.KVCache()
    key, value = tf.zeros((1, 2, 3, 4)), tf.zeros((1, 2, 3, 5))
    cache.append(key, value)
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.append(tf.zeros((1, 1, 1, 4)), tf.zeros((1, 1, 1, 5)))
    with pytest.raises(ValueError, match="must agree on"):
        cache.append(tf.zeros((1, 2, 2, 4)), tf.zeros((1, 2, 1, 5)))
    cache.reset()
    assert cache.length == 0 and cache.nbytes == 0 and cache.key is None
