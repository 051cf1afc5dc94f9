"""T5's relative position bias (issue 26): buckets and one shared table per head.

The buckets equal Hugging Face's ``T5Attention._relative_position_bucket`` for the
encoder (bidirectional) and the decoder (causal) over several ``num_buckets`` and
``max_distance``; the bias equals HF's ``compute_bias`` from a tiny ``T5Config`` with
the same table, in float64 (exactly: it is a gather), also when decoding with a cache
(the queries bottom-right aligned). The three backends agree, the bias is computed
once and is the float ``mask`` of every layer, and bad input is a ``ValueError``
naming the argument.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from companion import numpy as cn
from companion.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SETTINGS = [(32, 128), (16, 64), (8, 20), (64, 256), (6, 9), (4, 8), (7, 30)]


@pytest.mark.parametrize("num_buckets, max_distance", SETTINGS)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_buckets_equal_hugging_face(num_buckets, max_distance, bidirectional):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    if bidirectional and num_buckets < 4:
        pytest.skip("bidirectional needs 4 buckets")
    L, S = 300, 700  # distances -399 .. 699: past max_distance both ways
    ours = cn.t5_position_buckets(
        L,
        S,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    relative = torch.arange(S)[None, :] - (torch.arange(L)[:, None] + S - L)
    theirs = T5Attention._relative_position_bucket(
        relative,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert ours.dtype == np.int64
    assert np.array_equal(ours, theirs.numpy())
    used = np.unique(ours)
    per_side = num_buckets // 2 if bidirectional else num_buckets
    assert used.min() == 0 and used.max() == (
        2 * per_side - 1 if bidirectional else per_side - 1
    )


def test_bucket_rule_by_hand():
    """32 buckets, bidirectional: 16 per side, distances 0..7 exact, then log-spaced
    up to 128; keys after the query in the upper half."""
    b = cn.t5_position_buckets(1, 300)[0]  # one query at 299: distances -299 .. 0
    assert b[-1] == 0 and b[-8] == 7  # distance 7: exact
    assert list(b[::-1][[8, 11, 12, 16, 127, 128, 299]]) == [8, 8, 9, 10, 15, 15, 15]
    after = cn.t5_position_buckets(300, 300)[0]  # query 0: keys 0 .. 299 after it
    assert after[0] == 0 and after[1] == 17 and after[299] == 31
    causal = cn.t5_position_buckets(1, 300, bidirectional=False)[0][::-1]
    assert causal[0] == 0 and causal[15] == 15 and causal[16] == 16
    assert causal[299] == 31
    future = cn.t5_position_buckets(300, 300, bidirectional=False)[0]
    assert np.all(future == 0)  # causal: keys after the query share bucket 0


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_bias_equals_hf_compute_bias(is_decoder):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(
        d_model=16,
        d_kv=4,
        num_heads=3,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=24,
        is_decoder=is_decoder,
    )
    torch.manual_seed(0)
    attention = T5Attention(config, has_relative_attention_bias=True).double()
    table = attention.relative_attention_bias.weight.detach()  # (num_buckets, H)
    with torch.no_grad():
        full = attention.compute_bias(30, 30)[0]  # (H, L, S)
        step = attention.compute_bias(1, 30, past_seen_tokens=29)[0]  # (H, 1, S)
    kwargs = dict(bidirectional=not is_decoder, max_distance=24)
    ours = cn.t5_bias(table.numpy(), 30, 30, **kwargs)
    assert ours.dtype == np.float64 and ours.shape == (3, 30, 30)
    assert np.array_equal(ours, full.numpy())
    assert np.array_equal(cn.t5_bias(table.numpy(), 1, 30, **kwargs), step.numpy())


def test_backends_agree_and_torch_is_differentiable():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    from companion import tensorflow as ctf
    from companion import torch as ct

    table = np.random.default_rng(0).standard_normal((12, 4))
    for bidirectional in (True, False):
        kwargs = dict(bidirectional=bidirectional, max_distance=40)
        expected = cn.t5_bias(table, 9, 50, **kwargs)
        buckets = cn.t5_position_buckets(9, 50, num_buckets=12, **kwargs)
        assert np.array_equal(
            ct.t5_bias(torch.tensor(table), 9, 50, **kwargs), expected
        )
        assert np.array_equal(
            ctf.t5_bias(tf.constant(table), 9, 50, **kwargs), expected
        )
        for backend in (ct, ctf):
            got = backend.t5_position_buckets(9, 50, num_buckets=12, **kwargs)
            assert np.array_equal(np.asarray(got), buckets)
    weight = torch.tensor(table, requires_grad=True)
    ct.t5_bias(weight, 9, 50).sum().backward()
    counts = np.bincount(
        cn.t5_position_buckets(9, 50, num_buckets=12).ravel(), None, 12
    )
    assert np.array_equal(weight.grad.numpy(), np.repeat(counts[:, None], 4, axis=1))


def test_one_bias_is_the_mask_of_every_layer():
    """Computed once, added to every layer's scores: two layers with the same bias
    equal scaled dot-product attention with the bias added by hand, and the table's
    ``num_buckets * H`` parameters do not grow with depth."""
    from companion.numpy.attention import scaled_dot_product_attention_reference

    rng = np.random.default_rng(1)
    H, L, D, num_buckets = 2, 6, 4, 8
    table = rng.standard_normal((num_buckets, H))
    bias = cn.t5_bias(table, L, L, bidirectional=False, max_distance=16)  # (H, L, L)
    x = rng.standard_normal((1, H, L, D))
    for _ in range(2):  # layers
        y = scaled_dot_product_attention_reference(x, x, x, mask=bias, causal=True)
        scores = x @ np.swapaxes(x, -1, -2) / np.sqrt(D) + bias
        scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        assert_close(y, weights @ x, rtol=1e-12, atol=1e-13)
        x = y
    assert table.size == num_buckets * H


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_buckets=3), "num_buckets"),
        (dict(num_buckets=1, bidirectional=False), "num_buckets"),
        (dict(num_buckets=32, max_distance=8), "max_distance"),
        (dict(num_buckets=32, max_distance=0), "max_distance"),
        (dict(num_buckets=8, max_distance=2, bidirectional=False), "max_distance"),
    ],
)
def test_bad_buckets_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cn.t5_position_buckets(4, 4, **kwargs)


def test_bad_tables_and_lengths():
    with pytest.raises(ValueError, match="table"):
        cn.t5_bias(np.zeros(8), 2, 2)
    with pytest.raises(TypeError, match="table"):
        cn.t5_bias(np.zeros((8, 2), dtype=np.int64), 2, 2)
    with pytest.raises(ValueError, match="L"):
        cn.t5_bias(np.zeros((8, 2)), -1, 2)
    with pytest.raises(TypeError, match="bidirectional"):
        cn.t5_position_buckets(2, 2, bidirectional="yes")
    table = np.zeros((8, 2))
    before = table.copy()
    cn.t5_bias(table, 3, 3)
    assert np.array_equal(table, before)
