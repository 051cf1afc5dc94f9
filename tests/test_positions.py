"""Positions: sinusoidal tables, rotary embeddings (RoPE) and ALiBi, in three backends.

The numpy float64 functions are the oracle; they are checked here against their
defining formulas (the table entry by entry, RoPE as complex multiplication, the slopes
of Press et al.), and against Hugging Face's ``rotate_half`` formulation of RoPE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import registry
from companion.numpy import positions as P
from companion.numpy.attention import scaled_dot_product_attention_reference
from companion.testing import as_backend, assert_close, to_numpy

BACKENDS = registry.BACKENDS
FRAMEWORKS = [b for b in BACKENDS if b != "numpy"]


def _module(backend):
    return registry.namespace(backend)


def _float_dtype(backend, name):
    if backend == "numpy":
        return np.dtype(name)
    if backend == "torch":
        import torch

        return getattr(torch, name)
    import tensorflow as tf

    return getattr(tf, name)


# --- sinusoidal -----------------------------------------------------------------------


def test_sinusoidal_entries_follow_vaswani():
    table = P.sinusoidal_positions(7, 6, base=100.0)
    assert table.shape == (7, 6) and table.dtype == np.float64
    for p in range(7):
        for i in range(3):
            angle = p / 100.0 ** (2 * i / 6)
            assert table[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-15)
            assert table[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-15)


def test_sinusoidal_odd_dim_ends_with_a_sine():
    table = P.sinusoidal_positions(4, 5)
    assert table.shape == (4, 5)
    assert_close(table[:, 4], np.sin(np.arange(4) / 10000.0 ** (4 / 5)))


@pytest.mark.parametrize("k", [1, 3, 17])
def test_sinusoidal_offset_is_a_linear_map(k):
    """``PE[p + k] = PE[p] M_k`` with one block-rotation matrix ``M_k`` for every p."""
    L, dim = 40, 8
    table = P.sinusoidal_positions(L, dim)
    M = np.zeros((dim, dim))
    for i in range(dim // 2):
        w = k / 10000.0 ** (2 * i / dim)
        c, s = math.cos(w), math.sin(w)
        # (sin a, cos a) -> (sin(a + w), cos(a + w))
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
    assert_close(table[:-k] @ M, table[k:])


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("length, dim", [(0, 4), (1, 1), (13, 6), (50, 7)])
def test_sinusoidal_backends_match_numpy(backend, dtype, length, dim):
    got = _module(backend).sinusoidal_positions(
        length, dim, dtype=_float_dtype(backend, dtype)
    )
    expected = P.sinusoidal_positions(length, dim).astype(dtype)
    assert_close(got, expected, check_dtype=True)


def test_sinusoidal_default_dtypes():
    import tensorflow as tf
    import torch

    assert P.sinusoidal_positions(2, 2).dtype == np.float64
    ct = _module("torch")
    assert ct.sinusoidal_positions(2, 2).dtype == torch.get_default_dtype()
    assert _module("tensorflow").sinusoidal_positions(2, 2).dtype == tf.float32


# --- rotary ---------------------------------------------------------------------------


def _rope_by_complex_numbers(x, positions, base, interleaved, d):
    """RoPE as its definition: pair i as a complex number times exp(i p theta_i)."""
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    if interleaved:
        a, b = np.arange(0, d, 2), np.arange(1, d, 2)
    else:
        a, b = np.arange(d // 2), np.arange(d // 2, d)
    z = x[..., a] + 1j * x[..., b]
    z = z * np.exp(1j * np.asarray(positions)[..., None] * theta)
    out = x.copy()
    out[..., a], out[..., b] = z.real, z.imag
    return out


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 4, 2], ids=["full", "d4", "d2"])
def test_rotary_is_complex_multiplication(rng, interleaved, rotary_dim):
    x = rng.normal(size=(2, 3, 5, 8))
    positions = rng.integers(0, 1000, size=5)
    d = 8 if rotary_dim is None else rotary_dim
    got = P.rotary_embedding(
        x, positions, base=500.0, interleaved=interleaved, rotary_dim=rotary_dim
    )
    expected = _rope_by_complex_numbers(x, positions, 500.0, interleaved, d)
    assert_close(got, expected)
    assert_close(got[..., d:], x[..., d:], rtol=0, atol=0)


def test_rotary_matches_hugging_face_rotate_half(rng):
    """Llama's ``q * cos + rotate_half(q) * sin`` with ``cos = cat(cos, cos)``."""
    x = rng.normal(size=(1, 2, 6, 10))
    positions = np.arange(3, 9)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 10, 2) / 10)
    freqs = positions[:, None] * inv_freq  # (L, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (L, D)

    def rotate_half(t):
        return np.concatenate([-t[..., 5:], t[..., :5]], axis=-1)

    expected = x * np.cos(emb) + rotate_half(x) * np.sin(emb)
    assert_close(P.rotary_embedding(x, positions), expected)


def test_rotary_layouts_are_one_rotation_up_to_a_permutation(rng):
    """Interleaving the halves turns one layout into the other."""
    D = 12
    x = rng.normal(size=(3, 7, D))
    positions = rng.integers(0, 50, size=7)
    # feature 2i <- i, feature 2i + 1 <- i + D/2
    perm = np.stack([np.arange(D // 2), np.arange(D // 2, D)], axis=-1).reshape(-1)
    half = P.rotary_embedding(x, positions)
    inter = P.rotary_embedding(x[..., perm], positions, interleaved=True)
    assert_close(inter, half[..., perm])
    assert not np.allclose(P.rotary_embedding(x, positions, interleaved=True), half)


def test_rotary_preserves_norms_and_position_zero_is_identity(rng):
    x = rng.normal(size=(4, 6))
    y = P.rotary_embedding(x, np.arange(4) * 1000)
    assert_close(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    assert_close(P.rotary_embedding(x, np.zeros(4, dtype=int)), x, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 2000),
    n=st.integers(0, 2000),
    shift=st.integers(-1000, 5000),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rotary_scores_depend_only_on_the_offset(m, n, shift, interleaved, seed):
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k> for every shift s."""
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, 1, 16))

    def score(pm, pn):
        rq = P.rotary_embedding(q, np.array([pm]), interleaved=interleaved)
        rk = P.rotary_embedding(k, np.array([pn]), interleaved=interleaved)
        return float(rq[0] @ rk[0])

    a, b = score(m, n), score(m + shift, n + shift)
    # angles up to ~7000 rad: cos/sin of them are exact to ~1e-12
    assert a == pytest.approx(b, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize(
    "x_shape, positions_shape, rotary_dim",
    [
        ((5, 4), (5,), None),
        ((2, 3, 7, 8), (7,), None),
        ((2, 3, 7, 8), (2, 1, 7), None),
        ((2, 1, 1, 10), (1,), 6),
    ],
)
def test_rotary_backends_match_numpy(
    rng, backend, dtype, interleaved, x_shape, positions_shape, rotary_dim
):
    x = rng.normal(size=x_shape).astype(dtype)
    positions = rng.integers(0, 4000, size=positions_shape)
    kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim)
    got = _module(backend).rotary_embedding(
        as_backend(x, backend), as_backend(positions, backend), **kwargs
    )
    oracle = P.rotary_embedding(x.astype(np.float64), positions, **kwargs)
    # the angles are exact (float64) in every backend: one rounding of x's dtype
    assert_close(got, oracle.astype(dtype), check_dtype=True)
    assert_close(P.rotary_embedding(x, positions, **kwargs), oracle.astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_half_precision_computes_in_float32(rng, backend):
    x = rng.normal(size=(3, 8)).astype(np.float16)
    got = _module(backend).rotary_embedding(
        as_backend(x, backend), as_backend(np.arange(3), backend)
    )
    assert to_numpy(got).dtype == np.float16
    oracle = P.rotary_embedding(x.astype(np.float64), np.arange(3))
    assert_close(got, oracle.astype(np.float16))


def test_torch_rotary_is_differentiable(rng):
    import torch

    x = torch.tensor(rng.normal(size=(2, 5, 4)), requires_grad=True)
    y = _module("torch").rotary_embedding(x, torch.arange(5))
    (y**2).sum().backward()  # a rotation keeps norms: d/dx sum y^2 = 2x
    assert_close(x.grad, 2 * x.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_does_not_modify_its_input(rng, backend):
    x = rng.normal(size=(2, 4, 6))
    tensor = as_backend(x, backend)
    _module(backend).rotary_embedding(tensor, as_backend(np.arange(4), backend))
    assert_close(tensor, x, rtol=0, atol=0)


# --- ALiBi ----------------------------------------------------------------------------


def test_alibi_slopes_for_eight_heads_are_powers_of_one_half():
    assert_close(P.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=0, atol=0)


@pytest.mark.parametrize(
    "H, expected",
    [
        (1, [2.0**-8]),
        (2, [2.0**-4, 2.0**-8]),
        (6, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]),
        (
            12,
            [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)],
        ),
    ],
)
def test_alibi_slopes_follow_press_et_al(H, expected):
    """Powers of two are geometric; otherwise the paper's interleaving rule."""
    assert_close(P.alibi_slopes(H), np.array(expected))


def test_alibi_bias_is_bottom_right_aligned():
    bias = P.alibi_bias(2, 2, 4)
    m = P.alibi_slopes(2)
    distance = np.array([[2, 1, 0, 1], [3, 2, 1, 0]])
    assert_close(bias, -m[:, None, None] * distance, rtol=0, atol=0)
    assert not np.signbit(bias[:, 0, 2]).any()  # a zero, not -0.0
    assert P.alibi_bias(3, 0, 5).shape == (3, 0, 5)


def test_alibi_bias_as_a_float_mask(rng):
    """softmax(q k^T / sqrt(D) - m |i - j|), causal, by hand and by the reference."""
    H, L, S, D = 4, 3, 6, 5
    q = rng.normal(size=(2, H, L, D))
    k, v = rng.normal(size=(2, 2, H, S, D))
    bias = P.alibi_bias(H, L, S)
    got = scaled_dot_product_attention_reference(q, k, v, mask=bias, causal=True)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(D) + bias
    scores = np.where(np.tri(L, S, k=S - L, dtype=bool), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    assert_close(got, weights @ v)


def test_alibi_bias_in_torch_sdpa(rng):
    import torch
    import torch.nn.functional as F

    H, L, D = 4, 6, 8
    q, k, v = (torch.tensor(rng.normal(size=(1, H, L, D))) for _ in range(3))
    bias = _module("torch").alibi_bias(H, L, L, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = bias.masked_fill(~causal, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = _module("torch").scaled_dot_product_attention_reference(
        q, k, v, mask=bias, causal=True
    )
    assert_close(got, expected)


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("H, L, S", [(1, 1, 1), (8, 5, 5), (6, 3, 7), (3, 7, 2)])
def test_alibi_backends_match_numpy(backend, dtype, H, L, S):
    mod = _module(backend)
    dt = _float_dtype(backend, dtype)
    assert_close(
        mod.alibi_slopes(H, dtype=dt),
        P.alibi_slopes(H).astype(dtype),
        check_dtype=True,
    )
    assert_close(
        mod.alibi_bias(H, L, S, dtype=dt),
        P.alibi_bias(H, L, S).astype(dtype),
        check_dtype=True,
    )


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.sinusoidal_positions(-1, 4), ValueError, "length"),
        (lambda m: m.sinusoidal_positions(3, 0), ValueError, "dim"),
        (lambda m: m.sinusoidal_positions(3.0, 4), ValueError, "length"),
        (lambda m: m.sinusoidal_positions(3, 4, base=1.0), ValueError, "base"),
        (lambda m: m.sinusoidal_positions(3, 4, base="x"), TypeError, "base"),
        (lambda m: m.alibi_slopes(0), ValueError, "num_heads"),
        (lambda m: m.alibi_slopes(True), ValueError, "num_heads"),
        (lambda m: m.alibi_bias(4, -1, 3), ValueError, "L"),
        (lambda m: m.alibi_bias(4, 2, -3), ValueError, "S"),
    ],
    ids=[
        "negative-length",
        "zero-dim",
        "float-length",
        "base-1",
        "base-str",
        "zero-heads",
        "bool-heads",
        "negative-L",
        "negative-S",
    ],
)
def test_bad_sizes_are_rejected(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(_module(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape, positions, kwargs, error, match",
    [
        ((4, 5), np.arange(4), {}, ValueError, "even"),
        ((4, 6), np.arange(4.0), {}, TypeError, "integers"),
        ((4, 6), np.arange(3), {}, ValueError, "positions"),
        ((2, 4, 6), np.zeros((3, 4), dtype=int), {}, ValueError, "positions"),
        ((4, 6), np.arange(4), {"rotary_dim": 3}, ValueError, "rotary_dim"),
        ((4, 6), np.arange(4), {"rotary_dim": 8}, ValueError, "rotary_dim"),
        ((4, 6), np.arange(4), {"rotary_dim": 0}, ValueError, "rotary_dim"),
        ((6,), np.arange(1), {}, ValueError, "x"),
        ((4, 6), np.arange(4), {"interleaved": 1}, TypeError, "interleaved"),
    ],
    ids=[
        "odd-D",
        "float-positions",
        "short-positions",
        "positions-grow-x",
        "odd-rotary-dim",
        "rotary-dim-above-D",
        "rotary-dim-0",
        "1-D-x",
        "int-interleaved",
    ],
)
def test_bad_rotary_input_is_rejected(
    backend, x_shape, positions, kwargs, error, match
):
    x = as_backend(np.ones(x_shape), backend)
    with pytest.raises(error, match=match):
        _module(backend).rotary_embedding(x, as_backend(positions, backend), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_rejects_integer_x(backend):
    x = as_backend(np.ones((2, 4), dtype=np.int64), backend)
    with pytest.raises(TypeError, match="x must be a floating"):
        _module(backend).rotary_embedding(x, as_backend(np.arange(2), backend))


def test_tensorflow_positions_run_inside_tf_function(rng):
    import tensorflow as tf

    ctf = _module("tensorflow")
    x = tf.constant(rng.normal(size=(2, 3, 5, 8)))

    @tf.function
    def rotate(t):
        return ctf.rotary_embedding(t, tf.range(5), interleaved=True, rotary_dim=6)

    expected = P.rotary_embedding(
        x.numpy(), np.arange(5), interleaved=True, rotary_dim=6
    )
    assert_close(rotate(x), expected)
    table = tf.function(lambda: ctf.sinusoidal_positions(6, 4, dtype=tf.float64))()
    assert_close(table, P.sinusoidal_positions(6, 4))
