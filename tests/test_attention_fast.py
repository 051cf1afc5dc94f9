"""The fast defaults of ``attention_tiled`` in the three backends.

* with no tuning the block sizes come from the shapes: large tiles for one head, fewer
  query rows when many heads share a step, never an ``L x S`` step;
* explicit ``block_q`` / ``block_k`` still work at the edges (1, primes, larger than the
  sequence, not dividing it), against the numpy float64 reference;
* torch's default (key-major, all rows at once) path gives the reference's gradients
  with grouped heads, a float mask and causal, and saves no ``L x S`` tensor.

No timing is asserted here: speed is measured by ``python -m companion.bench``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

import companion.numpy as cnp
import companion.tensorflow as ctf
import companion.tensorflow.attention as tf_attention
import companion.torch as ct
import companion.torch.attention as torch_attention
from companion.testing import assert_close

BACKENDS = {
    "numpy": (cnp, np.asarray),
    "torch": (ct, torch.as_tensor),
    "tensorflow": (ctf, tf.constant),
}


@pytest.mark.parametrize("module", [torch_attention, tf_attention])
def test_default_blocks_follow_the_shapes(module):
    # one head, n = 4096: a tile of many query rows and a few hundred keys
    block_q, block_k = module._default_blocks(*_rows_and_lengths(module, 1, 4096, 4096))
    assert 256 <= block_k <= 512 and block_q >= 512
    # short sequences: one block covers them
    assert module._default_blocks(*_rows_and_lengths(module, 1, 7, 5)) == (7, 5)
    # many heads: the step stays bounded, never L x S per head
    heads, n = 64, 8192
    block_q, block_k = module._default_blocks(*_rows_and_lengths(module, heads, n, n))
    assert block_k < n and block_q < n
    assert heads * block_q * block_k <= 1 << 22


def test_numpy_default_blocks_fit_half_the_l2_cache():
    import companion.numpy.attention as np_attention

    l2 = np_attention._l2_cache_bytes()
    assert l2 >= 1 << 16
    for itemsize in (4, 8):
        block_q, block_k = np_attention._default_blocks(4096, 4096, itemsize)
        assert block_q == block_k and 128 <= block_q <= 1024
        # the largest power of two whose block of scores fits half the L2 cache
        assert block_q * block_k * itemsize <= max(l2 // 2, 128 * 128 * itemsize)
        assert block_q == 1024 or (2 * block_q) ** 2 * itemsize > l2 // 2
    # the same for short sequences: the scratch memory does not depend on n
    assert np_attention._default_blocks(7, 5, 4) == np_attention._default_blocks(
        4096, 4096, 4
    )


def _rows_and_lengths(module, heads, L, S):
    """The first argument each backend's ``_default_blocks`` takes, and L, S."""
    if module is torch_attention:
        return heads * L, L, S  # rows of all heads together
    return heads, L, S  # rows per query position


EDGE_BLOCKS = [(1, 1), (1, 64), (64, 1), (2, 3), (5, 7), (100, 100), (13, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_q,block_k", EDGE_BLOCKS)
@pytest.mark.parametrize("causal", [False, True])
def test_explicit_blocks_at_the_edges(backend, block_q, block_k, causal, rng):
    ns, to = BACKENDS[backend]
    for L, S in [(1, 1), (1, 11), (13, 13), (11, 7)]:
        q = rng.standard_normal((2, 2, L, 4))
        k = rng.standard_normal((2, 1, S, 4))
        v = rng.standard_normal((2, 1, S, 3))
        oracle = cnp.scaled_dot_product_attention_reference(q, k, v, causal=causal)
        out = ns.attention_tiled(
            to(q), to(k), to(v), causal=causal, block_q=block_q, block_k=block_k
        )
        assert_close(
            out, oracle, name=f"{backend} L={L} S={S} blocks {block_q}x{block_k}"
        )


@pytest.mark.parametrize("causal", [False, True])
def test_torch_default_path_gradients_equal_the_reference(causal, rng):
    B, H, H_kv, L, S, D = 2, 4, 2, 37, 53, 8
    q = torch.tensor(rng.standard_normal((B, H, L, D)), requires_grad=True)
    k = torch.tensor(rng.standard_normal((B, H_kv, S, D)), requires_grad=True)
    v = torch.tensor(rng.standard_normal((B, H_kv, S, D)), requires_grad=True)
    bias = torch.tensor(rng.standard_normal((H, L, S)))
    bias[:, 3, :] = -torch.inf  # a fully masked row
    grad_out = torch.tensor(rng.standard_normal((B, H, L, D)))
    kwargs = {"mask": bias, "causal": causal}
    fast = ct.attention_tiled(q, k, v, **kwargs)
    grads = torch.autograd.grad(fast, (q, k, v), grad_out)
    slow = ct.scaled_dot_product_attention_reference(q, k, v, **kwargs)
    expected = torch.autograd.grad(slow, (q, k, v), grad_out)
    assert_close(fast, slow, name="output")
    assert torch.all(fast[:, :, 3] == 0)
    for label, got, want in zip("QKV", grads, expected):
        assert_close(got, want, name=f"d{label}")


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 300)])
def test_torch_row_split_over_threads_equals_the_reference(causal, window, rng):
    """Large enough to split the rows over two threads: same output and gradients."""
    B, H, H_kv, L, S, D = 1, 2, 1, 1024, 1031, 4
    q = torch.tensor(rng.standard_normal((B, H, L, D)), requires_grad=True)
    k = torch.tensor(rng.standard_normal((B, H_kv, S, D)), requires_grad=True)
    v = torch.tensor(rng.standard_normal((B, H_kv, S, D)), requires_grad=True)
    grad_out = torch.tensor(rng.standard_normal((B, H, L, D)))
    kwargs = {"causal": causal, "window": window}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch_attention._SPLIT_SCORES <= B * H * L * S
        fast = ct.attention_tiled(q, k, v, **kwargs)
        grads = torch.autograd.grad(fast, (q, k, v), grad_out)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    slow = ct.scaled_dot_product_attention_reference(q, k, v, **kwargs)
    expected = torch.autograd.grad(slow, (q, k, v), grad_out)
    assert_close(fast, slow, name="output")
    for label, got, want in zip("QKV", grads, expected):
        assert_close(got, want, name=f"d{label}")


def test_balanced_rows_split_the_causal_triangle_evenly():
    ranges = torch_attention._balanced_rows(4096, 4096, True, None, 2)
    assert ranges[0][0] == 0 and ranges[-1][1] == 4096
    (a, cut), (_, _) = ranges
    # the first range holds about half the triangle's area: cut near 4096 / sqrt(2)
    assert abs(cut - 4096 / 2**0.5) < 16


def test_torch_default_path_saves_no_score_matrix(rng):
    L = S = 96
    q, k, v = (
        torch.tensor(rng.standard_normal((1, 2, L, 4)), requires_grad=True)
        for _ in range(3)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        out = ct.attention_tiled(q, k, v, causal=True)
    assert saved and max(saved) < L * S
    out.sum().backward()
    assert q.grad is not None


def test_tensorflow_graph_path_equals_the_eager_loop(rng):
    """Many large tiles run as a traced graph, few eagerly: both are the same loop."""
    q, k, v = (tf.constant(rng.standard_normal((1, 1, 512, 4))) for _ in range(3))
    graph = ctf.attention_tiled(q, k, v, block_q=128, block_k=128)  # 16 tiles: graph
    eager = ctf.attention_tiled(q, k, v, block_q=512, block_k=512)  # one tile: eager
    oracle = cnp.scaled_dot_product_attention_reference(q.numpy(), k.numpy(), v.numpy())
    assert_close(graph, oracle, name="graph path")
    assert_close(eager, oracle, name="eager path")
