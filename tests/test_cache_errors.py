"""Property: a call that raises leaves every cache it was given exactly as it was.

Issue 23. Hypothesis drives random sequences of valid and invalid calls on each cache
kind (``KVCache``, rolling ``KVCache(max_length=W)``, ``PagedKVCache``) in each
backend (numpy, torch, TensorFlow): appends, multi-head and latent attention through
the cache, paged appends, forks, frees and paged attention, with wrong shapes, dtypes,
masks, windows, flags and sequence ids mixed in. After every call that raises, the
whole state (kept keys and values, length, seen, capacity; every block table, length,
reference count, the free list and the pool's storage) must equal the state before,
and the error must be a ``ValueError``/``TypeError`` (``KeyError`` for an unknown
sequence, ``PoolExhaustedError`` for a full pool), never a bare ``IndexError`` or
``AttributeError``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import BACKENDS
from _backends import backend_module as _module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from companion.testing import as_backend, to_numpy

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
E, H, D = 8, 2, 4  # embedding width, query heads, head width


def _expected_errors(module):
    return (ValueError, TypeError, KeyError, module.PoolExhaustedError)


# --- KVCache, full and rolling ------------------------------------------------------


def _kv_state(cache):
    key = None if cache.key is None else to_numpy(cache.key).copy()
    value = None if cache.value is None else to_numpy(cache.value).copy()
    return (cache.length, cache.seen, cache.capacity, cache.max_length), key, value


def _assert_kv_same(before, after, call):
    assert before[0] == after[0], f"{call} failed but changed {before[0]} -> {after[0]}"
    for a, b in zip(before[1:], after[1:]):
        assert (a is None) == (b is None), call
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=call)


def _array(data, shape, backend, dtype="float64"):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = rng.standard_normal(shape)
    if dtype == "int32":
        return as_backend(x.astype("int32"), backend)
    return as_backend(x, backend, dtype)


# One fault at a time (or none), so that every call that passes the checks made
# before the append and fails after it (a mask that does not fit the cached
# positions) is drawn often: with every argument free to be wrong at once, almost
# every broken call was refused before the cache changed.
MHA_FAULTS = [
    *(None, None, "mask", "mask"),
    *("width", "dtype", "causal", "implementation", "window", "rope", "tiled weights"),
]


def _draw_mha_call(data, module, backend, cache, params, B):
    """A multi_head_attention call through ``cache``: valid or broken on purpose."""
    fault = data.draw(st.sampled_from(MHA_FAULTS), label="fault")
    L = data.draw(st.integers(0, 4), label="L")
    width = E + 1 if fault == "width" else E
    x = _array(data, (B, L, width), backend, "int32" if fault == "dtype" else "float64")
    if cache.max_length is None:
        S = cache.length + L
        windows = [None, None, 1, 2, 3, 10**6, 2**40]  # the last two: no window
        too_wide = [0]
    else:
        S = min(cache.length, cache.max_length - 1) + L
        windows = [None, None, 1, 2, 3]
        too_wide = [0, 10**6, 2**40]  # wider than the rolling cache (or 0)
    masks = [(L, S + 1), (5, 7)] if fault == "mask" else [None, None, (L, S), (S,)]
    mask_shape = data.draw(st.sampled_from(masks), label="mask")
    mask = (
        None
        if mask_shape is None
        else as_backend(np.random.default_rng(S).random(mask_shape) < 0.8, backend)
    )
    implementation = data.draw(
        st.sampled_from(["auto", "reference", "tiled"]), label="impl"
    )
    # the tiled kernel forms no weights: asking it for them is the fault below
    weights = data.draw(st.booleans(), label="weights") and implementation != "tiled"
    kwargs = dict(
        mask=mask,
        causal="yes" if fault == "causal" else data.draw(st.booleans(), "causal"),
        implementation="bogus" if fault == "implementation" else implementation,
        window=data.draw(
            st.sampled_from(too_wide if fault == "window" else windows), "window"
        ),
        rope="x" if fault == "rope" else data.draw(st.sampled_from([None, True])),
        return_weights=weights,
    )
    if fault == "tiled weights":
        kwargs.update(implementation="tiled", return_weights=True)
    call = f"multi_head_attention(x {tuple(x.shape)}, {kwargs})"
    return call, lambda: module.multi_head_attention(
        x, x, params, cache=cache, **kwargs
    )


def _draw_append_call(data, backend, cache, B, H_kv):
    S = data.draw(st.integers(0, 5), label="S_new")
    shape_k = data.draw(
        st.sampled_from(
            [(B, H_kv, S, D)] * 4
            + [(B, H_kv, S, D + 1), (B + 1, H_kv, S, D), (H_kv, S, D)]
        ),
        label="key shape",
    )
    shape_v = data.draw(
        st.sampled_from([shape_k] * 4 + [(B, H_kv, S + 1, D)]), label="value shape"
    )
    dtype = data.draw(st.sampled_from(["float64"] * 4 + ["float32", "int32"]))
    key = _array(data, shape_k, backend, dtype)
    value = _array(data, shape_v, backend, "float64")
    call = f"append(key {shape_k} {dtype}, value {shape_v})"
    return call, lambda: cache.append(key, value)


def _draw_latent_call(data, module, backend, cache, params, B):
    L = data.draw(st.integers(0, 3), label="L")
    x = _array(data, (B, L, 16), backend)
    uqk, uvo = params.absorbed()
    absorbed = data.draw(
        st.sampled_from([False, True, (uqk, uvo), (uvo, uqk), (uqk[:1], uvo), "no"]),
        label="absorbed",
    )
    window = data.draw(st.sampled_from([None, 2, 0, 2**40]), label="window")
    causal = data.draw(st.sampled_from([True, False, 2]), label="causal")
    call = f"latent_attention(L={L}, absorbed={type(absorbed).__name__}, {window=})"
    return call, lambda: module.latent_attention(
        x, params, cache=cache, absorbed=absorbed, window=window, causal=causal
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_length", [None, 3], ids=["full", "rolling"])
@SETTINGS
@given(data=st.data())
def test_a_failed_call_leaves_a_kv_cache_as_it_was(backend, max_length, data):
    module = _module(backend)
    import companion.numpy as cn

    H_kv = data.draw(st.sampled_from([1, 2]), label="H_kv")
    B = data.draw(st.sampled_from([1, 2]), label="B")
    params = cn.MultiHeadParams.random(E, H, H_kv, seed=0)
    latent = cn.LatentAttentionParams.random(16, 2, 4, 6, 4, seed=0)
    cache = module.KVCache(max_length=max_length)
    latent_cache = module.KVCache(max_length=max_length)
    kinds = ["mha", "mha", "append"] + (["latent"] if backend != "tensorflow" else [])
    for _ in range(data.draw(st.integers(1, 6), label="calls")):
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "mha":
            call, run = _draw_mha_call(data, module, backend, cache, params, B)
        elif kind == "append":
            call, run = _draw_append_call(data, backend, cache, B, H_kv)
        else:
            call, run = _draw_latent_call(
                data, module, backend, latent_cache, latent, B
            )
        before = (_kv_state(cache), _kv_state(latent_cache))
        try:
            run()
        except _expected_errors(module):
            after = (_kv_state(cache), _kv_state(latent_cache))
            _assert_kv_same(before[0], after[0], call)
            _assert_kv_same(before[1], after[1], call)


# --- PagedKVCache -------------------------------------------------------------------


def _paged_state(cache):
    sequences = cache.sequences
    return (
        sequences,
        {s: cache.block_table(s) for s in sequences},
        {s: cache.length(s) for s in sequences},
        list(cache.pool._refcount),
        sorted(cache.pool._free),
        cache._next_id,
        to_numpy(cache._key).copy(),
        to_numpy(cache._value).copy(),
    )


def _assert_paged_same(before, after, call):
    names = ("ids", "tables", "lengths", "refs", "free list", "next id")
    for a, b, what in zip(before[:6], after[:6], names, strict=True):
        assert a == b, f"{call} failed but changed the {what}: {a} -> {b}"
    for a, b in zip(before[6:], after[6:]):
        np.testing.assert_array_equal(a, b, err_msg=call)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_a_failed_call_leaves_a_paged_cache_as_it_was(backend, data):
    module = _module(backend)
    H_kv = 1
    cache = module.PagedKVCache(6, 2, H_kv, D, dtype="float64", max_blocks=4)
    cache.new_sequence()
    for _ in range(data.draw(st.integers(1, 10), label="calls")):
        live = list(cache.sequences)
        seq = data.draw(
            st.sampled_from(live + [99, True, -1, "a", 1.0] if live else [99, True]),
            label="seq",
        )
        kind = data.draw(
            st.sampled_from(["append", "append", "fork", "free", "new", "attend"]),
            label="kind",
        )
        if kind == "append":
            S = data.draw(st.integers(0, 5), label="S_new")
            shape = data.draw(
                st.sampled_from([(H_kv, S, D)] * 4 + [(H_kv, S, D + 1), (S, D)]),
                label="shape",
            )
            dtype = data.draw(st.sampled_from(["float64"] * 3 + ["float32", "int32"]))
            key = _array(data, shape, backend, dtype)
            call = f"append({seq!r}, {shape}, {dtype})"

            def run(seq=seq, key=key):
                return cache.append(seq, key, key)

        elif kind == "fork":
            call, run = f"fork({seq!r})", lambda seq=seq: cache.fork(seq)
        elif kind == "free":
            call, run = f"free({seq!r})", lambda seq=seq: cache.free(seq)
        elif kind == "new":
            call, run = "new_sequence()", cache.new_sequence
        else:
            L = data.draw(st.integers(0, 2), label="L")
            width = data.draw(st.sampled_from([D, D, D + 1]), label="D")
            query = _array(data, (1, 2, L, width), backend)
            window = data.draw(st.sampled_from([None, 1, 0]), label="window")
            call = f"paged_attention([{seq!r}], L={L}, D={width}, {window=})"

            def run(seq=seq, query=query, window=window):
                return module.paged_attention(
                    query, cache, [seq], causal=True, window=window
                )

        before = _paged_state(cache)
        try:
            run()
        except _expected_errors(module):
            _assert_paged_same(before, _paged_state(cache), call)
