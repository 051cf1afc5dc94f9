"""Ring attention with grouped heads reads each key/value head in place.

The local blocks fold the ``G`` query heads of a group into the rows of one matmul
against their key/value head, ``(..., H_kv, G L_c, D) @ (..., H_kv, D, S_c)``.
Splitting the queries as ``(..., H_kv, G, L_c, D)`` against ``k.unsqueeze(-3)``
instead makes ``torch.matmul`` expand and copy the keys (and values) ``G`` times: an
allocation the size of the keys per query head. The profiler (``profile_memory``)
records every allocation:

- a block of few queries against many keys (where every legitimate buffer is
  smaller than ``G`` x the keys) allocates nothing that large;
- square blocks (the ring's own: a rank's queries against a shard of as many keys)
  and the whole one-process ring, forward and backward, allocate no more bytes with
  grouped heads than multi-head attention does with the keys already repeated
  ``G`` times outside the measurement.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

from companion.numpy import scaled_dot_product_attention_reference as oracle  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch.distributed import ring  # noqa: E402

H, H_KV, D = 16, 2, 64
G = H // H_KV
SCALE = D**-0.5


def _allocations(run) -> list[int]:
    """Bytes of every allocation an operator made while ``run`` ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return [
        e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0
    ]


def _qkv(L, S, heads_kv=H_KV, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, L, D, generator=gen)  # (B, H, L, D)
    k = torch.randn(1, heads_kv, S, D, generator=gen)  # (B, H_kv, S, D)
    v = torch.randn(1, heads_kv, S, D, generator=gen)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _repeated(t):  # (B, H_kv, S, X) -> (B, H, S, X): head h reads head h // G
    return t.detach().repeat_interleave(G, dim=1).requires_grad_(t.requires_grad)


def _block_pass(q, k, v, diagonal):
    """The block's forward and backward, for the profiler; returns two runners."""
    out, lse = ring._block_forward(q, k, v, SCALE, diagonal)
    dout = torch.ones_like(out)
    delta = (dout * out).sum(-1)
    return (
        lambda: ring._block_forward(q, k, v, SCALE, diagonal),
        lambda: ring._block_backward(dout, q, k, v, lse, delta, SCALE, diagonal),
    )


def test_few_queries_many_keys_allocate_nothing_key_sized_per_query_head():
    q, k, v = _qkv(4, 1024)
    limit = G * k.numel() * k.element_size()  # the keys, once per query head
    forward, backward = _block_pass(q, k, v, diagonal=False)
    for name, run in (("forward", forward), ("backward", backward)):
        largest = max(_allocations(run))
        assert largest < limit, f"{name} allocated {largest} bytes (G x keys {limit})"


def test_the_profiler_sees_the_copy_a_broadcast_group_makes():
    # the check can fail: broadcasting the keys over the group copies them G times
    q, k, _ = _qkv(4, 1024)

    def broadcast():  # (B, H_kv, G, L, D) @ (B, H_kv, 1, D, S): k expanded G times
        return q.reshape(1, H_KV, G, 4, D) @ k.unsqueeze(-3).transpose(-1, -2)

    assert max(_allocations(broadcast)) >= G * k.numel() * k.element_size()


@pytest.mark.parametrize("diagonal", [False, True])
def test_square_blocks_allocate_no_more_than_heads_already_repeated(diagonal):
    q, k, v = _qkv(96, 96)
    grouped = [sum(_allocations(run)) for run in _block_pass(q, k, v, diagonal)]
    multi = [
        sum(_allocations(run))
        for run in _block_pass(q, _repeated(k), _repeated(v), diagonal)
    ]
    assert grouped[0] <= multi[0], f"forward: {grouped[0]} > {multi[0]} bytes"
    # multi-head gradients of the keys are G times larger; grouped ones sum in place
    assert grouped[1] <= multi[1], f"backward: {grouped[1]} > {multi[1]} bytes"


@pytest.mark.parametrize("causal", [False, True])
def test_one_process_ring_grouped_allocates_no_more_than_multi_head(
    one_process_group, causal
):
    q, k, v = _qkv(128, 128, requires_grad=True)
    k_rep, v_rep = _repeated(k), _repeated(v)

    def grouped():
        ring.ring_attention(q, k, v, causal=causal).sum().backward()

    def multi():
        ring.ring_attention(q, k_rep, v_rep, causal=causal).sum().backward()

    grouped_bytes, multi_bytes = sum(_allocations(grouped)), sum(_allocations(multi))
    assert grouped_bytes <= multi_bytes, f"{grouped_bytes} > {multi_bytes} bytes"
    # and the answer is still grouped attention in one process
    with torch.no_grad():
        out = ring.ring_attention(q, k, v, causal=causal)
    expected = oracle(*(t.detach().double().numpy() for t in (q, k, v)), causal=causal)
    assert_close(out, expected.astype("float32"))
