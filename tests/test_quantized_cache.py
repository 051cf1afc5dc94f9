"""Quantised KV caches (issue 26): int8 per token, int4 per group, KIVI's layout.

Each number comes back within half a quantisation step of the group's own range;
decoding through ``multi_head_attention`` with a quantised cache equals the float64
reference attention over the dequantised keys and values; the bytes held equal the
formula (codes, scales, zero points and the full-precision residual); numpy, torch and
TensorFlow store the same codes; bad arguments are a ``ValueError`` naming them, and
neither inputs nor (after a failed append) the cache change.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion import _quantized_cache as qc
from companion import registry
from companion.testing import as_backend, assert_close, to_numpy

CONFIGS = {
    "int8-token": dict(bits=8),
    "int8-asym": dict(bits=8, symmetric=False),
    "int4-g4": dict(bits=4, group_size=4),
    "int4-g4-sym": dict(bits=4, group_size=4, symmetric=True),
    "int2-g8-r3": dict(bits=2, group_size=8, residual=3),
    "kivi2-g4-r5": dict(bits=2, group_size=4, residual=5, keys="channel"),
    "kivi4-g4-r0": dict(bits=4, group_size=4, residual=0, keys="channel"),
}


def _make(backend, config):
    return registry.namespace(backend).QuantizedKVCache(**config)


def _kv(seed=0, B=2, H=3, S=13, D=8, D_v=16):
    rng = np.random.default_rng(seed)
    key = rng.standard_normal((B, H, S, D)) * np.linspace(0.5, 4, D)  # wide channels
    value = rng.standard_normal((B, H, S, D_v)) + 1.5  # off centre
    return key, value


def _bound(x, bits, group, layout, symmetric):
    """Half a step of each number's own group, from the formula (float64)."""
    B, H, S, D = x.shape
    if layout == "token":
        g = x.reshape(B, H, S, D // group, group)
        axis, shape = 4, g.shape
    else:
        g = x.reshape(B, H, S // group, group, D)
        axis, shape = 3, g.shape
    lo, hi = qc.levels(bits, symmetric)
    if symmetric:
        step = np.abs(g).max(axis=axis, keepdims=True) / hi
    else:
        step = (g.max(axis=axis, keepdims=True) - g.min(axis=axis, keepdims=True)) / hi
    return np.broadcast_to(step / 2, shape).reshape(x.shape)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_within_half_a_step(backend, name):
    config = CONFIGS[name]
    key, value = _kv()
    S = 12  # a multiple of every group along positions
    cache = _make(backend, {**config, "residual": 0})
    G = config.get("group_size")
    k_layout = config.get("keys", "token")
    symmetric = config.get("symmetric", config["bits"] == 8)
    for x, layout in ((key[:, :, :S], k_layout), (value[:, :, :S], "token")):
        part = cache.quantize(as_backend(x, backend), layout)
        back = to_numpy(cache.dequantize(part, layout))
        group = G if G is not None else x.shape[-1]
        bound = _bound(x, config["bits"], group, layout, symmetric)
        error = np.abs(back - x)
        assert np.all(error <= bound * (1 + 1e-12) + 1e-15), (error - bound).max()
        # and the bound is not slack: some number is off by more than a tenth of it
        assert np.any(error > bound / 10)
        codes = to_numpy(part[0])
        assert codes.dtype == np.uint8
        assert codes.shape == (*x.shape[:3], x.shape[3] * config["bits"] // 8)


def test_constant_groups_are_exact_and_never_nan():
    from companion.numpy import QuantizedKVCache

    x = np.full((1, 1, 4, 8), 3.25)
    x[0, 0, 1] = 0.0
    for symmetric in (True, False):
        cache = QuantizedKVCache(4, 4, symmetric=symmetric)
        assert np.array_equal(cache.dequantize(cache.quantize(x, "token"), "token"), x)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_equals_attention_over_the_dequantised_cache(backend, name):
    """Token by token through ``multi_head_attention`` (after a 3-token prefill), with
    RoPE: every step equals the float64 reference over the cache's dequantised keys
    and values, and those are within half a step of the true rotated keys."""
    mod, ref = registry.namespace(backend), registry.namespace("numpy")
    config = CONFIGS[name]
    E, H, H_kv, n = 32, 4, 2, 11
    params = ref.MultiHeadParams.random(E, H, H_kv, seed=3)
    x = np.random.default_rng(1).standard_normal((2, n, E))
    cache = _make(backend, config)
    # the true projections, rotated at their absolute positions
    D = E // H
    q = x @ params.w_q + params.b_q
    k = x @ params.w_k + params.b_k
    v = x @ params.w_v + params.b_v
    q = q.reshape(2, n, H, D).transpose(0, 2, 1, 3)
    k = k.reshape(2, n, H_kv, D).transpose(0, 2, 1, 3)
    v = v.reshape(2, n, H_kv, D).transpose(0, 2, 1, 3)
    q, k = ref.rotary_embedding(q, np.arange(n)), ref.rotary_embedding(k, np.arange(n))
    steps = [(0, 3)] + [(t, t + 1) for t in range(3, n)]
    for start, stop in steps:
        chunk = as_backend(x[:, start:stop], backend)
        out = mod.multi_head_attention(
            chunk, chunk, params, causal=True, cache=cache, rope=True
        )
        k_hat, v_hat = to_numpy(cache.key), to_numpy(cache.value)
        assert k_hat.shape == (2, H_kv, stop, D) == v_hat.shape
        heads = ref.scaled_dot_product_attention_reference(
            q[:, :, start:stop], k_hat, v_hat, causal=True
        )  # (B, H, L, D)
        merged = heads.transpose(0, 2, 1, 3).reshape(2, stop - start, H * D)
        expected = merged @ params.w_o + params.b_o
        assert_close(to_numpy(out), expected, rtol=1e-10, atol=1e-12, name=name)
    # the last `residual` positions are exact, the rest are not
    R = config.get("residual", 0)
    qk, qv = cache.quantized_length
    assert qv == n - R
    assert_close(v_hat[:, :, qv:], v[:, :, qv:], rtol=1e-12, atol=1e-13)
    assert_close(k_hat[:, :, qk:], k[:, :, qk:], rtol=1e-12, atol=1e-13)
    assert not np.allclose(k_hat[:, :, :qk], k[:, :, :qk], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunking_does_not_change_the_cache(name):
    """Quantisation depends only on the number of positions: appending one at a time,
    in uneven chunks or all at once gives the same dequantised keys and values."""
    from companion.numpy import QuantizedKVCache

    key, value = _kv(seed=2)
    results = []
    for cuts in ([13], list(range(1, 14)), [2, 7, 8, 13]):
        cache, start = QuantizedKVCache(**CONFIGS[name]), 0
        for stop in cuts:
            cache.append(key[:, :, start:stop], value[:, :, start:stop])
            start = stop
        results.append(cache.dequantized())
    for k_hat, v_hat in results[1:]:
        assert np.array_equal(k_hat, results[0][0])
        assert np.array_equal(v_hat, results[0][1])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bytes_held_equal_the_formula(name, dtype):
    from companion.numpy import QuantizedKVCache

    config = CONFIGS[name]
    key, value = (x.astype(dtype) for x in _kv())
    cache = QuantizedKVCache(**config)
    for t in range(13):
        cache.append(key[:, :, t : t + 1], value[:, :, t : t + 1])
        expected = qc.cache_nbytes(
            t + 1,
            batch=2,
            kv_heads=3,
            key_dim=8,
            value_dim=16,
            bits=config["bits"],
            group_size=config.get("group_size"),
            residual=config.get("residual", 0),
            keys=config.get("keys", "token"),
            symmetric=cache.symmetric,
            itemsize=np.dtype(dtype).itemsize,
        )
        assert cache.nbytes == expected, t


def test_bytes_per_token_by_hand():
    """One head, D = 128, 16-bit scales: int8 per token 128 + 2 bytes; int4 in groups
    of 32: 64 + 4 groups x (scale + zero) x 2 = 80; 2 bits in groups of 32: 32 + 16 =
    48, 3 bits per number (KIVI-2's count)."""
    per = qc.bytes_per_token
    assert per(128, bits=8, group_size=None, symmetric=True, itemsize=2) == 130
    assert per(128, bits=4, group_size=32, symmetric=False, itemsize=2) == 80
    assert per(128, bits=2, group_size=32, symmetric=False, itemsize=2) == 48
    assert 48 * 8 / 128 == 3
    # a long KIVI cache approaches it: 4096 positions, residual 128, D = 128, float16
    n = qc.cache_nbytes(
        4096, batch=1, kv_heads=1, key_dim=128, value_dim=128, bits=2,
        group_size=32, residual=128, keys="channel", symmetric=False, itemsize=2,
    )  # fmt: skip
    assert n == 2 * ((4096 - 128) * 48 + 128 * 256)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_backends_store_what_numpy_stores(backend, name):
    key, value = _kv(seed=4)
    ours, oracle = _make(backend, CONFIGS[name]), _make("numpy", CONFIGS[name])
    for start, stop in [(0, 5), (5, 6), (6, 13)]:
        for cache, convert in ((ours, backend), (oracle, "numpy")):
            cache.append(
                as_backend(key[:, :, start:stop], convert),
                as_backend(value[:, :, start:stop], convert),
            )
        stored = [
            (a, b)
            for x, y in ((ours._qkey, oracle._qkey), (ours._qvalue, oracle._qvalue))
            for a, b in zip(x or (None,) * 3, y or (None,) * 3)
        ]
        for a, b in stored:
            if b is None:
                assert a is None
            elif b.dtype == np.uint8:
                assert np.array_equal(to_numpy(a), b)
            else:
                assert_close(to_numpy(a), b, rtol=1e-14, atol=0)
        assert ours.nbytes == oracle.nbytes
        assert_close(to_numpy(ours.key), oracle.key, rtol=1e-14, atol=1e-15)
        assert_close(to_numpy(ours.value), oracle.value, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_stays_float32(backend):
    key, value = (as_backend(x, backend, "float32") for x in _kv())
    cache = registry.namespace(backend).KIVICache(4, 4, 2)
    k_hat, v_hat = cache.append(key, value)
    assert str(k_hat.dtype).endswith("float32") and str(v_hat.dtype).endswith("float32")


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(bits=3), "bits"),
        (dict(bits=16), "bits"),
        (dict(bits=True), "bits"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, group_size=2.0), "group_size"),
        (dict(bits=8, residual=-1), "residual"),
        (dict(bits=8, keys="head"), "keys"),
        (dict(bits=8, keys="channel"), "group_size"),
        (dict(bits=8, symmetric="yes"), "symmetric"),
    ],
)
@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_bad_arguments_name_themselves(backend, kwargs, argument):
    error = TypeError if argument == "symmetric" else ValueError
    with pytest.raises(error, match=argument):
        _make(backend, kwargs)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize(
    "config, shapes, argument",
    [
        (dict(bits=4, group_size=3), (8, 8), "group_size"),  # 3 does not divide 8
        (dict(bits=4, group_size=4), (8, 6), "group_size"),  # nor 4 the value's 6
        (dict(bits=4, group_size=2, keys="channel"), (6, 8), None),  # keys: positions
        (dict(bits=4), (7, 8), "key"),  # 7 numbers of 4 bits: not whole bytes
        (dict(bits=2, group_size=2), (8, 6), "value"),
    ],
)
def test_head_dimensions_checked_on_append(backend, config, shapes, argument):
    key, value = _kv(D=shapes[0], D_v=shapes[1])
    cache = _make(backend, config)
    k, v = as_backend(key, backend), as_backend(value, backend)
    if argument is None:
        cache.append(k, v)
        return
    with pytest.raises(ValueError, match=argument):
        cache.append(k, v)
    assert cache.length == 0 and cache.nbytes == 0 and cache.key is None


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_failed_append_changes_nothing_and_inputs_are_never_modified(backend):
    key, value = _kv()
    saved = key.copy(), value.copy()
    k, v = as_backend(key, backend), as_backend(value, backend)
    cache = _make(backend, CONFIGS["kivi2-g4-r5"])
    cache.append(k[:, :, :9], v[:, :, :9])
    before = cache._state(), cache.nbytes, to_numpy(cache.key)
    with pytest.raises(ValueError, match="value"):
        cache.append(k[:, :, 9:], v[:, :1, 9:])  # H_kv differs
    with pytest.raises(ValueError, match="cache"):
        cache.append(k[:, :, 9:, :4], v[:, :, 9:])  # D differs from the cache's
    assert cache._state() == before[0] and cache.nbytes == before[1]
    assert np.array_equal(to_numpy(cache.key), before[2])
    cache.append(k[:, :, 9:], v[:, :, 9:])
    assert np.array_equal(to_numpy(k), saved[0]) and np.array_equal(key, saved[0])
    assert np.array_equal(to_numpy(v), saved[1]) and np.array_equal(value, saved[1])


def test_kivi_defaults_and_layout():
    from companion.numpy import KIVICache

    cache = KIVICache()
    assert (cache.bits, cache.group_size, cache.residual) == (2, 32, 128)
    assert cache.layout == ("channel", "token") and not cache.symmetric
    # of 200 positions, 72 values and the 64 keys of two whole groups are quantised
    assert qc.quantized_counts(200, residual=128, group_size=32, keys="channel") == (
        64,
        72,
    )


def test_the_multi_head_layer_and_the_gpt_take_it():
    torch = pytest.importorskip("torch")
    from companion.torch import KIVICache, QuantizedKVCache
    from companion.torch.gpt import GPT

    torch.manual_seed(0)
    model = GPT(50, 24, embed_dim=16, num_heads=2, num_layers=2).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(ids)
        for make in (lambda: QuantizedKVCache(8), lambda: KIVICache(2, 4, 4)):
            caches = [make() for _ in range(2)]
            steps = [model(ids[:, t : t + 1], caches=caches) for t in range(20)]
            logits = torch.cat(steps, dim=1)
            error = (logits - full).abs().max().item()
            assert 0 < error < 0.5  # quantised, so not equal, but close
