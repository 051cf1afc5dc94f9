"""TensorFlow ``attention_tiled`` on many tiles: a ``tf.while_loop`` in O(n) memory.

* peak memory: in a fresh process per size, the growth of the peak resident set while
  ``attention_tiled`` runs on ``(1, 1, n, 64)`` float32 stays far below the ``n x n``
  score matrix, and does not grow quadratically from n = 4096 to 8192;
* the fixed-size plan that the loop walks covers every visible ``(query, key)`` pair
  exactly once, with static slice sizes, for ragged blocks, causal and windows;
* the loop (forced on small shapes) equals the numpy float64 reference with grouped
  heads, masks (fully masked rows give 0), causal, window and blocks that do not divide
  the sequence: compiled by XLA eagerly, and plain under a gradient tape, eagerly and
  inside a caller's ``tf.function``, where the gradients equal the reference's.

No timing is asserted here: speed is measured by ``python -m companion.bench``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import companion.numpy as cnp
import companion.tensorflow.attention as tf_attention
from companion import _tiling
from companion.testing import assert_close

MiB = 2**20

# A child process: load everything, warm up the while-loop path on a smaller shape,
# then report how far one call at size n raises the peak resident set (ru_maxrss,
# KiB on Linux).
_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import tensorflow as tf
    import companion.tensorflow as ctf

    n = int(sys.argv[1])
    rng = np.random.default_rng(0)

    def inputs(length):
        shape = (1, 1, length, 64)
        return [
            tf.constant(rng.standard_normal(shape, dtype=np.float32))
            for _ in range(3)
        ]

    ctf.attention_tiled(*inputs(2048)).numpy()  # 16 tiles: the while loop, traced
    q, k, v = inputs(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ctf.attention_tiled(q, k, v).numpy()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (1, 1, n, 64) and np.isfinite(out).all()
    print((after - before) * 1024)
    """
)


def _peak_growth(n: int) -> int:
    """Bytes by which one call at size ``n`` raises a fresh process's peak RSS."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB")
def test_peak_memory_is_linear_not_quadratic():
    small, large = _peak_growth(4096), _peak_growth(8192)
    scores = 8192 * 8192 * 4  # one n x n float32 matrix at n = 8192: 256 MiB
    assert large < scores // 4, (
        f"attention_tiled raised the peak RSS by {large / MiB:.1f} MiB at n=8192"
    )
    # quadratic growth would add 3/4 of that matrix (192 MiB) from 4096 to 8192
    assert large - small < scores * 3 // 16, (
        f"peak RSS growth {small / MiB:.1f} MiB at n=4096, {large / MiB:.1f} MiB at "
        "n=8192"
    )


PLANS = [
    # L, S, bq, bk, causal, window
    (5, 5, 2, 2, False, None),
    (13, 11, 4, 3, True, None),
    (11, 13, 5, 4, True, 3),
    (17, 17, 3, 5, False, 4),
    (7, 29, 7, 6, True, 2),
    (29, 7, 6, 7, False, None),
    (1, 9, 1, 2, True, None),
]


@pytest.mark.parametrize("L,S,bq,bk,causal,window", PLANS)
def test_fixed_size_plan_covers_each_visible_pair_once(L, S, bq, bk, causal, window):
    fixed = tf_attention._fixed_size_plan(L, S, bq, bk, causal, window)
    count = np.zeros((L, S), int)
    starts = list(range(0, L, bq))
    for b, (r0, t0, t1) in enumerate(fixed.blocks):
        assert 0 <= r0 and r0 + bq <= L  # static size, inside the rows
        first = fixed.repeat if b == len(fixed.blocks) - 1 else 0
        assert r0 + first == starts[b]  # the rows the output keeps from this block
        rows = np.arange(r0 + first, r0 + bq)
        for c0, j0, j1, masked in fixed.tiles[t0:t1]:
            assert 0 <= c0 <= j0 < j1 <= c0 + bk <= S
            band = cnp.causal_mask(L, S, window=window) if causal else None
            if band is None:
                band = _symmetric_band(L, S, window)
            tile = band[r0 : r0 + bq, c0 : c0 + bk]
            own = np.zeros(bk, bool)
            own[j0 - c0 : j1 - c0] = True
            # an unmasked tile needs no mask: all of it is the tile's and visible
            assert masked or (own.all() and tile.all())
            count[rows, j0:j1] += band[rows, j0:j1]
    expected = cnp.causal_mask(L, S, window=window) if causal else None
    if expected is None:
        expected = _symmetric_band(L, S, window)
    np.testing.assert_array_equal(count, expected.astype(int))
    # the same work as companion._tiling.plan, but for the moved last block
    planned = _tiling.plan(L, S, bq, bk, causal, window)
    assert len(fixed.blocks) == len(planned)
    for (r0, t0, t1), block in zip(fixed.blocks[:-1], planned[:-1]):
        assert r0 == block.i0 and t1 - t0 == len(block.tiles)
        for (_, j0, j1, masked), planned_tile in zip(fixed.tiles[t0:t1], block.tiles):
            assert (j0, j1) == planned_tile[:2]
            assert masked or planned_tile[2]  # a partial tile is always masked


def _symmetric_band(L, S, window):
    """Not causal: ``|j - p| < window`` (all keys without a window)."""
    d = np.arange(S)[None, :] - (np.arange(L)[:, None] + (S - L))
    return np.ones((L, S), bool) if window is None else np.abs(d) < window


@pytest.fixture
def while_loop_always(monkeypatch):
    """Send every call with at least one tile to the ``tf.while_loop`` path."""
    monkeypatch.setattr(tf_attention, "_GRAPH_TILES", 1)
    monkeypatch.setattr(tf_attention, "_GRAPH_SCORES", 0)


CASES = {
    # name: (B, H, H_kv, L, S, block_q, block_k, causal, window, mask)
    "gqa-ragged": (2, 4, 2, 13, 11, 4, 3, False, None, None),
    "causal-L<S": (1, 2, 1, 7, 19, 3, 4, True, None, None),
    "causal-L>S": (1, 2, 2, 19, 7, 4, 3, True, None, None),
    "window-causal": (1, 3, 1, 17, 17, 5, 4, True, 3, None),
    "window-band": (2, 2, 1, 11, 13, 4, 5, False, 4, None),
    "bool-mask": (2, 4, 2, 9, 10, 4, 3, True, None, "bool"),
    "float-mask-heads": (1, 4, 1, 10, 9, 3, 4, False, 2, "float"),
    "key-padding": (2, 2, 1, 8, 12, 3, 5, False, None, "padding"),
    "block-1x1": (1, 1, 1, 5, 6, 1, 1, True, None, None),
    "blocks-larger": (1, 2, 1, 6, 5, 100, 100, False, None, "bool"),
}


def _case(name, rng, dtype):
    B, H, H_kv, L, S, block_q, block_k, causal, window, kind = CASES[name]
    q = rng.standard_normal((B, H, L, 6))
    k = rng.standard_normal((B, H_kv, S, 6))
    v = rng.standard_normal((B, H_kv, S, 5))
    mask = None
    if kind == "bool":
        mask = rng.random((B, H, L, S)) > 0.3
        mask[:, :, 1, :] = False  # a fully masked row: exactly 0
    elif kind == "float":
        mask = rng.standard_normal((H, L, S))
        mask[:, 2, :] = -np.inf
    elif kind == "padding":
        mask = rng.random((B, 1, 1, S)) > 0.4
    kwargs = {"causal": causal, "window": window}
    oracle = cnp.scaled_dot_product_attention_reference(q, k, v, mask=mask, **kwargs)
    tensors = [tf.constant(x, dtype) for x in (q, k, v)]
    if mask is not None:
        kwargs["mask"] = tf.constant(mask if kind != "float" else mask.astype(dtype))
    kwargs.update(block_q=block_q, block_k=block_k)
    return tensors, kwargs, oracle, kind


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CASES)
def test_while_loop_equals_the_reference(name, dtype, rng, while_loop_always):
    (q, k, v), kwargs, oracle, kind = _case(name, rng, dtype)
    out = tf_attention.attention_tiled(q, k, v, **kwargs)
    assert out.dtype == q.dtype
    assert_close(out, oracle, name=f"{name} {dtype}")
    if kind in ("bool", "float"):
        row = 1 if kind == "bool" else 2
        assert np.all(out.numpy()[:, :, row] == 0)


@pytest.mark.parametrize("traced", [True, False], ids=["in-function", "eager-tape"])
@pytest.mark.parametrize("name", ["gqa-ragged", "window-causal", "float-mask-heads"])
def test_while_loop_gradients(name, traced, rng, while_loop_always):
    (q, k, v), kwargs, _, _ = _case(name, rng, "float64")
    grad_out = tf.constant(rng.standard_normal(tuple(q.shape[:-1]) + (v.shape[-1],)))

    def loss(attention):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = attention(q, k, v, **kwargs)
            total = tf.reduce_sum(out * grad_out)
        return out, tape.gradient(total, [q, k, v])

    def tiled():  # a tape records it: the plain while loop, not XLA's
        return loss(tf_attention.attention_tiled)

    def reference(q, k, v, block_q, block_k, **rest):
        return tf_attention.scaled_dot_product_attention_reference(q, k, v, **rest)

    # in a caller's graph the loop is traced inline; eagerly it is its own graph
    out, grads = tf.function(tiled)() if traced else tiled()
    expected, expected_grads = loss(reference)
    assert_close(out, expected, name=f"{name} output")
    for label, got, want in zip("QKV", grads, expected_grads):
        assert_close(got, want, name=f"{name} d{label}")
