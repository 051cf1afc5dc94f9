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
