"""numpy-specific attention tests: masks, softmax, score functions, Nadaraya-Watson,
MultiHeadParams, KVCache, and the tiled kernel's log-sum-exp, block skipping and memory.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from companion.numpy import (
    KVCache,
    MultiHeadParams,
    additive_scores,
    attention_tiled,
    attention_weights,
    causal_mask,
    dot_product_scores,
    multi_head_attention,
    multiplicative_scores,
    nadaraya_watson,
    negative_distance_scores,
    padding_mask,
    scaled_dot_product_attention_reference,
    scaled_dot_product_scores,
    softmax,
)
from companion.numpy.attention import _attention_tiled_forward
from companion.testing import assert_close

# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "L, S, picture",
    [
        (3, 3, [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
        (
            2,
            5,
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        ),  # the picture in companion.conventions
        (
            4,
            2,
            [[0, 0], [0, 0], [1, 0], [1, 1]],
        ),  # L > S: the first queries see nothing
        (1, 1, [[1]]),
    ],
    ids=["L3-S3", "L2-S5", "L4-S2", "L1-S1"],
)
def test_causal_mask_is_bottom_right_aligned(L, S, picture):
    mask = causal_mask(L, S)
    assert mask.dtype == np.bool_
    assert_close(mask, np.array(picture, dtype=bool), name=f"causal_mask({L}, {S})")


@pytest.mark.parametrize("bad", [-1, 2.0, True])
def test_causal_mask_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="L"):
        causal_mask(bad, 3)


def test_padding_mask_picture():
    mask = padding_mask([3, 1, 0], 4)
    assert mask.shape == (3, 1, 1, 4) and mask.dtype == np.bool_
    expected = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)[
        :, None, None, :
    ]
    assert_close(mask, expected, name="padding_mask([3, 1, 0], 4)")


@pytest.mark.parametrize(
    "lengths, S, error",
    [
        ([5], 4, ValueError),
        ([-1], 4, ValueError),
        ([1.5], 4, TypeError),
        ([[1]], 4, ValueError),
        ([1], -2, ValueError),
    ],
    ids=["too-long", "negative", "float", "2-D", "negative-S"],
)
def test_padding_mask_rejects_bad_lengths(lengths, S, error):
    with pytest.raises(error, match="lengths|S"):
        padding_mask(lengths, S)


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_softmax_masked_entries_and_empty_rows_are_zero(dtype, rng):
    x = rng.standard_normal((3, 5)).astype(dtype)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    weights = softmax(x, mask=mask)
    assert weights.dtype == np.dtype(dtype)
    assert_close(
        np.where(mask, 0, weights),
        np.zeros((3, 5), dtype),
        rtol=0,
        atol=0,
        name="masked entries",
    )
    assert_close(
        weights.sum(axis=-1, dtype=np.float64),
        np.array([1.0, 0.0, 1.0]),
        rtol=0,
        atol=4 * np.finfo(dtype).eps,
        name="row sums",
    )


def test_softmax_is_stable_for_huge_scores():
    # exp(1e4) overflows float32
    x = np.array([1e4, 1e4 - 1.0, -np.inf], dtype=np.float32)
    weights = softmax(x)
    e = np.float32(np.exp(-1.0))
    assert_close(
        weights,
        np.array([1 / (1 + e), e / (1 + e), 0], dtype=np.float32),
        name="softmax",
    )


def test_softmax_axis_and_all_minus_inf(rng):
    x = rng.standard_normal((4, 3))
    assert_close(
        softmax(x, axis=0), softmax(x.T, axis=-1).T, name="softmax along axis 0"
    )
    assert_close(
        softmax(np.full(3, -np.inf)), np.zeros(3), rtol=0, atol=0, name="all -inf"
    )


def test_softmax_rejects_unbroadcastable_mask():
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
        softmax(np.zeros((2, 3)), mask=np.ones(4, dtype=bool))


# ------------------------------------------------------------------------ grouped-query


@pytest.mark.parametrize(
    "H, H_kv", [(6, 1), (6, 2), (6, 3), (6, 6)], ids=lambda v: str(v)
)
def test_grouped_query_heads_read_h_div_group(H, H_kv, rng):
    query = rng.standard_normal((2, H, 5, 4))
    key, value = (
        rng.standard_normal((2, H_kv, 7, 4)),
        rng.standard_normal((2, H_kv, 7, 3)),
    )
    group = H // H_kv
    # h -> h // group
    repeated = {
        "key": np.repeat(key, group, axis=-3),
        "value": np.repeat(value, group, axis=-3),
    }
    assert_close(
        scaled_dot_product_attention_reference(query, key, value, causal=True),
        scaled_dot_product_attention_reference(
            query, repeated["key"], repeated["value"], causal=True
        ),
        name="grouped vs repeated heads",
    )
    assert_close(
        attention_weights(query, key),
        attention_weights(query, repeated["key"]),
        name="weights",
    )


def test_reference_rejects_mixed_dtypes(rng):
    q = rng.standard_normal((1, 2, 3)).astype(np.float32)
    with pytest.raises(TypeError, match="same dtype"):
        scaled_dot_product_attention_reference(q, q.astype(np.float64), q)


# ----------------------------------------------------------------------------- scores


def test_scaled_and_multiplicative_scores_reduce_to_dot_product(rng):
    q, k = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 7, 4))
    dot = dot_product_scores(q, k)  # (2, 5, 7)
    assert dot.shape == (2, 5, 7)
    assert_close(dot[1, 2, 3], q[1, 2] @ k[1, 3], name="q_2 . k_3")
    assert_close(scaled_dot_product_scores(q, k), dot / 2.0, name="scaled by 1/sqrt(4)")
    assert_close(
        scaled_dot_product_scores(q, k, scale=0.3), 0.3 * dot, name="scale=0.3"
    )
    assert_close(multiplicative_scores(q, k, np.eye(4)), dot, name="W = I")
    w = rng.standard_normal((4, 4))
    assert_close(
        multiplicative_scores(q, k, w)[0, 1, 2], q[0, 1] @ w @ k[0, 2], name="q^T W k"
    )


def test_additive_scores_pair_by_pair(rng):
    # D_q != D_k is fine here
    q, k = rng.standard_normal((5, 3)), rng.standard_normal((7, 2))
    w_q, w_k, v = (
        rng.standard_normal((3, 6)),
        rng.standard_normal((2, 6)),
        rng.standard_normal(6),
    )
    scores = additive_scores(q, k, w_q, w_k, v)
    assert scores.shape == (5, 7)
    assert_close(
        scores[4, 6],
        v @ np.tanh(q[4] @ w_q + k[6] @ w_k),
        name="v^T tanh(W_q q + W_k k)",
    )
    with pytest.raises(ValueError, match="w_k"):
        additive_scores(q, k, w_q, w_k.T, v)


def test_negative_distance_scores(rng):
    q, k = rng.standard_normal((4, 3)), rng.standard_normal((6, 3))
    scores = negative_distance_scores(q, k)
    assert_close(scores[3, 5], -np.linalg.norm(q[3] - k[5]), name="-||q_3 - k_5||")
    assert (scores <= 0).all()
    assert_close(
        negative_distance_scores(q, q).diagonal(),
        np.zeros(4),
        name="distance to itself",
    )


@pytest.mark.parametrize(
    "x_dims, y_dims", [(1, 1), (1, 2), (2, 1), (2, 2)], ids=lambda v: f"{v}d"
)
@pytest.mark.parametrize("bandwidth", [0.3, 1.0, 4.0])
def test_nadaraya_watson_equals_gaussian_kernel_weights(x_dims, y_dims, bandwidth, rng):
    x_keys = rng.standard_normal((11,) if x_dims == 1 else (11, 3))
    x_query = rng.standard_normal((5,) if x_dims == 1 else (5, 3))
    y_values = rng.standard_normal((11,) if y_dims == 1 else (11, 2))
    predicted = nadaraya_watson(x_query, x_keys, y_values, bandwidth=bandwidth)
    assert predicted.shape == ((5,) if y_dims == 1 else (5, 2))
    q, k = x_query.reshape(5, -1), x_keys.reshape(11, -1)
    # direct formula
    kernel_weights = softmax(
        -(negative_distance_scores(q, k) ** 2) / (2 * bandwidth**2)
    )
    assert_close(
        predicted,
        kernel_weights @ y_values,
        name="one matmul + key bias vs -||x - x_i||^2 / 2h^2",
    )


def test_nadaraya_watson_bandwidth_limits(rng):
    x, y = np.linspace(0, 1, 9), rng.standard_normal(9)
    assert_close(
        nadaraya_watson(x, x, y, bandwidth=1e-3), y, name="tiny bandwidth: interpolates"
    )
    assert_close(
        nadaraya_watson(x, x, y, bandwidth=1e4),
        np.full(9, y.mean()),
        rtol=1e-6,
        atol=1e-8,
        name="huge bandwidth: the mean",
    )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"bandwidth": 0.0}, ValueError, "bandwidth"),
        ({"x_keys": np.zeros((4, 2))}, ValueError, "x_keys"),
        ({"y_values": np.zeros(3)}, ValueError, "y_values"),
        ({"x_query": np.zeros(5, dtype=int)}, TypeError, "x_query"),
    ],
    ids=["bandwidth", "features", "y-rows", "integer"],
)
def test_nadaraya_watson_rejects_bad_input(kwargs, error, words):
    arguments = {
        "x_query": np.zeros(5),
        "x_keys": np.zeros(4),
        "y_values": np.zeros(4),
        "bandwidth": 1.0,
    }
    arguments.update(kwargs)
    bandwidth = arguments.pop("bandwidth")
    with pytest.raises(error, match=words):
        nadaraya_watson(**arguments, bandwidth=bandwidth)


# --------------------------------------------------------------------------- multi-head


@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_multi_head_params_shapes(H, H_kv):
    params = MultiHeadParams.random(16, H, H_kv, bias=True, seed=3, dtype="float32")
    D = 16 // H
    assert (params.head_dim, params.value_head_dim) == (D, D)
    assert params.w_q.shape == (16, H * D) and params.w_k.shape == (16, H_kv * D)
    assert params.w_v.shape == (16, H_kv * D) and params.w_o.shape == (H * D, 16)
    assert (
        params.b_q.shape == (H * D,)
        and params.b_o.shape == (16,)
        and params.w_q.dtype == np.float32
    )
    x = np.ones((2, 5, 16), np.float32)
    output, weights = multi_head_attention(x, x[:, :3], params, return_weights=True)
    assert (
        output.shape == (2, 5, 16)
        and output.dtype == np.float32
        and weights.shape == (2, H, 5, 3)
    )
    assert MultiHeadParams.random(16, H, bias=False).b_k is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_kv_heads": 3}, "multiple"),
        ({"w_o": np.zeros((8, 16))}, "w_o"),
        ({"b_q": np.zeros(5)}, "b_q"),
    ],
    ids=["heads", "w_o", "b_q"],
)
def test_multi_head_params_rejects_inconsistent_shapes(change, words):
    fields = vars(MultiHeadParams.random(16, 4)).copy()
    fields.update(change)
    with pytest.raises(ValueError, match=words):
        MultiHeadParams(**fields)


def test_from_torch_matches_torch_multihead_attention(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64)
    x_q, x_kv = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 7, 12))
    expected, _ = module(*(torch.from_numpy(a) for a in (x_q, x_kv, x_kv)))
    assert_close(
        multi_head_attention(x_q, x_kv, MultiHeadParams.from_torch(module)),
        expected,
        name="from_torch",
    )


def test_from_torch_with_kdim_vdim(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    module = torch.nn.MultiheadAttention(
        8, 2, kdim=5, vdim=5, batch_first=True, dtype=torch.float64
    )
    x_q, x_kv = rng.standard_normal((1, 4, 8)), rng.standard_normal((1, 6, 5))
    expected, _ = module(*(torch.from_numpy(a) for a in (x_q, x_kv, x_kv)))
    assert_close(
        multi_head_attention(x_q, x_kv, MultiHeadParams.from_torch(module)),
        expected,
        name="from_torch kdim/vdim",
    )


def test_from_keras_matches_keras_multihead_attention(rng):
    keras = pytest.importorskip("keras")
    layer = keras.layers.MultiHeadAttention(
        num_heads=3, key_dim=4, value_dim=5, output_shape=6, dtype="float64"
    )
    x_q, x_kv = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 8, 9))
    expected = keras.ops.convert_to_numpy(layer(x_q, x_kv))
    params = MultiHeadParams.from_keras(layer)
    assert (
        params.w_k.shape == (9, 12)
        and params.w_v.shape == (9, 15)
        and params.w_o.shape == (15, 6)
    )
    assert_close(multi_head_attention(x_q, x_kv, params), expected, name="from_keras")


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_grows_by_doubling():
    cache = KVCache()
    assert cache.length == 0 and cache.nbytes == 0 and cache.key is None
    capacities, appended = [], []
    for t in range(40):
        key = np.full((2, 3, 1, 4), float(t))
        value = np.full((2, 3, 1, 5), -float(t))
        appended.append((key, value))
        k, v = cache.append(key, value)
        capacities.append(cache.capacity)
        assert k.shape == (2, 3, t + 1, 4) and v.shape == (2, 3, t + 1, 5)
    # three allocations for 40 tokens, not 40
    assert sorted(set(capacities)) == [16, 32, 64]
    assert cache.nbytes == 2 * 3 * 64 * (4 + 5) * 8
    assert_close(
        cache.key, np.concatenate([k for k, _ in appended], axis=2), name="cached keys"
    )
    assert_close(
        cache.value,
        np.concatenate([v for _, v in appended], axis=2),
        name="cached values",
    )
    with pytest.raises(ValueError):
        # read-only view: the cache cannot be changed behind its back
        cache.key[0, 0, 0, 0] = 1.0
    cache.reset()
    assert cache.length == 0 and cache.nbytes == 0


def test_kv_cache_rejects_mismatched_appends():
    cache = KVCache()
    cache.append(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="H_kv"):
        cache.append(np.zeros((1, 1, 3, 4)), np.zeros((1, 1, 3, 4)))
    with pytest.raises(ValueError, match="S_new"):
        cache.append(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 2, 4)))


# ------------------------------------------------------------------------- tiled kernel


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_log_sum_exp(causal, rng):
    query, key, value = (
        rng.standard_normal((2, 9, 4)),
        rng.standard_normal((2, 11, 4)),
        rng.standard_normal((2, 11, 3)),
    )
    L, S = 9, 11
    _, lse = _attention_tiled_forward(
        query, key, value, causal=causal, block_q=4, block_k=3
    )
    assert lse.shape == (2, 9)
    scores = 0.5 * query @ np.swapaxes(key, -1, -2)  # t Q K^T with t = 1/sqrt(4)
    weights = attention_weights(query, key, causal=causal)
    visible = causal_mask(L, S) if causal else np.ones((L, S), dtype=bool)
    assert_close(
        np.where(visible, np.exp(scores - lse[..., None]), 0.0),
        weights,
        name="exp(scores - LSE)",
    )


def test_tiled_fully_masked_rows_have_zero_output_and_finite_lse(rng):
    query, key, value = (
        rng.standard_normal((1, 7, 4)),
        rng.standard_normal((1, 3, 4)),
        rng.standard_normal((1, 3, 4)),
    )
    output, lse = _attention_tiled_forward(
        query, key, value, causal=True, block_q=2, block_k=2
    )
    assert_close(
        output[:, :4], np.zeros((1, 4, 4)), rtol=0, atol=0, name="rows that see no key"
    )
    assert_close(lse[:, :4], np.zeros((1, 4)), rtol=0, atol=0, name="their LSE")


def test_tiled_never_reads_key_blocks_hidden_by_the_causal_mask(rng):
    query, key, value = (
        rng.standard_normal((1, 8, 4)),
        rng.standard_normal((1, 8, 4)),
        rng.standard_normal((1, 8, 4)),
    )
    expected = scaled_dot_product_attention_reference(query, key, value, causal=True)
    key[:, 4:], value[:, 4:] = np.nan, np.nan  # keys 4..7: hidden from queries 0..3
    output = attention_tiled(query, key, value, causal=True, block_q=4, block_k=4)
    assert_close(
        output[:, :4], expected[:, :4], name="query block 0 (key block 1 skipped)"
    )


def test_tiled_threads_give_identical_results(rng):
    query = rng.standard_normal((2, 3, 40, 8))
    key, value = rng.standard_normal((2, 1, 50, 8)), rng.standard_normal((2, 1, 50, 8))
    mask = rng.random((40, 50)) < 0.8
    one = attention_tiled(
        query, key, value, mask=mask, causal=True, block_q=7, block_k=9, num_threads=1
    )
    three = attention_tiled(
        query, key, value, mask=mask, causal=True, block_q=7, block_k=9, num_threads=3
    )
    assert_close(three, one, rtol=0, atol=0, name="3 threads vs 1")


@pytest.mark.parametrize("argument", ["block_q", "block_k", "num_threads"])
def test_tiled_rejects_bad_block_sizes(argument, rng):
    x = rng.standard_normal((1, 4, 2))
    with pytest.raises(ValueError, match=argument):
        attention_tiled(x, x, x, **{argument: 0})


@pytest.mark.parametrize(
    "n, num_threads, budget",
    [
        # a quarter of one 4096 x 4096 float32 matrix (64 MiB): two threads' scratch
        # with the cache-sized default blocks is 5.8-8.3 MiB at every n from 1024 to
        # 8192 (it depends on when each thread frees its tiles), 4.2 MiB on one thread
        (4096, 2, 16 * 2**20),
        # the bound; one 8192 x 8192 float32 matrix is 256 MiB
        (8192, None, 64 * 2**20),
    ],
    ids=["n4096-2threads", "n8192-default-threads"],
)
def test_tiled_peak_memory_holds_no_L_by_S_matrix(n, num_threads, budget, rng):
    query, key, value = (
        rng.standard_normal((1, n, 64), dtype=np.float32) for _ in range(3)
    )
    tracemalloc.start()
    try:
        output = attention_tiled(
            query, key, value, causal=True, num_threads=num_threads
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - output.nbytes
    assert output.dtype == np.float32
    assert extra < budget, (
        f"attention_tiled used {extra / 2**20:.1f} MiB beyond its output at n={n}"
    )
