"""Multi-head latent attention (DeepSeek-V2): absorbed = expanded, cached = uncached.

The numpy float64 forward is the oracle; it is itself checked against the package's
multi-head attention (rotary part switched off), the torch version against it, and the
cache against the full sequence. DeepSeek-V2's cache sizes (its Table 1) are counted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.numpy import KVCache, MultiHeadParams, multi_head_attention
from companion.numpy.latent import (
    LatentAttentionParams,
    kv_cache_elements_per_token,
    latent_attention,
)
from companion.testing import as_backend, assert_close, assert_close_to_oracle

# (E, H, d_h, d_c, d_h^R, d_c'): small shapes, with and without a query latent
SHAPES = [
    (32, 4, 8, 12, 4, 16),
    (24, 3, 5, 7, 2, None),
    (16, 1, 4, 3, 6, 5),
]
IDS = ["q-latent", "no-q-latent", "one-head"]


def _input(B, L, E, seed=0):
    return np.random.default_rng(seed).normal(size=(B, L, E))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("L", [1, 7, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_absorbed_equals_expanded(shape, L, causal):
    params = LatentAttentionParams.random(*shape, seed=L)
    x = _input(2, L, shape[0], seed=L)
    expanded = latent_attention(x, params, causal=causal)
    absorbed = latent_attention(x, params, causal=causal, absorbed=True)
    assert_close(absorbed, expanded, name="absorbed vs expanded")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=IDS[:2])
def test_without_the_rotary_part_it_is_multi_head_attention(shape):
    """Rotary weights 0: MLA is MHA with W_q = W_DQ W_UQ, W_k = W_DKV W_UK, ..."""
    params = LatentAttentionParams.random(*shape, seed=3)
    params.w_qr = np.zeros_like(params.w_qr)
    params.w_kr = np.zeros_like(params.w_kr)
    E, H, d_h, _, d_R, _ = shape
    w_q = params.w_uq if params.w_dq is None else params.w_dq @ params.w_uq
    # MLA divides by sqrt(d_h + d_R), MHA by sqrt(d_h): folded into W_q
    w_q = w_q * math.sqrt(d_h) / math.sqrt(d_h + d_R)
    mha = MultiHeadParams(
        w_q,
        None,
        params.w_dkv @ params.w_uk,
        None,
        params.w_dkv @ params.w_uv,
        None,
        params.w_o,
        None,
        num_heads=H,
    )
    x = _input(2, 9, E, seed=4)
    expected = multi_head_attention(x, x, mha, causal=True)
    for absorbed in (False, True):
        out = latent_attention(x, params, causal=True, absorbed=absorbed)
        assert_close(out, expected, name=f"absorbed={absorbed}")


def test_the_rotary_part_makes_scores_depend_on_relative_position():
    """Shifting every position by the same offset changes nothing (RoPE is relative)."""
    params = LatentAttentionParams.random(*SHAPES[0], seed=5)
    x = _input(1, 6, SHAPES[0][0], seed=6)
    plain = latent_attention(x, params)
    shifted_cache = KVCache()
    # as if 100 positions had been seen and dropped: the new ones start at 100
    shifted_cache._seen = 100
    shifted = latent_attention(x, params, cache=shifted_cache)
    assert_close(shifted, plain, name="positions shifted by 100")
    # and the rotary part matters: positions reversed in the input change the output
    assert not np.allclose(latent_attention(x[:, ::-1], params)[:, ::-1], plain)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("chunks", [(1,) * 11, (4, 1, 1, 5), (11,)])
def test_cached_decoding_equals_the_full_sequence(shape, absorbed, chunks):
    params = LatentAttentionParams.random(*shape, seed=7)
    x = _input(2, 11, shape[0], seed=8)
    full = latent_attention(x, params)
    cache = KVCache()
    outputs, start = [], 0
    for n in chunks:
        step = x[:, start : start + n]
        outputs.append(latent_attention(step, params, cache=cache, absorbed=absorbed))
        start += n
    assert_close(np.concatenate(outputs, axis=1), full, name="cached vs full")
    # the cache holds the latent and the rotary key only
    E, H, d_h, d_c, d_R, _ = shape
    assert cache.key.shape == (2, 1, 11, d_c)
    assert cache.value.shape == (2, 1, 11, d_R)


def test_the_cache_holds_d_c_plus_d_r_numbers_per_token():
    E, H, d_h, d_c, d_R = 128, 8, 16, 24, 8
    params = LatentAttentionParams.random(E, H, d_h, d_c, d_R, seed=9)
    x = _input(1, 32, E, seed=10).astype(np.float32)
    latent, mha = KVCache(), KVCache()
    latent_attention(x, params, cache=latent)
    multi_head_attention(
        x, x, MultiHeadParams.random(E, H, dtype="float32"), causal=True, cache=mha
    )
    assert latent.capacity == mha.capacity == 32
    assert latent.nbytes == 4 * 32 * (d_c + d_R)
    assert mha.nbytes == 4 * 32 * 2 * H * d_h
    per_token = kv_cache_elements_per_token(
        "mla", num_heads=H, head_dim=d_h, latent_dim=d_c, rope_dim=d_R
    )
    assert latent.nbytes == 4 * 32 * per_token


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_torch_matches_the_numpy_oracle(dtype, absorbed):
    torch = pytest.importorskip("torch")
    from companion.torch import KVCache as TorchCache
    from companion.torch.latent import latent_attention as torch_latent

    params = LatentAttentionParams.random(*SHAPES[0], seed=11)
    x = _input(2, 10, SHAPES[0][0], seed=12)
    oracle = latent_attention(x, params)
    baseline = latent_attention(x.astype(dtype), params)  # numpy, same dtype
    out = torch_latent(as_backend(x, "torch", dtype), params, absorbed=absorbed)
    assert out.dtype == getattr(torch, dtype)
    assert_close_to_oracle(out, baseline, oracle, name=f"torch {dtype}")
    cache = TorchCache()
    steps = [
        torch_latent(
            as_backend(x[:, t : t + 1], "torch", dtype),
            params,
            cache=cache,
            absorbed=absorbed,
        )
        for t in range(10)
    ]
    assert_close_to_oracle(
        torch.cat(steps, dim=1), baseline, oracle, name=f"torch cached {dtype}"
    )


def test_numpy_float32_and_float16_against_the_oracle():
    params = LatentAttentionParams.random(*SHAPES[0], seed=13)
    x = _input(2, 8, SHAPES[0][0], seed=14)
    oracle = latent_attention(x, params)
    for dtype in ("float32", "float16"):
        out = latent_attention(x.astype(dtype), params, absorbed=True)
        assert out.dtype == np.dtype(dtype)
        assert_close(out, oracle.astype(dtype), name=dtype)


def test_deepseek_v2_cache_per_token():
    """DeepSeek-V2 (DeepSeek-AI 2024, section 3.1): 60 layers, n_h = 128 heads of
    d_h = 128, d_c = 512, d_h^R = 64. Table 1: MLA caches (d_c + d_h^R) l elements,
    "equal to GQA with only 2.25 groups"."""
    config = dict(num_heads=128, head_dim=128, num_layers=60)
    mha = kv_cache_elements_per_token("mha", **config)
    mla = kv_cache_elements_per_token("mla", latent_dim=512, rope_dim=64, **config)
    mqa = kv_cache_elements_per_token("mqa", **config)
    gqa8 = kv_cache_elements_per_token("gqa", num_kv_heads=8, **config)
    assert (mha, gqa8, mqa, mla) == (1_966_080, 122_880, 15_360, 34_560)
    assert mla == 4.5 * 128 * 60  # (9/2) d_h l
    assert mla / (2 * 128 * 60) == 2.25  # GQA with 2.25 groups
    assert round(100 * mla / mha, 2) == 1.76  # the cache shrinks to 1.76 %


def test_bad_inputs_are_clear_errors():
    params = LatentAttentionParams.random(*SHAPES[0], seed=15)
    x = _input(1, 3, SHAPES[0][0])
    with pytest.raises(TypeError, match="params"):
        latent_attention(x, object())
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 32\)"):
        latent_attention(x[..., :5], params)
    with pytest.raises(TypeError, match="x must be"):
        latent_attention(x.astype(np.int64), params)
    with pytest.raises(TypeError, match="cache"):
        latent_attention(x, params, cache=[])
    with pytest.raises(TypeError, match="absorbed"):
        latent_attention(x, params, absorbed="yes")
    with pytest.raises(ValueError, match="even"):
        LatentAttentionParams.random(32, 4, 8, 12, 3)
    with pytest.raises(ValueError, match="w_uk"):
        LatentAttentionParams(
            params.w_dq,
            params.w_uq[:, :8],
            params.w_qr,
            params.w_dkv,
            params.w_uk,
            params.w_uv,
            params.w_kr,
            params.w_o,
            num_heads=4,
        )
    with pytest.raises(ValueError, match="attention must be"):
        kv_cache_elements_per_token("bad", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache_elements_per_token("gqa", num_heads=2, head_dim=4)


def test_inputs_are_not_modified():
    params = LatentAttentionParams.random(*SHAPES[0], seed=16)
    x = _input(1, 5, SHAPES[0][0])
    before = x.copy()
    weights = {k: v.copy() for k, v in vars(params).items() if hasattr(v, "copy")}
    latent_attention(x, params, absorbed=True)
    latent_attention(x, params, cache=KVCache())
    np.testing.assert_array_equal(x, before)
    for name, w in weights.items():
        np.testing.assert_array_equal(getattr(params, name), w)


def test_folding_once_equals_folding_at_every_call():
    params = LatentAttentionParams.random(*SHAPES[0], seed=17)
    x = _input(2, 6, SHAPES[0][0], seed=18)
    folded = params.absorbed()
    H, d_c = params.num_heads, params.latent_dim
    assert folded[0].shape == (H, 16, d_c) and folded[1].shape == (H, d_c, 32)
    assert_close(
        latent_attention(x, params, absorbed=folded),
        latent_attention(x, params, absorbed=True),
        rtol=0,
        atol=0,
    )


def test_torch_takes_tensor_weights_and_folded_tensors():
    torch = pytest.importorskip("torch")
    from companion.torch.latent import latent_attention as torch_latent

    params = LatentAttentionParams.random(*SHAPES[0], seed=19)
    x = _input(1, 5, SHAPES[0][0], seed=20)
    expected = latent_attention(x, params)
    tensors = LatentAttentionParams(
        **{
            name: torch.as_tensor(value) if isinstance(value, np.ndarray) else value
            for name, value in vars(params).items()
        }
    )
    folded = tensors.absorbed()
    assert all(isinstance(t, torch.Tensor) for t in folded)
    out = torch_latent(torch.as_tensor(x), tensors, absorbed=folded)
    assert_close(out, expected, name="tensor weights, folded once")


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("chunks", [(1,) * 14, (6, 1, 7)])
def test_rolling_latent_cache_equals_sliding_window_mla(absorbed, chunks):
    params = LatentAttentionParams.random(*SHAPES[0], seed=21)
    x = _input(2, 14, SHAPES[0][0], seed=22)
    full = latent_attention(x, params, window=4)
    assert not np.allclose(full, latent_attention(x, params))  # the window matters
    cache = KVCache(max_length=4)
    outputs, start = [], 0
    for n in chunks:
        step = x[:, start : start + n]
        outputs.append(latent_attention(step, params, cache=cache, absorbed=absorbed))
        start += n
    assert_close(np.concatenate(outputs, axis=1), full)
    assert (cache.length, cache.seen) == (4, 14)
    with pytest.raises(ValueError, match="wider than the rolling cache"):
        latent_attention(x[:, :1], params, cache=cache, window=5)
