"""Grouped-query heads in the torch reference read each key/value head in place.

* the reference, the weights and ``multi_head_attention`` fold the ``G`` query heads
  of a group into the rows of one matmul, so no tensor as large as the keys is
  allocated (the split layout ``(..., H_kv, G, L, D)`` against keys broadcast as
  ``(..., H_kv, 1, S, D)`` made ``torch.matmul`` copy the keys and values ``G`` times);
* folded, every query head still meets its own mask row, causal and window band:
  grouped-query attention equals multi-head attention with the keys and values
  repeated per query head, for per-head boolean and float masks.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import companion.torch as ct
from companion.testing import as_backend, assert_close
from companion.torch.attention import _fold_group, _unfold_group


def tensor(rng, shape, dtype="float64"):
    return as_backend(rng.standard_normal(shape), "torch", dtype)


def largest_allocation(fn) -> int:
    """The bytes of the largest single CPU allocation made while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.self_cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("L", [1, 3])
def test_grouped_reference_allocates_no_copy_of_the_keys(rng, L):
    # decoding-like: one (or a few) queries, a long context, G = 4 query heads per
    # key/value head; the scores (H * L * S numbers) are far smaller than the keys
    B, H, H_kv, S, D = 1, 16, 4, 4096, 64
    q = tensor(rng, (B, H, L, D), "float32")
    k = tensor(rng, (B, H_kv, S, D), "float32")
    v = tensor(rng, (B, H_kv, S, D), "float32")
    assert B * H * L * S * 4 < k.nbytes // 4  # the check below could fail
    calls = {
        "reference": lambda: ct.scaled_dot_product_attention_reference(
            q, k, v, causal=True
        ),
        "weights": lambda: ct.attention_weights(q, k, causal=True),
    }
    for name, fn in calls.items():
        largest = largest_allocation(fn)
        assert largest < k.nbytes, (
            f"{name}: an allocation of {largest} bytes, as large as the keys "
            f"({k.nbytes} bytes): the keys were copied per group member"
        )


def test_fold_is_a_view_with_row_g_times_L_plus_l():
    B, H, H_kv, L, D = 2, 6, 2, 3, 4
    x = torch.arange(B * H * L * D, dtype=torch.float64).reshape(B, H, L, D)
    folded = _fold_group(x, H_kv)  # (B, H_kv, G * L, D)
    G = H // H_kv
    assert folded.shape == (B, H_kv, G * L, D)
    assert folded._is_view() and folded.data_ptr() == x.data_ptr()  # no copy
    for h in range(H):
        for pos in range(L):
            assert torch.equal(folded[:, h // G, (h % G) * L + pos], x[:, h, pos])
    assert torch.equal(_unfold_group(folded, H, L), x)


def repeated(kv, G):
    """``(..., H_kv, S, X)`` -> ``(..., H, S, X)``: key/value head per query head."""
    return kv.repeat_interleave(G, dim=-3)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 2)])
@pytest.mark.parametrize("L,S", [(1, 9), (4, 9), (5, 5)])
def test_grouped_equals_repeated_keys_with_per_head_masks(rng, causal, window, L, S):
    B, H, H_kv, D, D_v = 2, 6, 2, 4, 3
    G = H // H_kv
    q = tensor(rng, (B, H, L, D))
    k, v = tensor(rng, (B, H_kv, S, D)), tensor(rng, (B, H_kv, S, D_v))
    keep = torch.from_numpy(rng.random((B, H, L, S)) < 0.7)  # one row per head
    keep[1, 4, 0] = False  # a query of head 4 that sees nothing
    bias = tensor(rng, (H, L, S))  # per head, broadcast over the batch
    k_full, v_full = repeated(k, G), repeated(v, G)
    for label, mask in (("boolean", keep), ("float", bias), ("none", None)):
        options = dict(mask=mask, causal=causal, window=window)
        assert_close(
            ct.scaled_dot_product_attention_reference(q, k, v, **options),
            ct.scaled_dot_product_attention_reference(q, k_full, v_full, **options),
            name=f"output, {label} mask",
        )
        assert_close(
            ct.attention_weights(q, k, **options),
            ct.attention_weights(q, k_full, **options),
            name=f"weights, {label} mask",
        )


def test_multi_head_attention_weights_path_equals_repeated_heads(rng):
    # the return_weights path multiplies the weights with the values itself
    B, L, E, H, H_kv = 2, 5, 12, 6, 2
    params = ct.MultiHeadParams.random(E, H, H_kv, dtype="float64", seed=3)
    x = tensor(rng, (B, L, E))
    out, probs = ct.multi_head_attention(x, x, params, causal=True, return_weights=True)
    reference = ct.multi_head_attention(
        x, x, params, causal=True, implementation="reference"
    )
    assert probs.shape == (B, H, L, L)
    assert_close(out, reference, name="output with weights")
