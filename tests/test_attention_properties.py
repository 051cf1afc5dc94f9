"""Properties of attention that hold for every input (hypothesis, numpy).

Weights are a distribution per row (or exactly 0); softmax ignores a constant shift;
self-attention without a mask commutes with permuting the positions; equal scores
average the values; decoding token by token with a KV cache equals full causal
attention. The torch and TensorFlow namespaces can add their own.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.numpy import (
    KVCache,
    MultiHeadParams,
    attention_tiled,
    attention_weights,
    causal_mask,
    multi_head_attention,
    scaled_dot_product_attention_reference,
)
from companion.testing import assert_close

SETTINGS = settings(max_examples=30, deadline=None)
IMPLEMENTATIONS = {
    "reference": scaled_dot_product_attention_reference,
    "tiled": lambda *a, **k: attention_tiled(
        *a, block_q=3, block_k=4, num_threads=2, **k
    ),
}
impls = pytest.mark.parametrize(
    "attend",
    IMPLEMENTATIONS.values(),
    ids=[f"numpy-{n}-float64" for n in IMPLEMENTATIONS],
)

sizes = st.fixed_dictionaries(
    {
        "H_kv": st.integers(1, 2),
        "group": st.integers(1, 3),
        "L": st.integers(1, 9),
        "S": st.integers(1, 9),
        "D": st.integers(1, 5),
        "seed": st.integers(0, 2**32 - 1),
    }
)


def _qkv(s, *, L=None):
    rng = np.random.default_rng(s["seed"])
    H = s["H_kv"] * s["group"]
    L = s["L"] if L is None else L
    return (
        rng.standard_normal((H, L, s["D"])),
        rng.standard_normal((s["H_kv"], s["S"], s["D"])),
        rng.standard_normal((s["H_kv"], s["S"], s["D"] + 1)),
        rng,
    )


@SETTINGS
@given(s=sizes, causal=st.booleans())
def test_weight_rows_sum_to_one_or_are_all_zero(s, causal):
    query, key, _, rng = _qkv(s)
    mask = rng.random((1, s["L"], s["S"])) < 0.5
    weights = attention_weights(query, key, mask=mask, causal=causal)  # (H, L, S)
    allowed = mask & causal_mask(s["L"], s["S"]) if causal else mask  # (1, L, S)
    sees_something = np.broadcast_to(allowed.any(axis=-1), weights.shape[:-1])  # (H, L)
    assert_close(
        weights.sum(axis=-1), sees_something.astype(np.float64), name="row sums"
    )
    assert_close(
        np.where(np.broadcast_to(allowed, weights.shape), 0.0, weights),
        np.zeros(weights.shape),
        rtol=0,
        atol=0,
        name="weights of masked entries",
    )
    assert (weights >= 0).all()


@impls
@SETTINGS
@given(s=sizes, shift=st.floats(-50, 50), causal=st.booleans())
def test_adding_a_constant_to_every_score_changes_nothing(attend, s, shift, causal):
    query, key, value, _ = _qkv(s)
    plain = attend(query, key, value, causal=causal)
    # float mask = + shift
    shifted = attend(query, key, value, mask=np.full((1, 1), shift), causal=causal)
    assert_close(shifted, plain, name=f"scores + {shift}")


@impls
@SETTINGS
@given(s=sizes)
def test_self_attention_is_permutation_equivariant(attend, s):
    x, _, _, rng = _qkv(s)  # (H, L, D), used as query, key and value: H_kv = H
    permutation = rng.permutation(s["L"])
    out = attend(x, x, x)  # (H, L, D)
    out_of_permuted = attend(x[:, permutation], x[:, permutation], x[:, permutation])
    assert_close(
        out_of_permuted, out[:, permutation], name="attention(P x) vs P attention(x)"
    )


@impls
@SETTINGS
@given(s=sizes)
def test_equal_scores_give_the_mean_of_the_values(attend, s):
    query, key, value, _ = _qkv(s)
    out = attend(np.zeros_like(query), key, value)  # every score is 0: uniform weights
    # (H, 1, D_v)
    mean = np.repeat(value.mean(axis=-2, keepdims=True), s["group"], axis=0)
    assert_close(out, np.broadcast_to(mean, out.shape), name="output with equal scores")


@settings(max_examples=25, deadline=None)
@given(s=sizes, batch=st.integers(1, 2), prefill=st.integers(0, 4), bias=st.booleans())
def test_kv_cache_decoding_equals_full_causal_attention(s, batch, prefill, bias):
    H = s["H_kv"] * s["group"]
    params = MultiHeadParams.random(
        H * s["D"], H, s["H_kv"], bias=bias, seed=s["seed"] % 1000
    )
    # (B, L, E)
    x = np.random.default_rng(s["seed"]).standard_normal((batch, s["L"], H * s["D"]))
    full = multi_head_attention(x, x, params, causal=True)  # (B, L, E)
    cache = KVCache()
    prefill = min(prefill, s["L"])
    steps = [slice(0, prefill)] if prefill else []
    # then one token at a time
    steps += [slice(t, t + 1) for t in range(prefill, s["L"])]
    outputs = [
        multi_head_attention(x[:, step], x[:, step], params, causal=True, cache=cache)
        for step in steps
    ]
    assert cache.length == s["L"]
    assert_close(np.concatenate(outputs, axis=1), full, name="cached decoding")
