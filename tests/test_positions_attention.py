"""Rotary embeddings inside multi-head attention: ``rope=`` in three backends.

Queries and keys are rotated at their absolute positions; with a ``KVCache`` the new
tokens start at ``cache.seen`` and the cache stores rotated keys, so decoding one token
at a time equals the full causal pass, for multi-head and grouped-query heads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import registry
from companion.numpy import MultiHeadParams
from companion.numpy import positions as P
from companion.numpy.attention import scaled_dot_product_attention_reference
from companion.testing import as_backend, assert_close, to_numpy

ROPES = {
    "default": True,
    "base100": 100.0,
    "interleaved": {"interleaved": True},
    "partial": P.RotaryConfig(base=500.0, rotary_dim=4),
}


def _project(x, w, b, heads):
    y = x @ w + b  # (B, T, heads * D)
    B, T, width = y.shape
    return y.reshape(B, T, heads, width // heads).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("rope", list(ROPES.values()), ids=list(ROPES))
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (4, 1)])
def test_numpy_rope_rotates_queries_and_keys_at_their_positions(rng, rope, H, H_kv):
    params = MultiHeadParams.random(24, H, H_kv, seed=3)
    x = rng.normal(size=(2, 7, 24))
    got = registry.namespace("numpy").multi_head_attention(
        x, x, params, causal=True, rope=rope
    )
    config = P._positions.as_rotary(rope)
    kwargs = dict(
        base=config.base, interleaved=config.interleaved, rotary_dim=config.rotary_dim
    )
    q = P.rotary_embedding(
        _project(x, params.w_q, params.b_q, H), np.arange(7), **kwargs
    )
    k = P.rotary_embedding(
        _project(x, params.w_k, params.b_k, H_kv), np.arange(7), **kwargs
    )
    v = _project(x, params.w_v, params.b_v, H_kv)
    heads = scaled_dot_product_attention_reference(q, k, v, causal=True)
    expected = heads.transpose(0, 2, 1, 3).reshape(2, 7, -1) @ params.w_o + params.b_o
    assert_close(got, expected)
    plain = registry.namespace("numpy").multi_head_attention(x, x, params, causal=True)
    assert not np.allclose(got, plain)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("rope", list(ROPES.values()), ids=list(ROPES))
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_rope_decoding_with_a_cache_equals_the_full_pass(rng, backend, rope, H, H_kv):
    """Prefill 3 tokens, then one at a time: the same outputs as one causal pass."""
    mod = registry.namespace(backend)
    params = MultiHeadParams.random(16, H, H_kv, seed=5)
    x = rng.normal(size=(2, 9, 16))
    oracle = registry.namespace("numpy").multi_head_attention(
        x, x, params, causal=True, rope=rope
    )
    xb = as_backend(x, backend)
    full = mod.multi_head_attention(xb, xb, params, causal=True, rope=rope)
    assert_close(full, oracle)
    cache = mod.KVCache()
    steps = [(0, 3)] + [(t, t + 1) for t in range(3, 9)]
    outputs = []
    for start, stop in steps:
        chunk = as_backend(x[:, start:stop], backend)
        outputs.append(
            to_numpy(
                mod.multi_head_attention(
                    chunk, chunk, params, causal=True, cache=cache, rope=rope
                )
            )
        )
    assert cache.seen == 9
    assert_close(np.concatenate(outputs, axis=1), oracle)


def test_the_cache_stores_rotated_keys(rng):
    mod = registry.namespace("numpy")
    params = MultiHeadParams.random(8, 2, seed=1)
    x = rng.normal(size=(1, 5, 8))
    cache = mod.KVCache()
    mod.multi_head_attention(x, x, params, causal=True, cache=cache, rope=True)
    keys = _project(x, params.w_k, params.b_k, 2)
    assert_close(cache.key, P.rotary_embedding(keys, np.arange(5)))


def test_torch_module_with_rope_matches_the_function(rng):
    import torch

    ct = registry.namespace("torch")
    torch.manual_seed(0)
    layer = ct.MultiHeadAttention(16, 4, 2, rope={"base": 50.0}).double()
    assert layer.rope == P.RotaryConfig(base=50.0)
    x = torch.tensor(rng.normal(size=(2, 6, 16)))
    expected = registry.namespace("numpy").multi_head_attention(
        x.numpy(), x.numpy(), layer.to_params(), causal=True, rope=50.0
    )
    assert_close(layer(x, causal=True), expected)
    cache = ct.KVCache()
    with torch.no_grad():
        steps = [layer(x[:, t : t + 1], causal=True, cache=cache) for t in range(6)]
    assert_close(torch.cat(steps, dim=1), expected)


def test_keras_layer_with_rope_matches_the_function(rng):
    ctf = registry.namespace("tensorflow")
    params = MultiHeadParams.random(16, 4, 2, seed=2)
    layer = ctf.MultiHeadAttention.from_params(params, rope=True)
    assert layer.get_config()["rope"] == {
        "base": 10000.0,
        "interleaved": False,
        "rotary_dim": None,
    }
    assert ctf.MultiHeadAttention.from_config(layer.get_config()).rope == layer.rope
    x = rng.normal(size=(2, 6, 16))
    expected = registry.namespace("numpy").multi_head_attention(
        x, x, params, causal=True, rope=True
    )
    xt = as_backend(x, "tensorflow")
    assert_close(layer(xt, xt, use_causal_mask=True), expected)
    cache = ctf.KVCache()
    steps = [
        to_numpy(
            layer(xt[:, t : t + 1], xt[:, t : t + 1], use_causal_mask=True, cache=cache)
        )
        for t in range(6)
    ]
    assert_close(np.concatenate(steps, axis=1), expected)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize(
    "rope, error",
    [("yes", TypeError), (1.0, ValueError), ({"bogus": 1}, TypeError)],
    ids=["string", "base-1", "unknown-field"],
)
def test_bad_rope_is_rejected(backend, rope, error):
    params = MultiHeadParams.random(8, 2, seed=0)
    x = as_backend(np.ones((1, 3, 8)), backend)
    with pytest.raises(error):
        registry.namespace(backend).multi_head_attention(x, x, params, rope=rope)


@settings(max_examples=25, deadline=None)
@given(
    start=st.integers(0, 200_000),
    H_kv=st.sampled_from([1, 2, 4]),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rope_attention_depends_on_offsets_only(start, H_kv, interleaved, seed):
    """Queries and keys from position ``start`` on (a cache that has seen ``start``
    positions and dropped them, as a rolling cache does) give the attention they give
    from position 0: weights and outputs depend on positions only through ``m - n``."""
    mod = registry.namespace("numpy")
    params = MultiHeadParams.random(16, 4, H_kv, seed=4)
    x = np.random.default_rng(seed).normal(size=(1, 5, 16))
    rope = {"interleaved": interleaved}
    expected, weights = mod.multi_head_attention(
        x, x, params, causal=True, rope=rope, return_weights=True
    )
    cache = mod.KVCache()
    cache._seen = start  # positions seen before and no longer stored
    got, got_weights = mod.multi_head_attention(
        x, x, params, causal=True, rope=rope, cache=cache, return_weights=True
    )
    assert cache.seen == start + 5
    assert_close(got_weights, weights)
    assert_close(got, expected)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize(
    "function",
    ["scaled_dot_product_attention_reference", "attention_tiled", "attention_weights"],
)
@pytest.mark.parametrize("L, S", [(5, 5), (3, 7)])
def test_alibi_bias_is_a_float_mask_for_every_attention_function(
    rng, backend, function, L, S
):
    """The bias broadcasts as ``(H, L, S)`` and is added to the scaled scores."""
    mod, ref = registry.namespace(backend), registry.namespace("numpy")
    H, D = 4, 8
    q = rng.normal(size=(2, H, L, D))
    k, v = rng.normal(size=(2, 2, H, S, D))
    bias = P.alibi_bias(H, L, S)
    args = (q, k) if function == "attention_weights" else (q, k, v)
    expected = getattr(ref, function)(*args, mask=bias, causal=True)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(D) + bias
    weights = ref.softmax(scores, mask=ref.causal_mask(L, S))
    assert_close(expected, weights if function == "attention_weights" else weights @ v)
    got = getattr(mod, function)(
        *(as_backend(a, backend) for a in args),
        mask=mod.alibi_bias(H, L, S, dtype=_dtype(backend)),
        causal=True,
    )
    assert_close(got, expected)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_alibi_bias_as_the_mask_of_multi_head_attention(rng, backend):
    mod = registry.namespace(backend)
    params = MultiHeadParams.random(16, 4, 2, seed=6)
    x = rng.normal(size=(2, 6, 16))
    bias = P.alibi_bias(4, 6, 6)
    expected = registry.namespace("numpy").multi_head_attention(
        x, x, params, causal=True, mask=bias
    )
    assert not np.allclose(
        expected, registry.namespace("numpy").multi_head_attention(x, x, params)
    )
    xb = as_backend(x, backend)
    got = mod.multi_head_attention(
        xb, xb, params, causal=True, mask=mod.alibi_bias(4, 6, 6, dtype=_dtype(backend))
    )
    assert_close(got, expected)


def _dtype(backend):
    if backend == "torch":
        import torch

        return torch.float64
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.float64
    return np.float64
