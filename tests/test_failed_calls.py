"""Nothing lost on a failed call (issue 23): caches, windows, clear errors.

A call that raises leaves every cache it was given as it was; a window too wide for
32-bit index arithmetic means "no window"; an empty append changes nothing; bad
cache, latent and position arguments are a ``ValueError``/``TypeError`` naming them.
The property-based version of the first promise is ``tests/test_cache_errors.py``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from _backends import BACKENDS
from _backends import backend_module as _module

from companion.testing import as_backend, assert_close, to_numpy


def _state(cache):
    """Everything a KVCache shows: counters and the kept keys and values."""
    key = None if cache.key is None else to_numpy(cache.key).copy()
    value = None if cache.value is None else to_numpy(cache.value).copy()
    return cache.length, cache.seen, cache.capacity, key, value


def _assert_same_state(before, after):
    assert before[:3] == after[:3]
    for a, b in zip(before[3:], after[3:]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


# --- 1. a failed attention call leaves the cache as it was --------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("implementation", ["reference", "tiled"])
@pytest.mark.parametrize("max_length", [None, 4])
def test_bad_mask_leaves_the_cache_as_it_was(backend, implementation, max_length):
    m = _module(backend)
    import companion.numpy as cn

    p = cn.MultiHeadParams.random(8, 2, seed=0)
    x = as_backend(np.random.default_rng(0).standard_normal((1, 3, 8)), backend)
    cache = m.KVCache(max_length=max_length)
    m.multi_head_attention(x, x, p, cache=cache, causal=True)
    before = _state(cache)
    bad = as_backend(np.ones((5, 7), bool), backend)
    with pytest.raises(ValueError, match="mask"):
        m.multi_head_attention(
            x, x, p, cache=cache, causal=True, mask=bad, implementation=implementation
        )
    _assert_same_state(before, _state(cache))
    # a retry gives what a cache that never saw the failed call gives
    fresh = m.KVCache(max_length=max_length)
    m.multi_head_attention(x, x, p, cache=fresh, causal=True)
    retried = m.multi_head_attention(x, x, p, cache=cache, causal=True)
    expected = m.multi_head_attention(x, x, p, cache=fresh, causal=True)
    assert_close(to_numpy(retried), to_numpy(expected), rtol=0, atol=0)
    assert (cache.length, cache.seen) == (fresh.length, fresh.seen)


def test_torch_module_bad_mask_leaves_the_cache_as_it_was():
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    torch.manual_seed(0)
    layer = ct.MultiHeadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    cache = ct.KVCache()
    with torch.no_grad():
        layer(x, cache=cache, causal=True)
        before = _state(cache)
        with pytest.raises(ValueError, match="mask"):
            layer(x, cache=cache, causal=True, mask=torch.ones(5, 7, dtype=torch.bool))
    _assert_same_state(before, _state(cache))


def test_keras_layer_bad_mask_leaves_the_cache_as_it_was():
    pytest.importorskip("tensorflow")
    import companion.tensorflow as ctf

    layer = ctf.MultiHeadAttention(num_heads=2, key_dim=4)
    x = np.random.default_rng(1).standard_normal((1, 3, 8)).astype("float32")
    cache = ctf.KVCache()
    layer(x, x, cache=cache, use_causal_mask=True)
    before = _state(cache)
    with pytest.raises(ValueError, match="mask"):
        layer(x, x, cache=cache, attention_mask=np.ones((1, 5, 7), bool))
    _assert_same_state(before, _state(cache))


def _latent(backend):
    m = _module(backend)
    from companion.numpy import LatentAttentionParams

    params = LatentAttentionParams.random(16, 2, 4, 6, 4, 8, seed=0)
    return m, params


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_latent_wrong_absorbed_is_named_and_leaves_the_cache(backend):
    m, params = _latent(backend)
    x = as_backend(np.random.default_rng(2).standard_normal((1, 3, 16)), backend)
    cache = m.KVCache()
    m.latent_attention(x, params, cache=cache)
    before = _state(cache)
    uqk, uvo = params.absorbed()
    for folded in ((uvo, uqk), (uqk[:1], uvo)):
        with pytest.raises(ValueError, match="absorbed"):
            m.latent_attention(x, params, cache=cache, absorbed=folded)
        _assert_same_state(before, _state(cache))
    # the right tuple still works and equals the expanded form
    out = m.latent_attention(x, params, cache=m.KVCache(), absorbed=(uqk, uvo))
    assert_close(to_numpy(out), to_numpy(m.latent_attention(x, params)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("absorbed", [False, True])
def test_latent_zero_queries_and_zero_keys(backend, absorbed):
    m, params = _latent(backend)
    x = as_backend(np.random.default_rng(9).standard_normal((2, 3, 16)), backend)
    cache = m.KVCache()
    m.latent_attention(x, params, cache=cache, absorbed=absorbed)
    out = m.latent_attention(x[:, :0], params, cache=cache, absorbed=absorbed)
    assert tuple(out.shape) == (2, 0, 16) and cache.length == 3
    with pytest.raises(ValueError, match="x has no positions"):
        m.latent_attention(x[:, :0], params, cache=m.KVCache(), absorbed=absorbed)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("function", ["multi_head_attention", "latent_attention"])
def test_a_foreign_cache_is_refused_before_its_window_is_read(backend, function):
    # a rolling cache of another kind (max_length=2) with window=5 was reported as
    # a window wider than the cache, before the cache's kind was looked at
    import types

    m = _module(backend)
    import companion.numpy as cn

    foreign = types.SimpleNamespace(max_length=2, seen=0, length=0)
    x = as_backend(np.random.default_rng(10).standard_normal((1, 2, 16)), backend)
    with pytest.raises(TypeError, match="cache must be a companion"):
        if function == "multi_head_attention":
            p = cn.MultiHeadParams.random(16, 2, seed=0)
            m.multi_head_attention(x, x, p, cache=foreign, window=5)
        else:
            p = cn.LatentAttentionParams.random(16, 2, 4, 6, 4, 8, seed=0)
            m.latent_attention(x, p, cache=foreign, window=5)


# --- 2. windows beyond 32 bits ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [2**31, 2**32, sys.maxsize, 2**64])
def test_huge_windows_mean_no_window(backend, window):
    m = _module(backend)
    import companion.numpy as cn

    mask = to_numpy(m.causal_mask(3, 5, window=window))
    np.testing.assert_array_equal(mask, cn.causal_mask(3, 5))
    rng = np.random.default_rng(3)
    q, k, v = (as_backend(rng.standard_normal((1, 2, 3, 4)), backend) for _ in "qkv")
    for causal in (False, True):
        expected = cn.attention_weights(to_numpy(q), to_numpy(k), causal=causal)
        weights = m.attention_weights(q, k, causal=causal, window=window)
        assert_close(to_numpy(weights), expected)
        out = m.attention_tiled(q, k, v, causal=causal, window=window)
        reference = cn.scaled_dot_product_attention_reference(
            to_numpy(q), to_numpy(k), to_numpy(v), causal=causal
        )
        assert_close(to_numpy(out), reference)
    p = cn.MultiHeadParams.random(8, 2, seed=0)
    x = as_backend(rng.standard_normal((1, 3, 8)), backend)
    out = m.multi_head_attention(x, x, p, causal=True, window=window)
    expected = cn.multi_head_attention(to_numpy(x), to_numpy(x), p, causal=True)
    assert_close(to_numpy(out), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1.5, True, "2"])
def test_a_window_that_is_no_int_is_a_type_error_everywhere(backend, window):
    # multi_head_attention checked it as the cache does (ValueError for 1.5), the
    # kernels as a type (TypeError): one check now
    m = _module(backend)
    import companion.numpy as cn

    p = cn.MultiHeadParams.random(8, 2, seed=0)
    x = as_backend(np.ones((1, 3, 8)), backend)
    q = as_backend(np.ones((1, 2, 3, 4)), backend)
    for cache in (None, m.KVCache(), m.KVCache(max_length=4)):
        with pytest.raises(TypeError, match="window"):
            m.multi_head_attention(x, x, p, cache=cache, window=window)
    with pytest.raises(TypeError, match="window"):
        m.attention_weights(q, q, window=window)


# --- 3. empty appends -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_length", [None, 3])
def test_an_empty_append_changes_nothing(backend, max_length):
    m = _module(backend)
    rng = np.random.default_rng(4)
    keys = as_backend(rng.standard_normal((2, 1, 4, 3)), backend)
    cache = m.KVCache(max_length=max_length)
    cache.append(keys, keys)
    before = _state(cache)
    empty = keys[:, :, :0]
    cache.append(empty, empty)
    _assert_same_state(before, _state(cache))
    assert cache.length == (4 if max_length is None else 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_first_append_and_a_zero_length_call(backend):
    m = _module(backend)
    import companion.numpy as cn

    cache = m.KVCache()
    empty = as_backend(np.zeros((2, 1, 0, 3)), backend)
    key, value = cache.append(empty, empty)
    assert tuple(key.shape) == (2, 1, 0, 3) and (cache.length, cache.seen) == (0, 0)
    p = cn.MultiHeadParams.random(8, 2, seed=0)
    x = as_backend(np.zeros((1, 0, 8)), backend)
    cache = m.KVCache()
    # no key at all: refused by name, and the cache stays fresh
    with pytest.raises(ValueError, match="x_kv"):
        m.multi_head_attention(x, x, p, cache=cache, causal=True)
    assert (cache.length, cache.seen, cache.key) == (0, 0, None)
    # and decoding goes on from there
    y = as_backend(np.random.default_rng(5).standard_normal((1, 2, 8)), backend)
    out = m.multi_head_attention(y, y, p, cache=cache, causal=True)
    expected = cn.multi_head_attention(to_numpy(y), to_numpy(y), p, causal=True)
    assert_close(to_numpy(out), expected)


def test_torch_module_names_key_when_there_is_no_key():
    # the module's argument is key (the function's is x_kv)
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    layer = ct.MultiHeadAttention(8, 2)
    x = torch.ones(1, 3, 8)
    for cache in (None, ct.KVCache()):
        with pytest.raises(ValueError, match="^key has no positions"):
            layer(x, x[:, :0], cache=cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_max_length_reserves_only_what_is_used(backend):
    m = _module(backend)
    cache = m.KVCache(max_length=2**36)
    rng = np.random.default_rng(6)
    keys = as_backend(rng.standard_normal((1, 1, 40, 2)), backend)
    for t in range(40):
        cache.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
        # doubling: never more than twice the positions kept (or the minimum)
        assert cache.capacity <= max(2 * cache.length, cache.MIN_CAPACITY)
    np.testing.assert_array_equal(to_numpy(cache.key), to_numpy(keys))


# --- clear errors: paged caches ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["nodtype", "int32", "bool"])
def test_paged_cache_refuses_non_float_dtypes(backend, dtype):
    m = _module(backend)
    with pytest.raises(TypeError, match="dtype"):
        m.PagedKVCache(4, 2, 1, 2, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_free_refuses_a_bool(backend):
    m = _module(backend)
    cache = m.PagedKVCache(4, 2, 1, 2)
    first, second = cache.new_sequence(), cache.new_sequence()
    for seq in (True, False):
        with pytest.raises(TypeError, match="sequence id"):
            cache.free(seq)
    assert cache.sequences == (first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_with_no_queries(backend):
    m = _module(backend)
    cache = m.PagedKVCache(4, 2, 1, 2, dtype="float64")
    seq = cache.new_sequence()
    keys = as_backend(np.ones((1, 3, 2)), backend)
    cache.append(seq, keys, keys)
    query = as_backend(np.ones((1, 2, 0, 2)), backend)
    assert tuple(m.paged_attention(query, cache, [seq]).shape) == (1, 2, 0, 2)


# --- clear errors: latent parameters -----------------------------------------------


def _latent_weights():
    from companion.numpy import LatentAttentionParams

    p = LatentAttentionParams.random(16, 2, 4, 6, 4, 8, seed=0)
    names = ("w_dq", "w_uq", "w_qr", "w_dkv", "w_uk", "w_uv", "w_kr", "w_o")
    return LatentAttentionParams, {n: getattr(p, n) for n in names}, p


@pytest.mark.parametrize(
    "w_dq",
    [np.ones(16), np.ones((16, 8, 1)), np.ones((1, 16, 8))],
    ids=["1-D", "3-D", "3-D-leading-1"],
)
def test_latent_w_dq_of_the_wrong_rank_is_blamed(w_dq):
    cls, weights, _ = _latent_weights()
    weights["w_dq"] = w_dq
    with pytest.raises(ValueError, match="w_dq"):
        cls(**weights, num_heads=2)


def test_latent_params_accept_nested_lists():
    import companion.numpy as cn

    cls, weights, p = _latent_weights()
    listed = cls(**{n: w.tolist() for n, w in weights.items()}, num_heads=2)
    x = np.random.default_rng(7).standard_normal((1, 3, 16))
    assert_close(cn.latent_attention(x, listed), cn.latent_attention(x, p))
    weights["w_uk"] = [[1.0, 2.0], [3.0]]  # ragged
    with pytest.raises((TypeError, ValueError), match="w_uk"):
        cls(**weights, num_heads=2)


# --- clear errors: positions -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_string_base_is_refused(backend):
    m = _module(backend)
    x = as_backend(np.ones((2, 4)), backend)
    with pytest.raises(TypeError, match="base"):
        m.rotary_embedding(x, [0, 1], base="10000")
    with pytest.raises(TypeError, match="base"):
        m.sinusoidal_positions(2, 4, base="10000")


def test_rotary_config_refuses_an_odd_rotary_dim_at_construction():
    from companion.numpy import RotaryConfig

    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryConfig(rotary_dim=3)
    assert RotaryConfig(interleaved=np.bool_(True)).interleaved is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_bools_for_interleaved_alike(backend):
    m = _module(backend)
    import companion.numpy as cn

    data = np.random.default_rng(8).standard_normal((3, 4))
    x = as_backend(data, backend)
    for flag in (True, False):
        out = m.rotary_embedding(x, [0, 1, 2], interleaved=np.bool_(flag))
        expected = cn.rotary_embedding(data, [0, 1, 2], interleaved=flag)
        assert_close(to_numpy(out), expected)
    with pytest.raises(TypeError, match="interleaved"):
        m.rotary_embedding(x, [0, 1, 2], interleaved=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_bools_for_flags_alike(backend):
    # one flag check below the backends: torch refused causal=np.True_, numpy and
    # TensorFlow took it
    m = _module(backend)
    import companion.numpy as cn

    p = cn.MultiHeadParams.random(8, 2, seed=0)
    data = np.random.default_rng(11).standard_normal((1, 3, 8))
    x = as_backend(data, backend)
    out = m.multi_head_attention(x, x, p, causal=np.bool_(True))
    expected = cn.multi_head_attention(data, data, p, causal=True)
    assert_close(to_numpy(out), expected)
    with pytest.raises(TypeError, match="causal"):
        m.multi_head_attention(x, x, p, causal=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", [[0, 2**63], [0, 2**64], [-(2**63) - 1, 0]])
def test_positions_beyond_int64_are_named(backend, positions):
    m = _module(backend)
    x = as_backend(np.ones((2, 4)), backend)
    with pytest.raises(ValueError, match="positions"):
        m.rotary_embedding(x, positions)
