"""Sliding-window attention (``window=``) in the three backends.

* ``causal_mask(L, S, window=w)`` is the drawn band, in numpy, torch and TensorFlow;
* every attention function with ``window`` equals the numpy float64 reference given the
  band as an explicit bool mask, and torch's SDPA given that mask
  (``tests/test_attention_pairs.py`` runs the window cases in every dtype too);
* the tiled kernels visit only the key blocks that meet the band: the planned work is
  ``O(L * window)``, and keys outside it may be NaN without reaching the output;
* the torch backward with a window equals autograd through the reference;
* a bad ``window`` is a ``TypeError`` / ``ValueError`` naming it.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

import companion.numpy as cnp
import companion.tensorflow as ctf
import companion.torch as ct
from companion import _tiling
from companion.testing import assert_close

BACKENDS = {"numpy": cnp, "torch": ct, "tensorflow": ctf}
CONVERT = {
    "numpy": np.asarray,
    "torch": torch.as_tensor,
    "tensorflow": tf.constant,
}


def band(L, S, causal, window):
    """The visibility rule written entry by entry (the docstrings' definition)."""
    keep = np.zeros((L, S), dtype=bool)
    for i in range(L):
        p = i + (S - L)  # absolute position of query i
        for j in range(S):
            if causal:
                keep[i, j] = p - window < j <= p
            else:
                keep[i, j] = abs(p - j) < window
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mask_window_is_the_drawn_band(backend):
    drawn = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    mask = np.asarray(BACKENDS[backend].causal_mask(5, 5, window=2))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, drawn)
    # L < S: the queries are the last L positions
    np.testing.assert_array_equal(
        np.asarray(BACKENDS[backend].causal_mask(2, 5, window=3)),
        [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]],
    )
    # a window longer than the sequence is plain causal
    np.testing.assert_array_equal(
        np.asarray(BACKENDS[backend].causal_mask(4, 6, window=50)),
        np.asarray(BACKENDS[backend].causal_mask(4, 6)),
    )


CASES = [
    # (L, S, causal, window)
    (9, 9, True, 3),
    (4, 11, True, 5),
    (10, 6, True, 2),
    (9, 9, False, 2),
    (5, 12, False, 4),
    (7, 7, True, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,causal,window", CASES)
def test_window_equals_the_explicit_band_mask(backend, L, S, causal, window, rng):
    q = rng.standard_normal((2, 4, L, 8))
    k = rng.standard_normal((2, 2, S, 8))
    v = rng.standard_normal((2, 2, S, 5))
    keep = band(L, S, causal, window)
    oracle = cnp.scaled_dot_product_attention_reference(q, k, v, mask=keep)
    ns, to = BACKENDS[backend], CONVERT[backend]
    tq, tk, tv = to(q), to(k), to(v)
    for name, kwargs in [
        ("reference", {}),
        ("tiled, blocks 3 x 2", {"block_q": 3, "block_k": 2}),
        ("tiled, default blocks", {}),
    ]:
        fn = (
            ns.scaled_dot_product_attention_reference
            if name == "reference"
            else ns.attention_tiled
        )
        out = fn(tq, tk, tv, causal=causal, window=window, **kwargs)
        assert_close(out, oracle, name=f"{backend} {name}, window={window}")
    weights = ns.attention_weights(tq, tk, causal=causal, window=window)
    hidden = np.asarray(weights)[..., ~keep]
    assert np.all(hidden == 0), "a weight outside the band is not 0"


@pytest.mark.parametrize("L,S,causal,window", CASES)
def test_torch_window_equals_sdpa_with_the_band_as_bool_mask(L, S, causal, window, rng):
    q, k, v = (torch.tensor(rng.standard_normal((1, 2, n, 8))) for n in (L, S, S))
    keep = torch.as_tensor(band(L, S, causal, window))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    rows_seen = keep.any(dim=-1)  # SDPA gives NaN for a row that sees nothing
    for fn in (ct.scaled_dot_product_attention_reference, ct.attention_tiled):
        out = fn(q, k, v, causal=causal, window=window)
        assert_close(out[..., rows_seen, :], expected[..., rows_seen, :])
        assert torch.all(out[..., ~rows_seen, :] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_tiled_window_gradients_match_autograd_through_reference(causal, rng):
    q, k, v = (
        torch.tensor(rng.standard_normal((1, 2, 11, 4)), requires_grad=True)
        for _ in range(3)
    )
    grad_out = torch.tensor(rng.standard_normal((1, 2, 11, 4)))
    kwargs = {"causal": causal, "window": 3}
    tiled = torch.autograd.grad(
        ct.attention_tiled(q, k, v, block_q=4, block_k=3, **kwargs), (q, k, v), grad_out
    )
    expected = torch.autograd.grad(
        ct.scaled_dot_product_attention_reference(q, k, v, **kwargs),
        (q, k, v),
        grad_out,
    )
    for label, got, want in zip("QKV", tiled, expected):
        assert_close(got, want, name=f"d{label}")


def _planned_work(L, S, block_q, block_k, causal, window):
    """Score entries the tiled kernels compute: the area of the planned tiles."""
    return sum(
        (block.i1 - block.i0) * (j1 - j0)
        for block in _tiling.plan(L, S, block_q, block_k, causal, window)
        for j0, j1, _ in block.tiles
    )


@pytest.mark.parametrize("causal", [True, False])
def test_planned_work_grows_with_n_times_window(causal):
    window, block = 64, 32
    work = {
        n: _planned_work(n, n, block, block, causal, window) for n in (1024, 2048, 4096)
    }
    for n, count in work.items():
        needed = _tiling.visible_counts(n, n, causal, window)
        reach = window if causal else 2 * window
        # every visible pair is computed; at most two blocks' worth of extra per row
        assert needed <= count <= n * (reach + 2 * block), (n, count)
    # linear in n, not quadratic: doubling n doubles the work (up to the edges)
    assert work[4096] / work[2048] == pytest.approx(2, rel=0.02)
    assert work[4096] < 0.1 * 4096**2


def test_plan_covers_exactly_the_visible_pairs():
    """Every visible pair lies in exactly one planned tile; skipped tiles hold none."""
    for L, S, bq, bk, causal, window in [
        (13, 13, 3, 4, True, 5),
        (7, 20, 2, 3, True, 4),
        (20, 7, 4, 2, True, 3),
        (11, 15, 5, 4, False, 3),
        (9, 9, 4, 4, True, None),
        (9, 9, 4, 4, False, None),
    ]:
        covered = np.zeros((L, S), dtype=int)
        for block in _tiling.plan(L, S, bq, bk, causal, window):
            for j0, j1, full in block.tiles:
                covered[block.i0 : block.i1, j0:j1] += 1
                inside = band(L, S, causal, window or L + S)[block.i0 : block.i1, j0:j1]
                assert inside.any(), "a planned tile holds no visible pair"
                assert full == inside.all(), "a tile's 'full' flag is wrong"
        keep = band(L, S, causal, window or L + S)
        assert covered.max() <= 1
        assert np.all(covered[keep] == 1), "a visible pair is in no tile"


def test_key_plan_covers_exactly_the_visible_pairs():
    """The key-major plan (torch's kernel): same rule; 'full' rows need no mask."""
    for L, S, bq, bk, causal, window in [
        (13, 13, 3, 4, True, 5),
        (7, 20, 2, 3, True, 4),
        (20, 7, 4, 2, True, 3),
        (11, 15, 5, 4, False, 3),
        (9, 9, 100, 4, True, None),
        (9, 9, 4, 4, False, None),
        (16, 16, 100, 8, True, 2),
    ]:
        keep = band(L, S, causal, window or L + S)
        covered = np.zeros((L, S), dtype=int)
        for j0, j1, chunks in _tiling.key_plan(L, S, bq, bk, causal, window):
            for i0, i1, full in chunks:
                assert i1 - i0 <= bq
                covered[i0:i1, j0:j1] += 1
                inside = keep[i0:i1, j0:j1]
                assert inside.any(axis=1).all(), "a planned row sees nothing here"
                if full:
                    assert inside.all(), "a chunk marked full has hidden pairs"
        assert covered.max() <= 1
        assert np.all(covered[keep] == 1), "a visible pair is in no chunk"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_tiled_never_reads_keys_outside_the_window_blocks(backend, causal, rng):
    """Keys in blocks no query's band meets are NaN: the output stays finite."""
    L = S = 64
    window, block = 4, 8
    q = rng.standard_normal((1, 1, L, 4))
    k, v = rng.standard_normal((1, 1, S, 4)), rng.standard_normal((1, 1, S, 4))
    # query block 6 (rows 48..55) needs keys 45..55 (causal) or 45..58 (band)
    rows = slice(48, 56)
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[..., :40, :], v_nan[..., :40, :] = np.nan, np.nan
    to = CONVERT[backend]
    out = np.asarray(
        BACKENDS[backend].attention_tiled(
            to(q),
            to(k_nan),
            to(v_nan),
            causal=causal,
            window=window,
            block_q=block,
            block_k=block,
        )
    )
    oracle = cnp.scaled_dot_product_attention_reference(
        q, k, v, causal=causal, window=window
    )
    assert_close(out[..., rows, :], oracle[..., rows, :], name="rows far from NaN keys")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "window,error",
    [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)],
)
def test_bad_window_is_named(backend, window, error):
    ns, to = BACKENDS[backend], CONVERT[backend]
    x = to(np.ones((1, 2, 3, 4)))
    calls = [
        lambda: ns.causal_mask(3, 3, window=window),
        lambda: ns.attention_weights(x, x, window=window),
        lambda: ns.scaled_dot_product_attention_reference(x, x, x, window=window),
        lambda: ns.attention_tiled(x, x, x, window=window),
    ]
    for call in calls:
        with pytest.raises(error, match="window"):
            call()
