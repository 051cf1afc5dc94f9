"""Paged KV caches (numpy, torch, TF): shared prefixes, copy on write, clear errors.

Decoding several continuations of one prompt through a paged cache equals attention
over each sequence's own keys (the float64 numpy oracle); the memory saved by sharing
is counted exactly; bad use raises and changes nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import BACKENDS, backend_module

from companion.numpy import scaled_dot_product_attention_reference as oracle
from companion.testing import as_backend, assert_close, to_numpy


def _module(backend: str):
    return backend_module(backend, "paged")


def _snapshot(cache):
    """Everything observable about a cache: a failed call must change none of it."""
    return (
        {seq: cache.block_table(seq) for seq in cache.sequences},
        {seq: cache.length(seq) for seq in cache.sequences},
        cache.pool.num_free,
        to_numpy(cache._key).copy(),
        to_numpy(cache._value).copy(),
    )


def _assert_unchanged(cache, before):
    after = _snapshot(cache)
    assert after[:3] == before[:3]
    np.testing.assert_array_equal(after[3], before[3])
    np.testing.assert_array_equal(after[4], before[4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (3, 1)])
@pytest.mark.parametrize(
    "causal, window", [(True, None), (True, 3), (False, None), (False, 2)]
)
def test_shared_prompt_decoding_equals_each_alone(
    backend, block_size, H, H_kv, causal, window
):
    module = _module(backend)
    rng = np.random.default_rng(block_size + 10 * H_kv)
    D, D_v, prompt, steps, forks = 5, 3, 11, 6, 3
    cache = module.PagedKVCache(64, block_size, H_kv, D, D_v, dtype="float64")
    keys = rng.normal(size=(forks, H_kv, prompt + steps, D))
    values = rng.normal(size=(forks, H_kv, prompt + steps, D_v))
    keys[:, :, :prompt] = keys[0, :, :prompt]  # one prompt, three continuations
    values[:, :, :prompt] = values[0, :, :prompt]
    first = cache.new_sequence()
    cache.append(
        first,
        as_backend(keys[0, :, :prompt], backend),
        as_backend(values[0, :, :prompt], backend),
    )
    seqs = [first] + [cache.fork(first) for _ in range(forks - 1)]
    for t in range(prompt, prompt + steps):
        for b, seq in enumerate(seqs):
            cache.append(
                seq,
                as_backend(keys[b, :, t : t + 1], backend),
                as_backend(values[b, :, t : t + 1], backend),
            )
        query = rng.normal(size=(forks, H, 1, D))  # (B, H, 1, D)
        out = module.paged_attention(
            as_backend(query, backend), cache, seqs, causal=causal, window=window
        )
        S = t + 1
        j = np.arange(S)
        visible = j > S - 1 - window if window is not None else np.ones(S, bool)
        for b in range(forks):
            expected = oracle(
                query[b],
                keys[b, :, :S],
                values[b, :, :S],
                mask=visible[None, None, :],
                causal=causal,
            )
            assert_close(out[b], expected, name=f"sequence {b} step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [1, 4, 13])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_prefill_many_queries_matches_the_oracle(backend, L, window):
    module = _module(backend)
    rng = np.random.default_rng(L)
    cache = module.PagedKVCache(32, 4, 2, 6, dtype="float64")
    lengths = [13, 7, 20]
    seqs, kv = [], []
    for S in lengths:
        k, v = rng.normal(size=(2, S, 6)), rng.normal(size=(2, S, 6))
        seq = cache.new_sequence()
        cache.append(seq, as_backend(k, backend), as_backend(v, backend))
        seqs.append(seq)
        kv.append((k, v))
    query = rng.normal(size=(3, 4, L, 6))
    out = module.paged_attention(
        as_backend(query, backend), cache, seqs, causal=True, window=window
    )
    for b, (k, v) in enumerate(kv):
        S = lengths[b]
        p = np.arange(L)[:, None] + S - L
        j = np.arange(S)[None, :]
        keep = (j > p - window) if window is not None else np.ones((L, S), bool)
        expected = oracle(query[b], k, v, mask=keep, causal=True)
        assert_close(out[b], expected, name=f"sequence {b}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_low_precision_against_the_float64_oracle(dtype):
    from companion.numpy.paged import PagedKVCache, paged_attention

    rng = np.random.default_rng(3)
    k, v = rng.normal(size=(2, 30, 8)), rng.normal(size=(2, 30, 8))
    q = rng.normal(size=(1, 2, 3, 8))
    cache = PagedKVCache(16, 8, 2, 8, dtype=dtype)
    seq = cache.new_sequence()
    cache.append(seq, k.astype(dtype), v.astype(dtype))
    out = paged_attention(q.astype(dtype), cache, [seq], causal=True)
    assert out.dtype == np.dtype(dtype)
    expected = oracle(
        q[0].astype(dtype).astype(np.float64),
        k.astype(dtype).astype(np.float64),
        v.astype(dtype).astype(np.float64),
        causal=True,
    )
    assert_close(out[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt, new, size", [(10, 3, 4), (12, 5, 4), (7, 1, 16)])
@pytest.mark.parametrize("forks", [1, 2, 5])
def test_memory_saved_is_counted_exactly(backend, prompt, new, size, forks):
    module = _module(backend)
    rng = np.random.default_rng(0)
    H_kv, D = 2, 4
    cache = module.PagedKVCache(128, size, H_kv, D, dtype="float32")
    seq = cache.new_sequence()
    cache.append(
        seq,
        *(
            as_backend(rng.normal(size=(H_kv, prompt, D)), backend, "float32")
            for _ in range(2)
        ),
    )
    seqs = [seq] + [cache.fork(seq) for _ in range(forks - 1)]
    assert cache.blocks_in_use == math.ceil(prompt / size)  # forking copies nothing
    for s in seqs:
        kv = as_backend(rng.normal(size=(H_kv, new, D)), backend, "float32")
        cache.append(s, kv, kv)
    full_shared = prompt // size  # full prompt blocks stay shared
    private = math.ceil((prompt + new) / size) - full_shared  # per sequence
    assert cache.blocks_in_use == full_shared + forks * private
    assert cache.blocks_unshared == forks * math.ceil((prompt + new) / size)
    bytes_per_block = 4 * H_kv * (D + D) * size  # float32 keys and values
    assert cache.bytes_per_block == bytes_per_block
    assert cache.nbytes_saved == (forks - 1) * full_shared * bytes_per_block
    assert cache.nbytes_in_use == cache.blocks_in_use * bytes_per_block
    for s in seqs:
        cache.free(s)
    assert cache.pool.num_free == 128 and cache.blocks_in_use == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_on_write_leaves_the_sibling_unchanged(backend):
    module = _module(backend)
    rng = np.random.default_rng(1)
    cache = module.PagedKVCache(16, 4, 1, 3, dtype="float64")
    k, v = rng.normal(size=(1, 6, 3)), rng.normal(size=(1, 6, 3))
    parent = cache.new_sequence()
    cache.append(parent, as_backend(k, backend), as_backend(v, backend))
    child = cache.fork(parent)
    assert cache.block_table(child) == cache.block_table(parent)
    assert cache.pool.refcount(cache.block_table(parent)[-1]) == 2
    extra = as_backend(rng.normal(size=(1, 3, 3)), backend)
    cache.append(child, extra, extra)
    # the partial block was copied for the child; the full one is still shared
    assert cache.block_table(child)[0] == cache.block_table(parent)[0]
    assert cache.block_table(child)[1] != cache.block_table(parent)[1]
    pk, pv = cache.gather(parent)
    assert_close(pk, k, rtol=0, atol=0, name="parent keys after the child's append")
    assert_close(pv, v, rtol=0, atol=0, name="parent values")
    ck, _ = cache.gather(child)
    assert_close(ck, np.concatenate([k, to_numpy(extra)], axis=1), rtol=0, atol=0)
    cache.free(parent)  # the child keeps the shared block alive
    ck2, _ = cache.gather(child)
    assert_close(ck2, ck, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_a_freed_sequence_is_a_clear_error(backend):
    module = _module(backend)
    cache = module.PagedKVCache(8, 4, 1, 2, dtype="float64")
    kv = as_backend(np.ones((1, 5, 2)), backend)
    a = cache.new_sequence()
    cache.append(a, kv, kv)
    b = cache.fork(a)
    cache.free(a)
    before = _snapshot(cache)
    query = as_backend(np.ones((1, 1, 1, 2)), backend)
    for call in (
        lambda: module.paged_attention(query, cache, [a]),
        lambda: cache.gather(a),
        lambda: cache.append(a, kv, kv),
        lambda: cache.fork(a),
        lambda: cache.free(a),
        lambda: cache.length(a),
    ):
        with pytest.raises(KeyError, match="sequence 0 does not exist"):
            call()
        _assert_unchanged(cache, before)
    assert cache.length(b) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_exhausted_raises_and_corrupts_nothing(backend):
    module = _module(backend)
    rng = np.random.default_rng(2)
    cache = module.PagedKVCache(4, 2, 1, 2, dtype="float64")
    a = cache.new_sequence()
    kv = as_backend(rng.normal(size=(1, 5, 2)), backend)
    cache.append(a, kv, kv)  # 3 blocks, the last partial
    b = cache.fork(a)
    before = _snapshot(cache)
    big = as_backend(rng.normal(size=(1, 2, 2)), backend)
    # b needs a copy of the shared partial block + 1 new block; 1 is free
    with pytest.raises(module.PoolExhaustedError, match="pool of 4 has 1 left"):
        cache.append(b, big, big)
    _assert_unchanged(cache, before)
    one = as_backend(rng.normal(size=(1, 1, 2)), backend)
    cache.append(b, one, one)  # the copy on write fits
    with pytest.raises(module.PoolExhaustedError):
        cache.append(a, big, big)
    cache.free(b)
    cache.append(a, one, one)  # freed blocks are reused
    assert cache.length(a) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_appending_beyond_the_block_table_raises(backend):
    module = _module(backend)
    cache = module.PagedKVCache(16, 4, 1, 2, dtype="float64", max_blocks=2)
    a = cache.new_sequence()
    kv = as_backend(np.ones((1, 8, 2)), backend)
    cache.append(a, kv, kv)
    before = _snapshot(cache)
    one = as_backend(np.ones((1, 1, 2)), backend)
    with pytest.raises(ValueError, match="beyond max_blocks=2"):
        cache.append(a, one, one)
    _assert_unchanged(cache, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_clear_errors(backend):
    module = _module(backend)
    cache = module.PagedKVCache(8, 4, 2, 3, dtype="float64")
    a = cache.new_sequence()
    good = as_backend(np.ones((2, 1, 3)), backend)
    with pytest.raises(ValueError, match=r"key must be \(H_kv, S_new, D\)"):
        cache.append(a, as_backend(np.ones((1, 1, 3)), backend), good)
    with pytest.raises(TypeError, match="dtype float64"):
        f32 = as_backend(np.ones((2, 1, 3)), backend, "float32")
        cache.append(a, f32, f32)
    cache.append(a, good, good)
    with pytest.raises(ValueError, match="B = len"):
        module.paged_attention(as_backend(np.ones((2, 2, 1, 3)), backend), cache, [a])
    with pytest.raises(ValueError, match="multiple of H_kv"):
        module.paged_attention(as_backend(np.ones((1, 3, 1, 3)), backend), cache, [a])
    with pytest.raises(ValueError, match="window"):
        q = as_backend(np.ones((1, 2, 1, 3)), backend)
        module.paged_attention(q, cache, [a], window=0)
    with pytest.raises(ValueError, match="num_blocks"):
        module.PagedKVCache(0, 4, 1, 2)
    with pytest.raises(TypeError, match="PagedKVCache"):
        module.paged_attention(
            as_backend(np.ones((1, 2, 1, 3)), backend), object(), [a]
        )


def test_inputs_are_not_modified():
    from companion.numpy.paged import PagedKVCache, paged_attention

    rng = np.random.default_rng(4)
    k, v, q = (
        rng.normal(size=(1, 5, 2)),
        rng.normal(size=(1, 5, 2)),
        rng.normal(size=(1, 1, 2, 2)),
    )
    copies = [x.copy() for x in (k, v, q)]
    cache = PagedKVCache(4, 4, 1, 2, dtype="float64")
    seq = cache.new_sequence()
    cache.append(seq, k, v)
    paged_attention(q, cache, [seq], causal=True)
    for x, c in zip((k, v, q), copies):
        np.testing.assert_array_equal(x, c)


def test_long_context_bench_counts_cache_bytes_exactly():
    """``companion.bench.longctx`` at its tiny size: the bytes it reports per token."""
    pytest.importorskip("torch")
    from companion.bench import longctx

    size = dict(longctx.TINY)
    rows = longctx.run_all(size, progress=lambda message: None)["contexts"]["128"]
    H, D = size["num_heads"], size["embed_dim"] // size["num_heads"]
    per_position = 4 * 2 * H * D  # float32 keys and values of H heads
    kept = {kind: r["filled_bytes_per_token"] for kind, r in rows.items()}
    assert kept["full"] == kept["paged"] == per_position
    assert kept["grouped"] == 4 * 2 * size["kv_heads"] * D
    assert kept["latent"] == 4 * (size["latent_dim"] + size["rope_dim"])
    assert kept["windowed"] == per_position * size["window"] / 128
    # 2 forks of a 125-position prompt (blocks of 8) decode 3 tokens each: 15 full
    # prompt blocks shared, one private block per fork
    block = size["block_size"] * per_position
    assert kept["paged, forks"] == (15 + 2) * block / 2 / 128
    assert all(r["ms_per_token"] > 0 for r in rows.values())


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_float32_frameworks_against_the_float64_oracle(backend):
    """float32 paged attention: at most 2x the error of numpy float32 paged."""
    from companion.numpy.paged import PagedKVCache, paged_attention
    from companion.testing import assert_close_to_oracle

    module = _module(backend)
    rng = np.random.default_rng(5)
    k, v = rng.normal(size=(2, 37, 8)), rng.normal(size=(2, 37, 8))
    q = rng.normal(size=(1, 4, 3, 8))
    expected = oracle(q[0], k, v, causal=True, window=9)[None]
    baseline_cache = PagedKVCache(16, 8, 2, 8, dtype="float32")
    seq = baseline_cache.new_sequence()
    baseline_cache.append(seq, k.astype("float32"), v.astype("float32"))
    baseline = paged_attention(
        q.astype("float32"), baseline_cache, [seq], causal=True, window=9
    )
    cache = module.PagedKVCache(16, 8, 2, 8, dtype="float32")
    seq = cache.new_sequence()
    cache.append(
        seq, as_backend(k, backend, "float32"), as_backend(v, backend, "float32")
    )
    out = module.paged_attention(
        as_backend(q, backend, "float32"), cache, [seq], causal=True, window=9
    )
    assert to_numpy(out).dtype == np.float32
    assert_close_to_oracle(out, baseline, expected, name=f"{backend} float32")
