"""The rolling ``KVCache(max_length=W)`` keeps the last ``W`` positions, every backend.

What it returns, what it keeps, that ``seen`` stays absolute, that storage stays
``O(W)``, that views returned earlier are never overwritten, and clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.testing import as_backend, assert_close, to_numpy

BACKENDS = ["numpy", "torch", "tensorflow"]


def _cache_class(backend: str):
    if backend == "numpy":
        from companion.numpy import KVCache
    elif backend == "torch":
        pytest.importorskip("torch")
        from companion.torch import KVCache
    else:
        pytest.importorskip("tensorflow")
        from companion.tensorflow import KVCache
    return KVCache


def _sequence(S: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # (B, H_kv, S, D), (B, H_kv, S, D_v)
    return rng.normal(size=(2, 3, S, 4)), rng.normal(size=(2, 3, S, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", [1, 2, 5, 16, 17])
def test_one_token_at_a_time_returns_the_window(backend, W):
    KVCache = _cache_class(backend)
    keys, values = _sequence(41)
    cache = KVCache(max_length=W)
    for t in range(41):
        k, v = cache.append(
            as_backend(keys[:, :, t : t + 1], backend),
            as_backend(values[:, :, t : t + 1], backend),
        )
        first = max(0, t - W + 1)
        assert_close(k, keys[:, :, first : t + 1], rtol=0, atol=0, name=f"key t={t}")
        assert_close(v, values[:, :, first : t + 1], rtol=0, atol=0, name=f"v t={t}")
        assert cache.length == min(t + 1, W)
        assert cache.seen == t + 1
        assert_close(cache.key, keys[:, :, first : t + 1], rtol=0, atol=0)
    # storage stays O(W): at most 2 W positions (or the minimum capacity)
    assert cache.capacity <= max(2 * W, cache.MIN_CAPACITY)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks", [(7, 3, 1, 9, 1, 1, 12), (1, 20, 2), (5, 5, 5, 5)])
def test_chunks_return_what_their_queries_can_see(backend, chunks):
    """A chunk of ``n`` new positions gets the ``W - 1`` before it plus itself."""
    KVCache = _cache_class(backend)
    W = 5
    keys, values = _sequence(sum(chunks), seed=1)
    cache = KVCache(max_length=W)
    stop = 0
    for n in chunks:
        start, stop = stop, stop + n
        k, v = cache.append(
            as_backend(keys[:, :, start:stop], backend),
            as_backend(values[:, :, start:stop], backend),
        )
        first = max(0, start - (W - 1))
        assert_close(k, keys[:, :, first:stop], rtol=0, atol=0, name=f"key {n}")
        assert_close(v, values[:, :, first:stop], rtol=0, atol=0, name=f"value {n}")
        kept = max(0, stop - W)
        assert_close(cache.key, keys[:, :, kept:stop], rtol=0, atol=0)
        assert_close(cache.value, values[:, :, kept:stop], rtol=0, atol=0)
        assert (cache.length, cache.seen) == (stop - kept, stop)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_views_returned_earlier_are_never_overwritten(backend):
    KVCache = _cache_class(backend)
    keys, values = _sequence(60, seed=2)
    cache = KVCache(max_length=4)
    returned = []
    for t in range(60):
        k, _ = cache.append(
            as_backend(keys[:, :, t : t + 1], backend),
            as_backend(values[:, :, t : t + 1], backend),
        )
        returned.append((t, k))
    for t, k in returned:
        first = max(0, t - 3)
        assert_close(k, keys[:, :, first : t + 1], rtol=0, atol=0, name=f"t={t}")


def test_numpy_views_are_read_only_and_inputs_untouched():
    from companion.numpy import KVCache

    keys, values = _sequence(9, seed=3)
    before = keys.copy()
    cache = KVCache(max_length=3)
    k, _ = cache.append(keys, values)
    assert not k.flags.writeable and not cache.key.flags.writeable
    np.testing.assert_array_equal(keys, before)


def test_nbytes_counts_the_bounded_storage():
    from companion.numpy import KVCache

    keys, values = _sequence(1000, seed=4)
    rolling, full = KVCache(max_length=8), KVCache()
    for t in range(1000):
        rolling.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        full.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    per_position = 8 * 2 * 3 * (4 + 5)  # float64, B = 2, H_kv = 3, D + D_v = 9
    assert rolling.nbytes == per_position * rolling.capacity
    assert rolling.capacity == 16 and full.capacity == 1024
    assert full.nbytes == per_position * 1024


def test_reset_starts_again_at_position_zero():
    from companion.numpy import KVCache

    keys, values = _sequence(10, seed=5)
    cache = KVCache(max_length=3)
    cache.append(keys, values)
    cache.reset()
    assert (cache.length, cache.seen, cache.key) == (0, 0, None)
    k, _ = cache.append(keys[:, :, :2], values[:, :, :2])
    assert_close(to_numpy(k), keys[:, :, :2], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_max_length_is_a_clear_error(backend, bad):
    KVCache = _cache_class(backend)
    with pytest.raises((TypeError, ValueError), match="max_length"):
        KVCache(max_length=bad)


def test_a_mismatched_append_changes_nothing():
    from companion.numpy import KVCache

    keys, values = _sequence(6, seed=6)
    cache = KVCache(max_length=4)
    cache.append(keys, values)
    with pytest.raises(ValueError, match="do not match"):
        cache.append(keys[:, :2, :1], values[:, :2, :1])
    assert (cache.length, cache.seen) == (4, 6)
    assert_close(cache.key, keys[:, :, 2:], rtol=0, atol=0)
