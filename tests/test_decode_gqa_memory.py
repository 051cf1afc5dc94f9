"""Grouped-head decoding reads each key/value head in place (torch).

One query (``L = 1``) per head against a long cache, ``G`` query heads per key/value
head: the reference and tiled kernels and ``paged_attention`` fold the group into the
rows of one product against the key head, so no allocation reaches ``G`` times the
keys (a copy of the keys per query head, what ``repeat_interleave`` or a broadcast
``matmul`` would make). The profiler (``profile_memory``) records every allocation;
the check fails on a kernel that repeats the keys (proved below).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import companion.torch as ct  # noqa: E402
from companion.numpy import scaled_dot_product_attention_reference as oracle  # noqa: E402
from companion.testing import assert_close  # noqa: E402

H, H_KV, S, D = 16, 2, 2048, 64
G = H // H_KV


def _largest_allocation(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.fixture
def decode_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, D, generator=gen)  # (B, H, 1, D)
    k = torch.randn(1, H_KV, S, D, generator=gen)  # (B, H_kv, S, D)
    v = torch.randn(1, H_KV, S, D, generator=gen)
    return q, k, v


def _kernels(q, k, v):
    cache = ct.PagedKVCache(S // 16 + 1, 16, H_KV, D)
    seq = cache.new_sequence()
    cache.append(seq, k[0], v[0])
    return {
        "reference": lambda: ct.scaled_dot_product_attention_reference(
            q, k, v, causal=True
        ),
        "tiled": lambda: ct.attention_tiled(q, k, v, causal=True),
        "paged": lambda: ct.paged_attention(q, cache, [seq], causal=True),
    }


@pytest.mark.parametrize("name", ["reference", "tiled", "paged"])
def test_grouped_decoding_never_copies_the_keys_per_query_head(decode_inputs, name):
    q, k, v = decode_inputs
    kernel = _kernels(q, k, v)[name]
    with torch.no_grad():
        largest = _largest_allocation(kernel)
    limit = G * k.numel() * k.element_size()
    assert largest < limit, f"{name} allocated {largest} bytes (G x keys: {limit})"
    # and it is grouped attention (the float64 oracle)
    expected = oracle(*(t.double().numpy() for t in (q, k, v)), causal=True)
    assert_close(kernel(), expected.astype("float32"), name=name)


def test_the_check_fails_on_keys_repeated_per_head(decode_inputs):
    q, k, v = decode_inputs

    def repeated():  # what a kernel without the fold does: G copies of the keys
        keys = k.repeat_interleave(G, dim=1)  # (B, H, S, D)
        return q @ keys.transpose(-1, -2)

    assert _largest_allocation(repeated) >= G * k.numel() * k.element_size()
