"""Audit of issue 26: its "Bad input" list in all three backends, and T5's relative
position bias against a whole Hugging Face ``T5Attention`` forward pass.

``tests/test_rope_scaling.py``, ``tests/test_sinks.py`` and
``tests/test_quantized_cache.py`` check the bad-input items through the numpy
namespace (the rope and sink checks) or all backends (the quantised caches). The issue
asks for the functions in three backends, so this file makes the same calls through
torch and TensorFlow: unknown rope types, scaling factors <= 0, original lengths larger
than the target, sinks larger than the window, group sizes that do not divide D; each a
``ValueError`` whose message names the argument.

``tests/test_t5_bias.py`` compares our bias with HF's ``compute_bias``; the issue asks
for parity with HF's T5 attention, so here a tiny ``T5Attention`` (encoder and decoder,
float64, eager) is compared end to end with the float64 oracle: its projections, our
``t5_bias`` as the float mask of ``scaled_dot_product_attention_reference`` with
``scale=1`` (T5 folds the scale into its initialisation), its output projection.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from companion import numpy as cn
from companion import registry
from companion.testing import as_backend, assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHORT = [1.0] * 8

BAD_SCALINGS = [
    # unknown rope types
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "rope_type"),
    ({"rope_type": "Linear", "factor": 2.0}, "rope_type"),
    # scaling factors <= 0
    ({"rope_type": "linear", "factor": 0.0}, "factor"),
    ({"rope_type": "ntk", "factor": -1.0}, "factor"),
    (
        {"rope_type": "dynamic", "factor": 0.0, "original_max_positions": 64},
        "factor",
    ),
    ({"rope_type": "yarn", "factor": -4.0, "original_max_positions": 64}, "factor"),
    (
        {
            "rope_type": "llama3",
            "factor": 0.0,
            "original_max_positions": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "factor",
    ),
    (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_positions": 64,
            "low_freq_factor": 0.0,
            "high_freq_factor": 4.0,
        },
        "low_freq_factor",
    ),
    (
        {
            "rope_type": "longrope",
            "original_max_positions": 64,
            "short_factor": SHORT,
            "long_factor": [1.0] * 7 + [-2.0],
        },
        r"long_factor\[7\]",
    ),
    # original lengths larger than the target
    (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_positions": 512,
            "max_positions": 256,
        },
        "original_max_positions",
    ),
    (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_positions": 4096,
            "max_positions": 2048,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "original_max_positions",
    ),
    (
        {
            "rope_type": "longrope",
            "original_max_positions": 4096,
            "max_positions": 1024,
            "short_factor": SHORT,
            "long_factor": SHORT,
        },
        "original_max_positions",
    ),
]
IDS = [f"{i}-{case[1]}" for i, case in enumerate(BAD_SCALINGS)]


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("scaling, argument", BAD_SCALINGS, ids=IDS)
def test_bad_rope_scaling_names_the_argument_in_every_backend(
    backend, scaling, argument
):
    ns = registry.namespace(backend)
    with pytest.raises(ValueError, match=argument):
        ns.rotary_frequencies(16, scaling=dict(scaling))
    with pytest.raises(ValueError, match=argument):
        ns.RotaryConfig(scaling=dict(scaling))
    x = as_backend(np.zeros((1, 1, 3, 16)), backend)
    positions = as_backend(np.arange(3), backend)
    with pytest.raises(ValueError, match=argument):
        ns.rotary_embedding(x, positions, scaling=dict(scaling))


def test_the_target_length_equal_to_the_original_is_allowed():
    """The edge of "original lengths larger than the target": equal is no scaling
    need, not an error (YaRN's factor from the two lengths is then 1)."""
    s = cn.RopeScaling("yarn", original_max_positions=256, max_positions=256)
    assert s.scale() == 1.0
    theta, _ = cn.rotary_frequencies(16, scaling={"rope_type": "linear", "factor": 1.0})
    assert_close(theta, cn.rotary_frequencies(16)[0], rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize(
    "sinks, window, argument, seen",
    [(5, 4, "sinks", "5"), (9, 1, "sinks", "9"), (-1, 4, "sinks", "-1")],
)
def test_sinks_larger_than_the_window_in_every_backend(
    backend, sinks, window, argument, seen
):
    ns = registry.namespace(backend)
    with pytest.raises(ValueError, match=argument) as error:
        ns.SinkCache(sinks, window)
    assert seen in str(error.value)
    q = as_backend(np.arange(3), backend)
    with pytest.raises(ValueError, match=argument):
        ns.sink_mask(q, q, sinks=sinks, window=window)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_sinks_equal_to_the_window_is_allowed(backend):
    ns = registry.namespace(backend)
    cache = ns.SinkCache(4, 4)
    assert cache is not None
    with pytest.raises(ValueError, match="window"):
        ns.SinkCache(0, 0)


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize("cls", ["QuantizedKVCache", "KIVICache"])
@pytest.mark.parametrize("D, group_size", [(8, 3), (12, 8), (6, 4)])
def test_group_sizes_that_do_not_divide_d(backend, cls, D, group_size):
    ns = registry.namespace(backend)
    if cls == "KIVICache":
        cache = ns.KIVICache(4, group_size, 2)
    else:
        cache = ns.QuantizedKVCache(bits=4, group_size=group_size)
    rng = np.random.default_rng(0)
    k = as_backend(rng.standard_normal((1, 2, 5, D)), backend)
    v = as_backend(rng.standard_normal((1, 2, 5, D)), backend)
    with pytest.raises(ValueError, match="group_size") as error:
        cache.append(k, v)
    assert str(group_size) in str(error.value) and str(D) in str(error.value)


# --- T5 attention end to end against Hugging Face ---------------------------------


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_t5_attention_equals_hugging_face(is_decoder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    config = transformers.T5Config(
        d_model=16,
        d_kv=4,
        num_heads=3,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=24,
        is_decoder=is_decoder,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    attention = T5Attention(config, has_relative_attention_bias=True).double().eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    B, L, H, D = 2, 30, 3, 4
    x = torch.randn(B, L, 16, generator=torch.Generator().manual_seed(2)).double()
    mask = None
    if is_decoder:  # HF's decoder takes causality from the additive mask
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, L, L, dtype=torch.float64)
        mask = mask.masked_fill(~keep, torch.finfo(torch.float64).min)
    with torch.no_grad():
        expected = attention(x, mask=mask)[0].numpy()

    def heads(linear):
        y = x.numpy() @ linear.weight.detach().numpy().T
        return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)

    table = attention.relative_attention_bias.weight.detach().numpy()
    bias = cn.t5_bias(table, L, L, bidirectional=not is_decoder, max_distance=24)
    out = cn.scaled_dot_product_attention_reference(
        heads(attention.q),
        heads(attention.k),
        heads(attention.v),
        mask=bias,
        causal=is_decoder,
        scale=1.0,
    )
    ours = out.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    ours = ours @ attention.o.weight.detach().numpy().T
    assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    if is_decoder:  # one decoding step: the last query over every key, its own bias
        step = cn.t5_bias(table, 1, L, bidirectional=False, max_distance=24)
        last = cn.scaled_dot_product_attention_reference(
            heads(attention.q)[:, :, -1:],
            heads(attention.k),
            heads(attention.v),
            mask=step,
            causal=True,
            scale=1.0,
        )
        last = last.transpose(0, 2, 1, 3).reshape(B, 1, H * D)
        last = last @ attention.o.weight.detach().numpy().T
        assert_close(last, expected[:, -1:], rtol=1e-10, atol=1e-12)


# --- learned sink logits: a row that sees nothing ----------------------------------


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_sink_logits_fully_masked_row_is_zero_never_nan(backend):
    """The conventions' fully masked row (exactly 0, never NaN) with a sink logit of
    -inf (plain attention, as the docstring promises) as well as a finite one: the
    other rows equal plain attention (-inf) or the formula (finite)."""
    ns = registry.namespace(backend)
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((3, 1, 2, 4, 8))
    keep = np.ones((4, 4), dtype=bool)
    keep[1] = False  # query 1 may see no key
    sinks = np.array([-np.inf, 0.5])
    got = ns.attention_with_sinks(
        *(as_backend(a, backend) for a in (q, k, v, sinks)),
        mask=as_backend(keep, backend),
    )
    got = np.asarray(got)
    assert np.all(np.isfinite(got))
    assert np.array_equal(got[:, :, 1], np.zeros_like(got[:, :, 1]))
    rows = [0, 2, 3]
    plain = cn.scaled_dot_product_attention_reference(q, k, v, mask=keep)
    assert_close(got[:, 0, rows], plain[:, 0, rows], rtol=1e-12, atol=1e-13)
    scores = q[0, 1] @ k[0, 1].T / np.sqrt(8)
    e = np.exp(scores)
    expected = (e / (np.exp(0.5) + e.sum(-1, keepdims=True))) @ v[0, 1]
    assert_close(got[0, 1, rows], expected[rows], rtol=1e-12, atol=1e-13)


def test_sink_logits_fully_masked_row_has_finite_gradients():
    torch = pytest.importorskip("torch")
    from companion import torch as ct

    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 2, 4, 8, generator=g, dtype=torch.float64)
    q.requires_grad_(True)
    sinks = torch.tensor([-float("inf"), 0.5], dtype=torch.float64, requires_grad=True)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False
    ct.attention_with_sinks(q, k, v, sinks, mask=keep).sum().backward()
    assert torch.all(torch.isfinite(q.grad)) and torch.all(q.grad[:, 1] == 0)
    assert torch.all(torch.isfinite(sinks.grad)) and sinks.grad[1] != 0


# --- RoPE scaling: the cases test_rope_scaling's backend test leaves out -----------


@pytest.mark.parametrize(
    "case",
    [
        "ntk",
        "dynamic-short",
        "dynamic-long",
        "yarn-mscale",
        "yarn-attention-factor",
        "yarn-no-factor",
        "llama3",
        "longrope-short",
        "longrope-attention-factor",
        "proportional",
    ],
)
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_every_rope_type_is_the_same_in_every_backend(case, backend):
    """Every rope type, frequencies and attention factor, and the rotation, in torch
    and TensorFlow equal the numpy oracle (float64)."""
    import test_rope_scaling as rs

    ns = registry.namespace(backend)
    if case == "ntk":
        scaling, seq_len = {"rope_type": "ntk", "factor": 4.0}, None
    else:
        scaling, seq_len = rs.CASES[case][2], rs.CASES[case][3]
    theta, factor = cn.rotary_frequencies(16, scaling=scaling, seq_len=seq_len)
    dtype = "float64"
    if backend == "torch":
        import torch

        dtype = torch.float64
    got, got_factor = ns.rotary_frequencies(
        16, scaling=scaling, seq_len=seq_len, dtype=dtype
    )
    assert np.array_equal(np.asarray(got), theta) and got_factor == factor
    x = np.random.default_rng(7).standard_normal((2, 3, 5, 16))
    positions = np.arange(296, 301) if seq_len is None else np.arange(5)
    kwargs = dict(scaling=scaling, seq_len=seq_len)
    expected = cn.rotary_embedding(x, positions, **kwargs)
    got = ns.rotary_embedding(
        as_backend(x, backend), as_backend(positions, backend), **kwargs
    )
    assert_close(got, expected, rtol=1e-12, atol=1e-13)


# --- which of Hugging Face's rope types are converted --------------------------------

# Refused on purpose (none today: Gemma 4's "proportional", once refused here, is
# converted; see companion.hf.rope's docstring). A made-up name checks the refusal.
REFUSED_ROPE_TYPES: set[str] = set()


def test_every_hf_rope_type_is_converted_with_parity_or_refused_by_name():
    """Issue 26: ``companion.hf.rope`` converts every type. Each key of the installed
    Transformers' ``ROPE_INIT_FUNCTIONS`` is either a parity case of
    ``tests/test_rope_scaling.py`` or in the documented refusal list (and then
    refused with a ValueError naming it); a type new in Transformers fails here."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import test_rope_scaling as rs
    from transformers import modeling_rope_utils as utils

    from companion import hf as chf

    covered = {case[0]["rope_type"] for case in rs.CASES.values()}
    hf_types = set(utils.ROPE_INIT_FUNCTIONS)
    assert hf_types <= covered | REFUSED_ROPE_TYPES, hf_types - covered
    for kind in sorted(hf_types & REFUSED_ROPE_TYPES | {"made-up-type"}):
        config = transformers.LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            rope_parameters={"rope_type": kind, "rope_theta": 1e4, "factor": 2.0},
        )
        with pytest.raises(ValueError, match=f"rope_type {kind!r}"):
            chf.rope(config)


@pytest.mark.parametrize(
    "sinks, window, argument",
    [(5, 4, "sinks"), (-1, 4, "sinks"), (2, 0, "window"), (-1, None, "sinks")],
)
def test_one_pass_sink_attention_refuses_what_the_sink_cache_refuses(
    sinks, window, argument
):
    """``experiments_long.sink_attention`` equals decoding through a
    ``SinkCache(sinks, window)``, so it refuses the sizes the cache refuses (sinks
    larger than the window among them) instead of computing a mask no cache has."""
    torch = pytest.importorskip("torch")
    from companion import experiments_long as el
    from companion._positions import as_rotary

    q = torch.zeros(1, 1, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=argument):
        el.sink_attention(q, q, q, as_rotary(True), sinks=sinks, window=window)
    out = el.sink_attention(q, q, q, as_rotary(True), sinks=4, window=4)
    assert out.shape == q.shape  # sinks equal to the window: allowed
