"""The fast parts of ``companion.experiments_long`` (issue 26): the GPT forward with a
replaced attention equals the model's; the one-pass sink attention equals decoding
through ``SinkCache`` with the paper's positions (slots); the quantised-cache
measurement runs on a tiny model and counts the bytes exactly."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from companion import experiments_long as el  # noqa: E402
from companion.testing import assert_close  # noqa: E402


def _model(context=24):
    from companion.torch.gpt import GPT

    torch.manual_seed(0)
    model = GPT(40, context, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2)
    return model.eval().double()


def test_gpt_forward_with_causal_attention_is_the_model():
    model = _model()
    ids = torch.randint(0, 40, (3, 24))
    with torch.no_grad():
        assert_close(
            el.gpt_forward(model, ids, el.causal_rope_attention),
            model(ids),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("sinks, window", [(2, 5), (1, 3), (0, 4), (4, 4)])
def test_sink_attention_equals_decoding_through_the_sink_cache(sinks, window):
    from companion._positions import as_rotary
    from companion.torch import SinkCache, rotary_embedding

    rope = as_rotary(True)
    g = torch.Generator().manual_seed(1)
    B, H, H_kv, T, D = 2, 4, 2, 17, 8
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, T, D, generator=g, dtype=torch.float64)
    one_pass = el.sink_attention(q, k, v, rope, sinks=sinks, window=window)
    cache = SinkCache(sinks, window)
    for t in range(T):
        kk, vv = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        S = kk.shape[2]
        assert S == min(t + 1, sinks + window)
        kr = rotary_embedding(kk, cache.slot_positions).repeat_interleave(2, dim=1)
        qr = rotary_embedding(q[:, :, t : t + 1], torch.tensor([S - 1]))
        weights = torch.softmax(qr @ kr.transpose(-1, -2) / math.sqrt(D), dim=-1)
        step = weights @ vv.repeat_interleave(2, dim=1)  # (B, H, 1, D)
        assert_close(step, one_pass[:, :, t : t + 1], rtol=1e-12, atol=1e-12)
    absolute = el.sink_attention(
        q, k, v, rope, sinks=sinks, window=window, positions="absolute"
    )
    if sinks:  # the sinks' positions matter once the cache is full
        assert not torch.allclose(absolute, one_pass)


@pytest.mark.parametrize(
    "sinks, window", [(1, 2), (0, 2), (0, None)], ids=["sinks", "window", "full"]
)
def test_sink_attention_checks_positions(sinks, window):
    # checked whatever the other arguments, not only where the positions are used
    from companion._positions import as_rotary

    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="positions"):
        el.sink_attention(
            q, q, q, as_rotary(True), sinks=sinks, window=window, positions="x"
        )


def test_quantized_losses_on_a_tiny_model():
    model = _model(32).float()
    x = torch.randint(0, 40, (2, 32))
    y = torch.randint(0, 40, (2, 32))
    result = el.quantized_losses(model, [(x, y)])
    assert set(result) == {"float32", *el.QUANTIZED}
    # float32: keys and values of 2 layers x 2 heads x 8 numbers x 4 bytes
    assert result["float32"]["bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert result["float32"]["loss_change"] == 0
    assert result["float32"]["key_relative_error"] == 0
    # int8 per token: 8 codes + one float32 scale per head, for keys and for values
    assert result["int8 per token"]["bytes_per_token"] == 2 * 2 * 2 * (8 + 4)
    for name in el.QUANTIZED:
        assert 0 < result[name]["key_relative_error"] < 1
    assert (
        result["int2, groups of 8"]["key_relative_error"]
        > result["int4, groups of 8"]["key_relative_error"]
        > result["int8 per token"]["key_relative_error"]
    )


def test_sink_losses_structure():
    model = _model(64).float()
    x = torch.randint(0, 40, (2, 32))
    result = el.sink_losses(model, [(x, x)], train_length=16, sinks=2, cache_sizes=(8,))
    assert list(result) == [
        "full attention",
        "window 8",
        "2 sinks + window 6",
        "2 sinks + window 6, absolute positions",
    ]
    # inside the first `sinks + window` positions every variant reads everything
    assert result["window 8"]["inside"] != result["full attention"]["inside"]


def test_first_token_weight_of_uniform_attention():
    """A model whose queries are zero attends uniformly: the first token gets
    exactly its share, mean(1 / (i + 1))."""
    model = _model(16).float()
    for block in model.layers:
        torch.nn.init.zeros_(block.attention.q_proj.weight)
    x = torch.randint(0, 40, (2, 16))
    result = el.first_token_weight(model, [(x, x)], start=8, stop=16)
    expected = sum(1 / (i + 1) for i in range(8, 16)) / 8
    assert result["uniform"] == pytest.approx(expected, rel=1e-12)
    assert result["layers"] == pytest.approx([expected] * 2, rel=1e-6)
