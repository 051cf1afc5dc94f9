"""The torch tiled kernel's kept running maximum stays float64-exact and deterministic.

Guards the report that book/fast.ipynb's cell ``fast-021`` (float64
``attention_tiled``, causal, ``block_q = block_k = 16``, H = 6, H_kv = 2, L = 37,
S = 53) sometimes differed from the reference by about 1e-9 (relative 2e-8) after the
forward began keeping the rows' maxima (``[t Q | -m] [K | 1]^T = S - m``). The cell is
rebuilt here in the state the notebook leaves before it: threaded numpy tiled calls
(which limit the BLAS threads through threadpoolctl), float32 calls, one and two torch
threads. Each branch of the step is forced (every later tile exact; every later tile
against the kept maximum), repeated calls must agree bit for bit (no uninitialised or
shared scratch memory, no race), and maxima far from 0 must not cost float64 digits.
"""

import numpy as np
import pytest
import torch

import companion.numpy as cn
import companion.torch as ct
import companion.torch.attention as torch_attention
from companion.testing import assert_close


def _notebook_inputs():
    """The inputs of the notebook cell: ``torch.manual_seed(0)``, then three leaves."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 37, 16, dtype=torch.float64)  # H = 6, L = 37
    k = torch.randn(2, 2, 53, 16, dtype=torch.float64)  # H_kv = 2, S = 53
    v = torch.randn(2, 2, 53, 8, dtype=torch.float64)
    return q, k, v


def _notebook_state():
    """What the cells before ``fast-021`` run: threaded numpy and float32 kernels."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 300, 64)) for _ in range(3))
    for dtype in (np.float64, np.float32):
        a, b, c = (x.astype(dtype) for x in (q, k, v))
        cn.attention_tiled(a, b, c, causal=True, block_q=64, block_k=64, num_threads=2)
    q32, k32, v32 = (torch.from_numpy(x.astype(np.float32)) for x in (q, k, v))
    ct.attention_tiled(q32, k32, v32, causal=True, block_q=16, block_k=16)


@pytest.fixture
def threads():
    """Run a test at a given torch thread count, restoring the caller's afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_notebook_cell_equals_reference_after_the_notebook_state(threads, num_threads):
    threads(num_threads)
    _notebook_state()
    q, k, v = _notebook_inputs()
    expected = ct.scaled_dot_product_attention_reference(q, k, v, causal=True)
    first = ct.attention_tiled(q, k, v, causal=True, block_q=16, block_k=16)
    assert_close(first, expected, name="O")  # float64: rtol 1e-10, atol 1e-12
    for _ in range(20):  # no state carried from one call to the next
        again = ct.attention_tiled(q, k, v, causal=True, block_q=16, block_k=16)
        assert torch.equal(again, first)


@pytest.mark.parametrize("limit", [0.0, 1.0, float(2**20), float(2**60)])
def test_both_steps_give_the_reference(monkeypatch, limit):
    # 0: every tile after a row block's first takes the exact step; 2^60: (almost)
    # every one is taken against the kept maximum, which may then lag by up to 41
    monkeypatch.setattr(torch_attention, "_STALE_MAX_LIMIT", limit)
    q, k, v = _notebook_inputs()
    q = q * torch.linspace(0.5, 3.0, 37, dtype=torch.float64)[:, None]  # maxima move
    expected = ct.scaled_dot_product_attention_reference(q, k, v, causal=True)
    tiled = ct.attention_tiled(q, k, v, causal=True, block_q=16, block_k=16)
    assert_close(tiled, expected, name=f"O, limit {limit}")
    assert_close(
        ct.attention_tiled(q, k, v, block_q=5, block_k=7),
        ct.scaled_dot_product_attention_reference(q, k, v),
        name=f"O without causal, limit {limit}",
    )


def test_maxima_far_from_zero_keep_float64_digits():
    # [t Q | -m] [K | 1]^T cancels m inside the product: with scores near 1000 the
    # rounding is about 1000 x 2^-53, still well inside float64's tolerance
    q, k, v = _notebook_inputs()
    k = k + 250.0 * torch.ones(16, dtype=torch.float64) / 4  # every score grows
    q = q + 4.0
    expected = ct.scaled_dot_product_attention_reference(q, k, v, causal=True)
    scores_max = (q @ k.repeat_interleave(3, dim=1).transpose(-1, -2)).abs().max() / 4
    assert scores_max > 500  # the maxima really are far from 0
    tiled = ct.attention_tiled(q, k, v, causal=True, block_q=16, block_k=16)
    assert_close(tiled, expected, name="O with large maxima")
