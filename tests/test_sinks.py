"""Attention sinks (StreamingLLM, issue 26): the first ``sinks`` positions plus the
last ``window``, in three backends.

With keys rotated at absolute positions, decoding through a ``SinkCache`` (a prefill,
a chunk that straddles the sinks, then one token at a time) equals one full pass under
``sink_mask``. With the paper's positions (the key's slot in the cache) each step
equals attention over the kept tokens rotated at ``0 .. S - 1``, computed directly.
The cache keeps exactly the sinks and the window, and bad input is a ``ValueError``
naming the argument; a failed append leaves the cache as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion import registry
from companion.numpy import rotary_embedding as rotate
from companion.testing import as_backend, assert_close, to_numpy

SINKS, WINDOW, N = 2, 4, 15
STEPS = [(0, 1), (1, 4), (4, 7)] + [(t, t + 1) for t in range(7, N)]


def _qkv(seed=0, B=2, H=2, D=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, N, D)) for _ in range(3))


def test_sink_mask_by_hand():
    from companion.numpy import sink_mask

    mask = sink_mask(np.arange(8), np.arange(8), sinks=2, window=3)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 1, 0],
            [1, 1, 0, 0, 0, 1, 1, 1],
        ],
        dtype=bool,
    )
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_cached_decoding_equals_the_full_pass_with_the_sink_mask(backend):
    mod = registry.namespace(backend)
    q, k, v = _qkv()
    positions = np.arange(N)
    q, k = rotate(q, positions), rotate(k, positions)  # absolute positions
    oracle_mod = registry.namespace("numpy")
    mask = oracle_mod.sink_mask(positions, positions, sinks=SINKS, window=WINDOW)
    full = oracle_mod.scaled_dot_product_attention_reference(q, k, v, mask=mask)
    plain = oracle_mod.scaled_dot_product_attention_reference(q, k, v, causal=True)
    assert not np.allclose(full, plain)  # the sinks and the window matter here
    cache = mod.SinkCache(SINKS, WINDOW)
    outputs = []
    for start, stop in STEPS:
        qb, kb, vb = (as_backend(t[:, :, start:stop], backend) for t in (q, k, v))
        keys, values = cache.append(kb, vb)
        assert cache.seen == stop and cache.length == min(stop, SINKS + WINDOW)
        queries = as_backend(np.arange(start, stop), backend)
        step_mask = mod.sink_mask(
            queries, cache.key_positions, sinks=SINKS, window=WINDOW
        )
        outputs.append(
            to_numpy(
                mod.scaled_dot_product_attention_reference(
                    qb, keys, values, mask=step_mask
                )
            )
        )
    assert_close(np.concatenate(outputs, axis=2), full, rtol=1e-12, atol=1e-13)
    kept = np.r_[0:SINKS, N - WINDOW : N]
    assert np.array_equal(to_numpy(cache.key), k[:, :, kept])
    assert np.array_equal(to_numpy(cache.value), v[:, :, kept])
    assert np.array_equal(to_numpy(cache.key_positions), kept)


def test_paper_positions_are_the_slots_in_the_cache():
    """StreamingLLM rotates by position in the cache: each step equals attention over
    the kept tokens (unrotated keys) rotated at ``0 .. S - 1``, the query at the last
    slot; no distance exceeds ``sinks + window - 1``."""
    from companion import numpy as cn

    q, k, v = _qkv(seed=1)
    cache = cn.SinkCache(SINKS, WINDOW)
    for t in range(N):
        keys, values = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        slots = cache.slot_positions
        assert slots.max() < SINKS + WINDOW
        got = cn.scaled_dot_product_attention_reference(
            rotate(q[:, :, t : t + 1], slots[-1:]), rotate(keys, slots), values
        )
        kept = [p for p in range(t + 1) if p < SINKS or t - p < WINDOW]
        n = len(kept)
        expected = cn.scaled_dot_product_attention_reference(
            rotate(q[:, :, t : t + 1], [n - 1]),
            rotate(k[:, :, kept], np.arange(n)),
            v[:, :, kept],
        )
        assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_no_sinks_is_a_rolling_window():
    from companion import numpy as cn

    q, k, v = _qkv(seed=2)
    cache, rolling = cn.SinkCache(0, WINDOW), cn.KVCache(max_length=WINDOW)
    for t in range(N):
        a = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        b = rolling.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "sinks, window, match",
    [(5, 4, "sinks"), (-1, 4, "sinks"), (0, 0, "window")],
)
def test_bad_sizes_are_value_errors(sinks, window, match):
    from companion import numpy as cn

    with pytest.raises(ValueError, match=match):
        cn.SinkCache(sinks, window)
    with pytest.raises(ValueError, match=match):
        cn.sink_mask(np.arange(3), np.arange(3), sinks=sinks, window=window)


def test_bad_positions_and_failed_appends():
    from companion import numpy as cn

    with pytest.raises(ValueError, match="query_positions"):
        cn.sink_mask(np.arange(3.0), np.arange(3), sinks=1, window=2)
    with pytest.raises(ValueError, match="key_positions"):
        cn.sink_mask(np.arange(3), np.zeros((2, 2), int), sinks=1, window=2)
    _, k, v = _qkv(seed=3)
    cache = cn.SinkCache(SINKS, WINDOW)
    cache.append(k[:, :, :5], v[:, :, :5])
    key, seen = cache.key.copy(), cache.seen
    with pytest.raises((TypeError, ValueError)):
        cache.append(k[:, :, 5:6].astype(np.float32), v[:, :, 5:6])
    with pytest.raises((TypeError, ValueError)):
        cache.append(k[:1, :, 5:6], v[:, :, 5:6])
    assert cache.seen == seen and np.array_equal(cache.key, key)
    cache.reset()
    assert cache.seen == 0 and cache.key is None


# --- learned sink logits (GPT-OSS) ------------------------------------------------


@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_sink_logits_equal_gpt_oss_eager_attention(H, H_kv):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from companion import numpy as cn

    rng = np.random.default_rng(4)
    B, L, D = 2, 6, 8
    q = rng.standard_normal((B, H, L, D))
    k, v = rng.standard_normal((2, B, H_kv, L, D))
    sinks = rng.standard_normal(H)
    module = torch.nn.Module()
    module.sinks = torch.nn.Parameter(torch.tensor(sinks))
    module.num_key_value_groups = H // H_kv
    module.eval()
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    theirs, _ = eager_attention_forward(
        module, *(torch.tensor(a) for a in (q, k, v)), causal, scaling=D**-0.5
    )  # (B, L, H, D)
    ours = cn.attention_with_sinks(q, k, v, sinks, causal=True)  # (B, H, L, D)
    assert_close(ours, theirs.detach().numpy().transpose(0, 2, 1, 3), rtol=1e-12)
    plain = cn.scaled_dot_product_attention_reference(q, k, v, causal=True)
    assert not np.allclose(ours, plain)
    # a sink of -inf weight is plain attention
    none = cn.attention_with_sinks(q, k, v, np.full(H, -1e300), causal=True)
    assert_close(none, plain, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_sink_logits_backends_agree(backend):
    from companion import numpy as cn

    mod = registry.namespace(backend)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 5, 8))
    k, v = rng.standard_normal((2, 1, 2, 7, 8))
    sinks = rng.standard_normal(4)
    mask = rng.standard_normal((4, 5, 7))  # a float mask, e.g. ALiBi
    kwargs = dict(causal=True)
    expected = cn.attention_with_sinks(q, k, v, sinks, mask=mask, **kwargs)
    got = mod.attention_with_sinks(
        *(as_backend(a, backend) for a in (q, k, v, sinks)),
        mask=as_backend(mask, backend),
        **kwargs,
    )
    assert_close(got, expected, rtol=1e-12, atol=1e-13)
    bool_mask = rng.random((5, 7)) < 0.5
    bool_mask[0] = False  # a row that sees nothing: all weight on the sink
    expected = cn.attention_with_sinks(q, k, v, sinks, mask=bool_mask)
    assert np.array_equal(expected[..., 0, :], np.zeros((1, 4, 8)))
    got = mod.attention_with_sinks(
        *(as_backend(a, backend) for a in (q, k, v, sinks)),
        mask=as_backend(bool_mask, backend),
    )
    assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_sink_logits_get_gradients_and_bad_shapes_are_value_errors():
    torch = pytest.importorskip("torch")
    from companion import numpy as cn
    from companion import torch as ct

    q, k, v = torch.randn(3, 1, 2, 4, 8, dtype=torch.float64)
    sinks = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ct.attention_with_sinks(q, k, v, sinks, causal=True).sum().backward()
    assert torch.all(torch.isfinite(sinks.grad)) and torch.any(sinks.grad != 0)
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    with pytest.raises(ValueError, match="sinks"):
        cn.attention_with_sinks(qn, kn, vn, np.zeros(3))
    with pytest.raises(ValueError, match="H_kv"):
        cn.attention_with_sinks(
            qn, kn[:, :1].repeat(3, 1), vn[:, :1].repeat(3, 1), np.zeros(2)
        )
    with pytest.raises(ValueError, match="mask"):
        cn.attention_with_sinks(qn, kn, vn, np.zeros(2), mask=np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="causal"):
        cn.attention_with_sinks(qn, kn, vn, np.zeros(2), causal="yes")


# --- learned sink logits as an option of multi-head attention ----------------------
# ``sinks=`` of ``multi_head_attention`` (three backends) and ``sink_logits=True`` of
# the torch module: the math of ``attention_with_sinks`` on the projected heads.

E, H_MHA, STEPS_MHA = 16, 4, [(0, 3), (3, 4), (4, 7), (7, 8)]


def _mha_inputs(num_kv_heads, seed=6, L=8):
    from companion import numpy as cn

    rng = np.random.default_rng(seed)
    params = cn.MultiHeadParams.random(E, H_MHA, num_kv_heads, seed=seed)
    x = rng.standard_normal((2, L, E))
    sinks = rng.standard_normal(H_MHA)
    return params, x, sinks


def _heads_by_hand(params, x):
    """The projected heads ``q (B, H, L, D)``, ``k, v (B, H_kv, L, D)``."""

    def split(w, b, heads):
        y = x @ w + b  # (B, L, heads * D)
        B, L, width = y.shape
        return y.reshape(B, L, heads, width // heads).transpose(0, 2, 1, 3)

    q = split(params.w_q, params.b_q, params.num_heads)
    k = split(params.w_k, params.b_k, params.num_kv_heads)
    v = split(params.w_v, params.b_v, params.num_kv_heads)
    return q, k, v


def _merge(params, heads):
    B, H, L, D_v = heads.shape
    return heads.transpose(0, 2, 1, 3).reshape(B, L, H * D_v) @ params.w_o + params.b_o


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_mha_sinks_equal_attention_with_sinks_on_the_heads(num_kv_heads):
    from companion import numpy as cn

    params, x, sinks = _mha_inputs(num_kv_heads)
    q, k, v = _heads_by_hand(params, x)
    for kwargs in (dict(causal=True), dict(causal=True, window=3), dict()):
        heads = cn.attention_with_sinks(q, k, v, sinks, **kwargs)
        expected = _merge(params, heads)
        got, weights = cn.multi_head_attention(
            x, x, params, sinks=sinks, return_weights=True, **kwargs
        )
        assert_close(got, expected, rtol=1e-12, atol=1e-13)
        # the weights of a row sum to less than 1: the sink's share is missing
        assert np.all(weights.sum(-1) < 1)
        plain = cn.multi_head_attention(x, x, params, **kwargs)
        assert not np.allclose(got, plain)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_mha_sinks_of_minus_infinity_are_plain_attention(backend):
    mod = registry.namespace(backend)
    params, x, _ = _mha_inputs(2)
    xb = as_backend(x, backend)
    for kwargs in (dict(causal=True), dict(causal=True, window=3)):
        plain = mod.multi_head_attention(xb, xb, params, **kwargs)
        none = mod.multi_head_attention(
            xb, xb, params, sinks=as_backend(np.full(H_MHA, -np.inf), backend), **kwargs
        )
        assert_close(none, plain, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_mha_sinks_backends_equal_the_numpy_oracle(backend, num_kv_heads):
    from companion import numpy as cn

    mod = registry.namespace(backend)
    params, x, sinks = _mha_inputs(num_kv_heads)
    rng = np.random.default_rng(8)
    float_mask = rng.standard_normal((H_MHA, 8, 8))  # e.g. ALiBi
    bool_mask = rng.random((8, 8)) < 0.6
    for kwargs in (
        dict(causal=True),
        dict(causal=True, window=3, rope=True),
        dict(mask=float_mask),
        dict(mask=bool_mask),
    ):
        expected = cn.multi_head_attention(x, x, params, sinks=sinks, **kwargs)
        if "mask" in kwargs:
            kwargs = dict(kwargs, mask=as_backend(kwargs["mask"], backend))
        xb = as_backend(x, backend)
        got = mod.multi_head_attention(
            xb, xb, params, sinks=as_backend(sinks, backend), **kwargs
        )
        assert_close(got, expected, rtol=1e-12, atol=1e-13)
    # the weights returned: the sink's share left out, as in numpy
    _, expected = cn.multi_head_attention(
        x, x, params, sinks=sinks, causal=True, return_weights=True
    )
    _, got = mod.multi_head_attention(
        xb,
        xb,
        params,
        sinks=as_backend(sinks, backend),
        causal=True,
        return_weights=True,
    )
    assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
def test_mha_sinks_cached_decoding_equals_the_full_pass(backend, window):
    mod = registry.namespace(backend)
    params, x, sinks = _mha_inputs(2)
    kwargs = dict(causal=True, rope=True, window=window)
    xb, sb = as_backend(x, backend), as_backend(sinks, backend)
    full = to_numpy(mod.multi_head_attention(xb, xb, params, sinks=sb, **kwargs))
    cache = mod.KVCache()
    steps = []
    for start, stop in STEPS_MHA:
        chunk = as_backend(x[:, start:stop], backend)
        steps.append(
            to_numpy(
                mod.multi_head_attention(
                    chunk, chunk, params, sinks=sb, cache=cache, **kwargs
                )
            )
        )
    assert_close(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_mha_sinks_fully_masked_row_is_zero_never_nan(backend):
    """A query that may see no key puts all its weight on the sink: its heads are 0,
    so its output is the output bias alone; with a sink of -inf, 0 as well."""
    mod = registry.namespace(backend)
    params, x, sinks = _mha_inputs(2)
    keep = np.ones((8, 8), dtype=bool)
    keep[2] = False
    xb = as_backend(x, backend)
    for s in (sinks, np.array([-np.inf, 0.5, -np.inf, 1.0])):
        got = to_numpy(
            mod.multi_head_attention(
                xb,
                xb,
                params,
                mask=as_backend(keep, backend),
                sinks=as_backend(s, backend),
            )
        )
        assert np.all(np.isfinite(got))
        assert_close(got[:, 2], np.broadcast_to(params.b_o, got[:, 2].shape))


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_mha_bad_sinks_are_value_errors_naming_sinks(backend):
    mod = registry.namespace(backend)
    params, x, sinks = _mha_inputs(2)
    xb = as_backend(x, backend)
    cache = mod.KVCache()
    mod.multi_head_attention(xb, xb, params, cache=cache, causal=True)
    for bad in (np.zeros(2), np.zeros((H_MHA, 1)), np.zeros(H_MHA + 1)):
        with pytest.raises(ValueError, match="sinks"):
            mod.multi_head_attention(
                xb, xb, params, sinks=as_backend(bad, backend), cache=cache
            )
    assert cache.seen == 8  # refused before the cache changed
    fused = ["tiled"] + (["sdpa"] if backend == "torch" else [])
    for implementation in fused:
        with pytest.raises(ValueError, match="sinks"):
            mod.multi_head_attention(
                xb,
                xb,
                params,
                sinks=as_backend(sinks, backend),
                implementation=implementation,
            )
    with pytest.raises(TypeError, match="sinks"):
        mod.multi_head_attention(xb, xb, params, sinks=np.zeros(H_MHA, dtype=int))


def test_torch_module_sink_logits_are_a_learned_parameter():
    torch = pytest.importorskip("torch")
    from companion import numpy as cn
    from companion import torch as ct
    from companion.params import count_parameters

    params, x, sinks = _mha_inputs(2)
    plain = ct.MultiHeadAttention.from_params(params)
    module = ct.MultiHeadAttention(E, H_MHA, 2, sink_logits=True, dtype=torch.float64)
    module.load_state_dict({**plain.state_dict(), "sinks": torch.tensor(sinks)})
    assert count_parameters(module) == count_parameters(plain) + H_MHA
    assert "sink_logits=True" in repr(module)
    xt = torch.tensor(x)
    out = module(xt, causal=True)
    expected = cn.multi_head_attention(x, x, params, sinks=sinks, causal=True)
    assert_close(out, expected, rtol=1e-12, atol=1e-13)
    out.square().sum().backward()
    assert module.sinks.grad is not None and torch.all(module.sinks.grad != 0)
    # the functional form, with a tensor of logits, passes the gradient on too
    logits = torch.tensor(sinks, requires_grad=True)
    ct.multi_head_attention(xt, xt, params, sinks=logits, causal=True).sum().backward()
    assert torch.all(torch.isfinite(logits.grad)) and torch.any(logits.grad != 0)
    # cached decoding with the module equals its full pass
    cache = ct.KVCache()
    with torch.no_grad():
        steps = [module(xt[:, a:b], causal=True, cache=cache) for a, b in STEPS_MHA]
    assert_close(torch.cat(steps, dim=1), out.detach(), rtol=1e-12, atol=1e-13)
    for implementation in ("sdpa", "tiled"):
        with pytest.raises(ValueError, match="sinks"):
            ct.MultiHeadAttention(
                E, H_MHA, sink_logits=True, implementation=implementation
            )
        with pytest.raises(ValueError, match="sinks"):
            module(xt, implementation=implementation)
    with pytest.raises(ValueError, match="sinks and softcap"):
        ct.MultiHeadAttention(E, H_MHA, sink_logits=True, softcap=30.0)
    # the fresh parameter starts at 0: weight e^0 = 1 in every denominator
    fresh = ct.MultiHeadAttention(E, H_MHA, sink_logits=True)
    assert fresh.sinks.shape == (H_MHA,) and torch.all(fresh.sinks == 0)


def test_numpy_sink_attention_keeps_float32():
    """The default scale is a Python float (``math.sqrt``): ``np.sqrt`` would return a
    float64 scalar and, under numpy 2's promotion rules, make the scores float64."""
    from companion import numpy as cn
    from companion.numpy.sinks import _sink_weights

    rng = np.random.default_rng(9)
    q, k, v = rng.standard_normal((3, 1, 2, 5, 8)).astype(np.float32)
    sinks = rng.standard_normal(2).astype(np.float32)
    weights = _sink_weights(q, k, sinks, mask=None, causal=True, scale=None)
    assert weights.dtype == np.float32
    out = cn.attention_with_sinks(q, k, v, sinks, causal=True)
    assert out.dtype == np.float32
    expected = cn.attention_with_sinks(
        *(a.astype(np.float64) for a in (q, k, v)), sinks, causal=True
    )
    assert_close(out, expected)
    params, x, s64 = _mha_inputs(2)
    x32 = x.astype(np.float32)
    got = cn.multi_head_attention(x32, x32, params, sinks=s64, causal=True)
    assert got.dtype == np.float32
    expected = cn.multi_head_attention(x, x, params, sinks=s64, causal=True)
    assert_close(got, expected)
