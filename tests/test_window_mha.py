"""Sliding windows in the multi-head layer, and rolling caches that decode with them.

``multi_head_attention(..., window=W)`` equals the same call with the banded mask
``causal_mask(L, S, window=W)``; decoding one token (or a chunk) at a time through a
rolling ``KVCache(max_length=W)`` equals full sliding-window attention, RoPE included
(positions stay absolute); the receptive field of stacked windowed layers grows by
``W - 1`` per layer. numpy float64 is the oracle for torch and TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pytest

import companion.numpy as cn
from companion.testing import as_backend, assert_close, to_numpy

BACKENDS = ["numpy", "torch", "tensorflow"]


def _namespace(backend: str):
    if backend == "numpy":
        return cn
    if backend == "torch":
        pytest.importorskip("torch")
        import companion.torch as module
    else:
        pytest.importorskip("tensorflow")
        import companion.tensorflow as module
    return module


def _concat(parts, backend):
    return np.concatenate([to_numpy(p) for p in parts], axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("implementation", ["reference", "tiled"])
@pytest.mark.parametrize("W", [1, 3, 8, 40])
@pytest.mark.parametrize("causal", [True, False])
def test_window_equals_the_banded_mask(backend, implementation, W, causal):
    ns = _namespace(backend)
    params = cn.MultiHeadParams.random(24, 4, 2, seed=W)
    x = np.random.default_rng(W).normal(size=(2, 13, 24))
    band = cn.causal_mask(13, 13, window=W) if causal else None
    if not causal:
        j = np.arange(13)
        band = np.abs(j[:, None] - j[None, :]) < W
    expected = cn.multi_head_attention(x, x, params, mask=band)  # float64 oracle
    out = ns.multi_head_attention(
        as_backend(x, backend),
        as_backend(x, backend),
        params,
        causal=causal,
        window=W,
        implementation=implementation,
    )
    assert_close(out, expected, name=f"{backend} {implementation} window={W}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", [None, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("chunks", [(1,) * 23, (5, 1, 1, 7, 9), (23,)])
@pytest.mark.parametrize("W", [1, 4, 6])
def test_rolling_cache_decoding_equals_full_sliding_window(backend, rope, chunks, W):
    ns = _namespace(backend)
    params = cn.MultiHeadParams.random(16, 4, 2, seed=1)
    x = np.random.default_rng(2).normal(size=(2, 23, 16))
    full = cn.multi_head_attention(x, x, params, causal=True, window=W, rope=rope)
    cache = ns.KVCache(max_length=W)
    outputs, start = [], 0
    for n in chunks:
        step = as_backend(x[:, start : start + n], backend)
        outputs.append(
            ns.multi_head_attention(
                step, step, params, causal=True, cache=cache, rope=rope
            )
        )
        start += n
        assert cache.length == min(start, W) and cache.seen == start
    assert_close(_concat(outputs, backend), full, name=f"{backend} rolling W={W}")


def test_rolling_cache_memory_stays_bounded_while_decoding():
    params = cn.MultiHeadParams.random(16, 4, seed=3)
    x = np.random.default_rng(4).normal(size=(1, 200, 16))
    cache = cn.KVCache(max_length=8)
    for t in range(200):
        cn.multi_head_attention(
            x[:, t : t + 1],
            x[:, t : t + 1],
            params,
            causal=True,
            cache=cache,
            rope=True,
        )
    assert (cache.length, cache.seen) == (8, 200)
    assert cache.capacity == 16  # 2 W positions, whatever the length


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_wider_than_the_rolling_cache_is_an_error(backend):
    ns = _namespace(backend)
    params = cn.MultiHeadParams.random(8, 2, seed=5)
    x = as_backend(np.ones((1, 3, 8)), backend)
    cache = ns.KVCache(max_length=4)
    ns.multi_head_attention(x, x, params, causal=True, cache=cache)
    with pytest.raises(ValueError, match="wider than the rolling cache"):
        ns.multi_head_attention(x, x, params, causal=True, cache=cache, window=5)
    assert (cache.length, cache.seen) == (3, 3)  # unchanged
    with pytest.raises(ValueError, match="window"):
        ns.multi_head_attention(x, x, params, causal=True, window=0)


def test_a_narrower_window_than_the_cache_is_honoured():
    params = cn.MultiHeadParams.random(8, 2, seed=6)
    x = np.random.default_rng(7).normal(size=(1, 12, 8))
    full = cn.multi_head_attention(x, x, params, causal=True, window=3)
    cache = cn.KVCache(max_length=5)
    steps = [
        cn.multi_head_attention(
            x[:, t : t + 1], x[:, t : t + 1], params, causal=True, cache=cache, window=3
        )
        for t in range(12)
    ]
    assert_close(np.concatenate(steps, axis=1), full)


def test_torch_module_takes_a_window_and_a_rolling_cache():
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    params = cn.MultiHeadParams.random(16, 4, seed=8)
    layer = ct.MultiHeadAttention.from_params(params)
    x = np.random.default_rng(9).normal(size=(1, 10, 16))
    full = cn.multi_head_attention(x, x, params, causal=True, window=3)
    assert_close(layer(torch.from_numpy(x), causal=True, window=3), full)
    cache = ct.KVCache(max_length=3)
    with torch.no_grad():
        steps = [
            layer(torch.from_numpy(x[:, t : t + 1]), causal=True, cache=cache)
            for t in range(10)
        ]
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("W, layers", [(2, 1), (3, 2), (4, 3)])
def test_receptive_field_grows_by_window_minus_one_per_layer(W, layers):
    """Perturb token j: with ``layers`` residual windowed layers, outputs move exactly
    at positions ``j .. j + layers (W - 1)``."""
    E, n, j = 8, 30, 5
    stack = [cn.MultiHeadParams.random(E, 2, seed=10 + i) for i in range(layers)]

    def forward(x):
        for params in stack:
            x = x + cn.multi_head_attention(x, x, params, causal=True, window=W)
        return x

    x = np.random.default_rng(11).normal(size=(1, n, E))
    moved = x.copy()
    moved[0, j] += 1.0
    changed = np.abs(forward(moved) - forward(x)).max(axis=-1)[0] > 1e-12
    reach = layers * (W - 1)
    np.testing.assert_array_equal(
        np.flatnonzero(changed), np.arange(j, min(n, j + reach + 1))
    )
