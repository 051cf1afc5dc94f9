"""How paged attention reads the pool: runs of blocks in place, short runs gathered.

The pool is head-major, so a run of consecutive blocks is one strided view of it, as
a contiguous cache is: decoding reads the cache where it lies instead of copying it
every step (the reason paged decoding runs at contiguous speed). Outputs through every
kind of tile (in place, gathered, cut into pieces) equal the float64 oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import BACKENDS, backend_module

from companion import _paged
from companion.numpy import scaled_dot_product_attention_reference as oracle
from companion.testing import as_backend, assert_close, to_numpy


def _module(backend: str):
    return backend_module(backend, "paged")


def test_plan_reads_long_runs_in_place_and_gathers_short_ones():
    # blocks 0-3 (a run of 4), 7 (alone), 9-13 (a run of 5, the last one partial)
    table = [0, 1, 2, 3, 7, 9, 10, 11, 12, 13]
    tiles = _paged.read_plan(table, 38, 4)
    runs = [t for t in tiles if t.blocks is None]
    gathered = [t for t in tiles if t.blocks is not None]
    assert [(t.row, t.n) for t in runs] == [(0, 16), (36, 18)]
    np.testing.assert_array_equal(runs[1].positions, np.arange(20, 38))
    assert [(t.blocks, t.n) for t in gathered] == [((7,), 4)]
    np.testing.assert_array_equal(gathered[0].positions, np.arange(16, 20))
    # every position exactly once
    every = np.sort(np.concatenate([t.positions for t in tiles]))
    np.testing.assert_array_equal(every, np.arange(38))


def test_plan_cuts_long_runs_for_many_query_rows(monkeypatch):
    monkeypatch.setattr(_paged, "TILE_SCORES", 64)
    tiles = _paged.read_plan(list(range(10)), 37, 4, rows=8)  # at most 8 keys a tile
    assert [t.n for t in tiles] == [8, 8, 8, 8, 5]
    assert [t.row for t in tiles] == [0, 8, 16, 24, 32]


def test_a_short_sequence_is_one_tile_read_in_place():
    tiles = _paged.read_plan([5, 6], 7, 4)
    assert len(tiles) == 1 and tiles[0].blocks is None and tiles[0].row == 20


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_decoding_reads_the_pool_without_copying_it(backend):
    module = _module(backend)
    rng = np.random.default_rng(0)
    cache = module.PagedKVCache(16, 4, 2, 3, dtype="float32")
    seq = cache.new_sequence()
    kv = as_backend(rng.normal(size=(2, 30, 3)).astype("float32"), backend)
    cache.append(seq, kv, kv)
    (tile,) = _paged.read_plan(cache._table(seq), 30, 4)
    k, v = module._tile_keys(cache, tile, cache._key.dtype)
    if backend == "numpy":
        assert np.shares_memory(k, cache._key) and np.shares_memory(v, cache._value)
    else:
        pool = cache._key.untyped_storage().data_ptr()
        assert k.untyped_storage().data_ptr() == pool
    np.testing.assert_array_equal(to_numpy(k), to_numpy(kv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3, 9])
@pytest.mark.parametrize("H, H_kv", [(4, 2), (2, 2), (3, 1)])
def test_forks_decoded_long_mix_in_place_and_gathered_tiles(backend, window, H, H_kv):
    # three forks appending in turn get interleaved private blocks: after the prompt's
    # run, every sequence's table is a chain of short runs (gathered tiles)
    module = _module(backend)
    rng = np.random.default_rng(H + 7 * H_kv)
    D, bs, prompt, steps, forks = 4, 2, 21, 14, 3
    cache = module.PagedKVCache(80, bs, H_kv, D, dtype="float64")
    keys = rng.normal(size=(forks, H_kv, prompt + steps, D))
    values = rng.normal(size=(forks, H_kv, prompt + steps, D))
    keys[:, :, :prompt], values[:, :, :prompt] = (
        keys[0, :, :prompt],
        values[0, :, :prompt],
    )
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
    kinds = {
        t.blocks is None
        for seq in seqs
        for t in _paged.read_plan(cache._table(seq), prompt + steps, bs)
    }
    assert kinds == {True, False}  # both kinds of tile are exercised
    L, S = 3, prompt + steps
    query = rng.normal(size=(forks, H, L, D))
    out = module.paged_attention(
        as_backend(query, backend), cache, seqs, causal=True, window=window
    )
    p = np.arange(L)[:, None] + S - L
    j = np.arange(S)[None, :]
    keep = (j > p - window) if window is not None else np.ones((L, S), bool)
    for b in range(forks):
        expected = oracle(query[b], keys[b], values[b], mask=keep, causal=True)
        assert_close(out[b], expected, name=f"sequence {b}")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prefill_cut_into_tiles_equals_the_oracle(backend, monkeypatch):
    monkeypatch.setattr(_paged, "TILE_SCORES", 40)  # tiles of a few keys
    module = _module(backend)
    rng = np.random.default_rng(5)
    cache = module.PagedKVCache(16, 4, 1, 3, dtype="float64")
    k, v = rng.normal(size=(1, 29, 3)), rng.normal(size=(1, 29, 3))
    seq = cache.new_sequence()
    cache.append(seq, as_backend(k, backend), as_backend(v, backend))
    query = rng.normal(size=(1, 2, 29, 3))
    out = module.paged_attention(as_backend(query, backend), cache, [seq], causal=True)
    assert_close(out[0], oracle(query[0], k, v, causal=True))


@pytest.mark.parametrize("window", [None, 3, (2, 1)])
def test_torch_paged_attention_is_differentiable_in_the_query(window):
    # the inference path works in place; with a query that needs gradients it must
    # not: the gradient equals autograd through the reference on the same keys
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 29, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 29, 8, generator=gen, dtype=torch.float64)
    cache = ct.PagedKVCache(16, 4, 2, 8, dtype="float64")
    first = cache.new_sequence()
    cache.append(first, k, v)
    fork = cache.fork(first)  # its table: the shared run plus a private block
    cache.append(fork, k[:, :3], v[:, :3])
    q = torch.randn(1, 4, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    out = ct.paged_attention(q, cache, [fork], causal=True, window=window)
    (grad,) = torch.autograd.grad(out.sum(), q)
    keys, values = torch.cat([k, k[:, :3]], 1)[None], torch.cat([v, v[:, :3]], 1)[None]
    expected = ct.scaled_dot_product_attention_reference(
        q, keys, values, causal=True, window=window
    )
    (grad_expected,) = torch.autograd.grad(expected.sum(), q)
    assert_close(out, expected)
    assert_close(grad, grad_expected)
