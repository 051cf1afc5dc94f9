"""FlashAttention's test grid, run on every attention kernel of every backend.

The practice of Dao-AILab/flash-attention's ``tests/test_flash_attn.py``, adopted as
facts and written here: its (query length, key length) pairs, including ``(1, 1)``,
``(239, 1)`` (more queries than keys: causal rows that see nothing), ``(3, 799)``,
primes and sizes that no block divides, and ``(1023, 1024)`` / ``(1024, 1023)``;
causal masks bottom-right aligned; local windows given as ``(left, right)``
(``window_size``: query ``p`` sees ``p - left <= j <= p + right``, ``-1`` unbounded),
with the single-int window as the shorthand ``causal=True, window=W`` = ``(W - 1, 0)``
and ``causal=False, window=W`` = ``(W - 1, W - 1)``; multi-head, grouped and
multi-query heads; key padding; fully masked rows. And its error rule: a kernel's
error against the float64 oracle is at most twice the error of the plain float32
reference computation (numpy's, the same formula in float32), plus a small absolute
tolerance (``companion.testing.assert_close_to_oracle``).

Forward: every kernel (reference, tiled, paged) of numpy, torch and TensorFlow.
Backward: torch's tiled kernel (its hand-written backward) and reference (autograd),
TensorFlow's under a tape, against float64 autograd through torch's reference. The
two largest shapes run on few heads and ``D = 16`` to keep the file fast.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _fa_grid_cases import HEADS, SHAPES

import companion.numpy as cnp
from companion import _tiling
from companion.testing import as_backend, assert_close, assert_close_to_oracle

# id: (causal, window)
MODES = {
    "full": (False, None),
    "causal": (True, None),
    "causal-w17": (True, 17),  # the shorthand: (16, 0)
    "w9": (False, 9),  # the shorthand: (8, 8)
    "local-5-3": (False, (5, 3)),
    "local-40-inf": (False, (40, -1)),
    "causal-local-0-7": (True, (0, 7)),  # causal caps right at 0: the diagonal only
}
BIG = 1000


def _case(L, S, mode, seed=0):
    """Inputs of one grid point: heads cycle over HEADS, key padding on every other."""
    index = SHAPES.index((L, S)) + list(MODES).index(mode)
    H, H_kv = HEADS[index % 3]
    D = 32
    if max(L, S) > BIG:
        (H, H_kv), D = ((2, 1) if index % 2 else (2, 2)), 16
    rng = np.random.default_rng(seed + 7 * index)
    B = 2
    q = rng.standard_normal((B, H, L, D))
    k = rng.standard_normal((B, H_kv, S, D))
    v = rng.standard_normal((B, H_kv, S, D))
    mask = None
    if index % 2:  # key padding: the second sequence keeps a third (S = 1: none)
        mask = cnp.padding_mask(np.array([S, S // 3]), S)  # (B, 1, 1, S)
    return q, k, v, mask


def _float32(*arrays):
    return [
        None if a is None else (a if a.dtype == bool else a.astype(np.float32))
        for a in arrays
    ]


def _forward_kernels(backend):
    """name -> f(q, k, v, mask, causal, window) on that backend's tensors."""
    if backend == "numpy":
        lib = cnp
    elif backend == "torch":
        pytest.importorskip("torch")
        import companion.torch as lib
    else:
        pytest.importorskip("tensorflow")
        import companion.tensorflow as lib
    return {
        "reference": lambda q, k, v, m, c, w: (
            lib.scaled_dot_product_attention_reference(
                q, k, v, mask=m, causal=c, window=w
            )
        ),
        "tiled": lambda q, k, v, m, c, w: lib.attention_tiled(
            q, k, v, mask=m, causal=c, window=w
        ),
    }


@functools.lru_cache(maxsize=None)
def _expected(L, S, mode, padded=True):
    """The float64 oracle and the plain float32 reference of a grid point (computed
    once for the three backends)."""
    causal, window = MODES[mode]
    q, k, v, mask = _case(L, S, mode)
    mask = mask if padded else None
    oracle = cnp.scaled_dot_product_attention_reference(
        q, k, v, mask=mask, causal=causal, window=window
    )
    q32, k32, v32, m32 = _float32(q, k, v, mask)
    baseline = cnp.scaled_dot_product_attention_reference(
        q32, k32, v32, mask=m32, causal=causal, window=window
    )
    return oracle, baseline, (q32, k32, v32, m32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L, S", SHAPES, ids=[f"{L}x{S}" for L, S in SHAPES])
@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
def test_forward_grid(backend, L, S, mode):
    causal, window = MODES[mode]
    oracle, baseline, (q32, k32, v32, m32) = _expected(L, S, mode)
    args = [as_backend(a, backend) for a in (q32, k32, v32)]
    m = None if m32 is None else as_backend(m32, backend)
    for name, kernel in _forward_kernels(backend).items():
        out = kernel(*args, m, causal, window)
        assert_close_to_oracle(out, baseline, oracle, name=f"{backend} {name}")


PAGED_MODES = ["full", "causal", "causal-w17", "local-5-3"]
PAGED_SHAPES = [s for s in SHAPES if s[0] <= s[1]]  # queries: the last L positions


@pytest.mark.parametrize("mode", PAGED_MODES)
@pytest.mark.parametrize(
    "L, S", PAGED_SHAPES, ids=[f"{L}x{S}" for L, S in PAGED_SHAPES]
)
@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
def test_paged_grid(backend, L, S, mode):
    # the paged kernel: the L queries are the last L positions of each cached sequence
    causal, window = MODES[mode]
    if backend == "numpy":
        import companion.numpy.paged as paged
    elif backend == "torch":
        pytest.importorskip("torch")
        import companion.torch.paged as paged
    else:
        pytest.importorskip("tensorflow")
        import companion.tensorflow.paged as paged
    oracle, baseline, (q32, k32, v32, _) = _expected(L, S, mode, padded=False)
    H_kv = k32.shape[1]
    block = 16
    cache = paged.PagedKVCache(2 * -(-S // block) + 2, block, H_kv, k32.shape[-1])
    seqs = []
    for b in range(2):
        seq = cache.new_sequence()
        cache.append(seq, as_backend(k32[b], backend), as_backend(v32[b], backend))
        seqs.append(seq)
    out = paged.paged_attention(
        as_backend(q32, backend), cache, seqs, causal=causal, window=window
    )
    assert_close_to_oracle(out, baseline, oracle, name=f"{backend} paged")


# --- backward ---------------------------------------------------------------------

BACKWARD_SHAPES = [(1, 1), (239, 1), (3, 799), (113, 203), (128, 217), (1023, 1024)]
BACKWARD_MODES = ["full", "causal", "causal-w17", "local-5-3"]


def _torch_grads(fn, q, k, v, mask, grad_out):
    import torch

    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    m = None if mask is None else torch.as_tensor(mask)
    out = fn(*leaves, m)
    return torch.autograd.grad(out, leaves, torch.as_tensor(grad_out))


@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize(
    "L, S", BACKWARD_SHAPES, ids=[f"{L}x{S}" for L, S in BACKWARD_SHAPES]
)
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_backward_grid(backend, L, S, mode):
    pytest.importorskip("torch")
    import companion.torch as ct

    causal, window = MODES[mode]
    q, k, v, mask = _case(L, S, mode, seed=1)
    grad_out = np.random.default_rng(2).standard_normal(q.shape[:-1] + v.shape[-1:])

    def reference(q_, k_, v_, m_):
        return ct.scaled_dot_product_attention_reference(
            q_, k_, v_, mask=m_, causal=causal, window=window
        )

    oracle = _torch_grads(reference, q, k, v, mask, grad_out)  # float64
    q32, k32, v32, m32, g32 = _float32(q, k, v, mask, grad_out)
    baseline = _torch_grads(reference, q32, k32, v32, m32, g32)
    if backend == "torch":

        def tiled(q_, k_, v_, m_):
            return ct.attention_tiled(q_, k_, v_, mask=m_, causal=causal, window=window)

        kernels = {
            "tiled": _torch_grads(tiled, q32, k32, v32, m32, g32),
            "reference": baseline,
        }
    else:
        tf = pytest.importorskip("tensorflow")
        import companion.tensorflow as ctf

        kernels = {}
        for name, fn in (
            ("tiled", ctf.attention_tiled),
            ("reference", ctf.scaled_dot_product_attention_reference),
        ):
            leaves = [tf.Variable(a) for a in (q32, k32, v32)]
            with tf.GradientTape() as tape:
                out = fn(*leaves, mask=m32, causal=causal, window=window)
            kernels[name] = tape.gradient(
                out, leaves, output_gradients=tf.constant(g32)
            )
    for name, grads in kernels.items():
        for label, got, base, exact in zip("qkv", grads, baseline, oracle):
            assert_close_to_oracle(
                got,
                base,
                exact,
                floor=1e-5,
                name=f"{backend} {name} d{label}",
            )


# --- the window pair: FlashAttention's definition, and the shorthand ----------------


@pytest.mark.parametrize("window", [(0, 0), (3, 2), (0, -1), (-1, 4), (6, None)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S", [(5, 9), (9, 5), (7, 7)])
def test_window_pair_is_flash_attentions_window_size(L, S, causal, window):
    left, right = (-1 if w is None else w for w in window)
    p = np.arange(L)[:, None] + (S - L)  # bottom-right positions
    j = np.arange(S)[None, :]
    expected = np.ones((L, S), bool)
    if left >= 0:
        expected &= j >= p - left
    if right >= 0:
        expected &= j <= p + right
    if causal:
        expected &= j <= p
    q, k = np.ones((1, L, 2)), np.ones((1, S, 2))
    weights = cnp.attention_weights(q, k, causal=causal, window=window)[0]
    np.testing.assert_array_equal(weights > 0, expected)


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
@pytest.mark.parametrize("W", [1, 2, 5])
def test_single_window_is_the_shorthand_for_its_pair(backend, W):
    lib = {"numpy": lambda: cnp}
    if backend == "torch":
        pytest.importorskip("torch")
        import companion.torch as lib
    elif backend == "tensorflow":
        pytest.importorskip("tensorflow")
        import companion.tensorflow as lib
    else:
        lib = cnp
    np.testing.assert_array_equal(
        np.asarray(lib.causal_mask(6, 9, window=W)),
        np.asarray(lib.causal_mask(6, 9, window=(W - 1, 0))),
    )
    rng = np.random.default_rng(W)
    q, k = (as_backend(rng.standard_normal((2, n, 4)), backend) for n in (6, 9))
    for causal, pair in ((True, (W - 1, 0)), (False, (W - 1, W - 1))):
        assert_close(
            lib.attention_weights(q, k, causal=causal, window=W),
            lib.attention_weights(q, k, causal=causal, window=pair),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize(
    "window, error",
    [
        ((1,), ValueError),
        ((1, 2, 3), ValueError),
        ((-2, 0), ValueError),
        ((1.5, 0), TypeError),
        ((True, 0), TypeError),
    ],
)
def test_bad_window_pair_is_a_clear_error(window, error):
    with pytest.raises(error, match="window"):
        _tiling.check_window(window)
    q = np.ones((1, 3, 2))
    with pytest.raises(error, match="window"):
        cnp.attention_tiled(q, q, q, window=window)


def test_window_pair_through_a_rolling_cache():
    # multi-head decoding with (W - 1, 0) through KVCache(max_length=W) equals the
    # shorthand on the whole sequence; a pair that looks further back is refused
    x = np.random.default_rng(0).standard_normal((1, 6, 8))
    params = cnp.MultiHeadParams.random(8, 2, seed=0)
    whole = cnp.multi_head_attention(x, x, params, causal=True, window=3)
    cache = cnp.KVCache(max_length=3)
    steps = [
        cnp.multi_head_attention(
            x[:, t : t + 1],
            x[:, t : t + 1],
            params,
            causal=True,
            cache=cache,
            window=(2, 0),
        )
        for t in range(6)
    ]
    assert_close(np.concatenate(steps, axis=1), whole)
    with pytest.raises(ValueError, match="window=\\(3, 0\\) looks further back"):
        cnp.multi_head_attention(
            x[:, :1],
            x[:, :1],
            params,
            causal=True,
            cache=cnp.KVCache(max_length=3),
            window=(3, 0),
        )
