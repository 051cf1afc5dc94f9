"""RoPE scaling (issue 26): linear, NTK-aware, dynamic NTK, YaRN, Llama 3, LongRoPE.

The frequencies and attention factors of :func:`companion.numpy.rotary_frequencies`
equal Hugging Face's ``ROPE_INIT_FUNCTIONS`` to 1e-12 relative. Transformers computes
them in float32 (``torch.float``, ``.float()``), so the parity test runs HF's own
functions *retargeted to float64*: their source with every float32 dtype replaced by
float64 (the number of replacements is asserted, so a changed HF fails loudly), beside
a check that the unmodified float32 functions agree to float32 precision (the
retargeting changed nothing else). The three backends share one backend-free rule and
agree with each other; the rotation with a scaling has the property each rule claims;
bad input is a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import inspect
import math
import os

import numpy as np
import pytest

from companion import _positions
from companion import numpy as cn
from companion.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Parity cases: (HF rope_parameters, HF config extras, our scaling, seq_len).
# head_dim 16, base 10000: the wavelengths 2 pi 10000^(2i/16) are 6.3, 19.9, 62.8,
# 199, 628, 1987, 6283, 19869, so an original length of 256 (YaRN) or 2048 (Llama 3:
# wavelengths 512 .. 2048 are blended) puts pairs in every zone of each rule.
CASES = {
    "linear": (
        {"rope_type": "linear", "factor": 4.0},
        {},
        {"rope_type": "linear", "factor": 4.0},
        None,
    ),
    "dynamic-short": (
        {"rope_type": "dynamic", "factor": 2.0},
        {"max_position_embeddings": 64},
        {"rope_type": "dynamic", "factor": 2.0, "original_max_positions": 64},
        40,
    ),
    "dynamic-long": (
        {"rope_type": "dynamic", "factor": 2.0},
        {"max_position_embeddings": 64},
        {"rope_type": "dynamic", "factor": 2.0, "original_max_positions": 64},
        301,
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
        {"max_position_embeddings": 2048},
        {"rope_type": "yarn", "factor": 8.0, "original_max_positions": 256},
        None,
    ),
    "yarn-mscale": (
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 256,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
        {"max_position_embeddings": 10240},
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_positions": 256,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
        None,
    ),
    "yarn-attention-factor": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "attention_factor": 1.25,
        },
        {"max_position_embeddings": 2048},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_positions": 512,
            "attention_factor": 1.25,
        },
        None,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 2048,
        },
        {"max_position_embeddings": 16384},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_positions": 2048,
            "max_positions": 16384,
        },
        None,
    ),
}
CASES["yarn-no-factor"] = (  # DeepSeek-style: factor from the two lengths
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256},
    {"max_position_embeddings": 1024},
    {"rope_type": "yarn", "original_max_positions": 256, "max_positions": 1024},
    None,
)
SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 1.8, 2.0]
LONG = [1.0, 1.3, 2.1, 3.4, 5.0, 7.9, 12.0, 16.5]
for _name, _seq in (("longrope-short", 100), ("longrope-long", 700)):
    CASES[_name] = (
        {
            "rope_type": "longrope",
            "short_factor": SHORT,
            "long_factor": LONG,
            "original_max_position_embeddings": 256,
        },
        {"max_position_embeddings": 4096},
        {
            "rope_type": "longrope",
            "short_factor": SHORT,
            "long_factor": LONG,
            "original_max_positions": 256,
            "max_positions": 4096,
        },
        _seq,
    )
CASES["longrope-attention-factor"] = (
    {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "factor": 3.0,
        "attention_factor": 0.9,
        "original_max_position_embeddings": 256,
    },
    {"max_position_embeddings": 4096},
    {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "factor": 3.0,
        "attention_factor": 0.9,
        "original_max_positions": 256,
        "max_positions": 4096,
    },
    700,
)

# Gemma 4's "proportional": with head_dim 16, int(0.25 * 16 // 2) = 2 pairs turn (the
# exponent still over 16), the other 6 have frequency 0; a factor divides them all.
CASES["proportional"] = (
    {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 2.0},
    {},
    {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 2.0},
    None,
)
CASES["proportional-no-factor"] = (
    {"rope_type": "proportional", "partial_rotary_factor": 0.6},
    {},
    {"rope_type": "proportional", "partial_rotary_factor": 0.6},
    None,
)

# Float32 dtypes in HF's RoPE init functions and what the float64 copy uses instead.
RETARGET = (
    ("dtype=torch.float)", "dtype=torch.float64)"),
    ("dtype=torch.float32", "dtype=torch.float64"),
    (".float()", ".double()"),
)


@pytest.fixture(scope="module")
def hf():
    """``(float64 functions, float32 functions, LlamaConfig)`` from transformers."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers import modeling_rope_utils as utils

    float64 = {}
    for kind, fn in utils.ROPE_INIT_FUNCTIONS.items():
        source = inspect.getsource(fn)
        for old, new in RETARGET:
            source = source.replace(old, new)
        assert "float32" not in source and "torch.float)" not in source, kind
        assert ".float()" not in source, kind
        namespace = dict(vars(utils))
        exec(compile(source, f"<float64 {fn.__name__}>", "exec"), namespace)
        float64[kind] = namespace[fn.__name__]
    return float64, utils.ROPE_INIT_FUNCTIONS, transformers.LlamaConfig


def _config(LlamaConfig, parameters, extras):
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters={"rope_theta": 10000.0, **parameters},
        **extras,
    )


def _hf_frequencies(fns, config, seq_len):
    kind = config.rope_parameters["rope_type"]
    inv_freq, factor = fns[kind](config, "cpu", seq_len=seq_len)
    return inv_freq.numpy(), float(factor)


@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_equal_hugging_face_in_float64(hf, case):
    float64, float32, LlamaConfig = hf
    parameters, extras, ours, seq_len = CASES[case]
    config = _config(LlamaConfig, parameters, extras)
    expected, expected_factor = _hf_frequencies(float64, config, seq_len)
    assert expected.dtype == np.float64
    theta, factor = cn.rotary_frequencies(16, scaling=ours, seq_len=seq_len)
    assert_close(theta, expected, rtol=1e-12, atol=0.0, name=f"{case} theta")
    assert math.isclose(factor, expected_factor, rel_tol=1e-12, abs_tol=0.0)
    # HF's float32 originals agree to float32 precision: retargeting changed no rule
    hf32, factor32 = _hf_frequencies(float32, config, seq_len)
    assert hf32.dtype == np.float32
    assert_close(theta, hf32.astype(np.float64), rtol=2e-6, atol=0.0)
    assert math.isclose(factor, factor32, rel_tol=1e-6)


def test_rules_change_what_they_claim(hf):
    """Each case is non-trivial: its frequencies (or factor) differ from unscaled."""
    plain, _ = cn.rotary_frequencies(16)
    for case, (_, _, ours, seq_len) in CASES.items():
        if case == "dynamic-short":  # within the original length: unscaled
            theta, _ = cn.rotary_frequencies(16, scaling=ours, seq_len=seq_len)
            assert_close(theta, plain, rtol=1e-14, atol=0.0)
            continue
        theta, factor = cn.rotary_frequencies(16, scaling=ours, seq_len=seq_len)
        assert np.max(np.abs(theta / plain - 1)) > 1e-3 or factor != 1.0, case
    # YaRN keeps the fastest pair and interpolates the slowest fully
    yarn = CASES["yarn"][2]
    theta, factor = cn.rotary_frequencies(16, scaling=yarn)
    assert_close(theta[0], plain[0], rtol=1e-15, atol=0.0)
    assert_close(theta[-1], plain[-1] / 8.0, rtol=1e-14, atol=0.0)
    assert math.isclose(factor, 0.1 * math.log(8.0) + 1.0, rel_tol=1e-15)
    # proportional: int(p * d // 2) pairs divided by the factor, the others never turn
    theta, factor = cn.rotary_frequencies(16, scaling=CASES["proportional"][2])
    assert_close(theta[:2], plain[:2] / 2.0, rtol=1e-15, atol=0.0)
    assert np.array_equal(theta[2:], np.zeros(6)) and factor == 1.0
    theta, _ = cn.rotary_frequencies(16, scaling=CASES["proportional-no-factor"][2])
    assert np.array_equal(theta[:4], plain[:4]) and not np.any(theta[4:])
    # Llama 3: fast pairs kept, slow pairs divided by the factor, the middle between
    llama3 = CASES["llama3"][2]
    theta, _ = cn.rotary_frequencies(16, scaling=llama3)
    ratio = theta / plain
    assert_close(ratio[:4], np.ones(4), rtol=1e-15, atol=0.0)
    assert_close(ratio[6:], np.full(2, 1 / 8.0), rtol=1e-14, atol=0.0)
    assert np.all((ratio[4:6] < 1) & (ratio[4:6] > 1 / 8.0))


def test_ntk_aware_equals_hf_dynamic_at_its_scale(hf):
    """Static NTK-aware scaling by ``s`` is HF's dynamic rule with factor 1 at a text
    ``s`` times the original length: base * s^(d/(d-2))."""
    float64, _, LlamaConfig = hf
    config = _config(
        LlamaConfig,
        {"rope_type": "dynamic", "factor": 1.0},
        {"max_position_embeddings": 64},
    )
    expected, _ = _hf_frequencies(float64, config, 256)
    theta, factor = cn.rotary_frequencies(16, scaling={"rope_type": "ntk", "factor": 4})
    assert_close(theta, expected, rtol=1e-12, atol=0.0)
    assert factor == 1.0
    base = 10000.0 * 4.0 ** (16 / 14)
    assert_close(theta, base ** (-np.arange(0, 16, 2) / 16), rtol=1e-13, atol=0.0)


def test_default_equals_hf_default_in_float64(hf):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    source = inspect.getsource(LlamaRotaryEmbedding.compute_default_rope_parameters)
    source = inspect.cleandoc("\n" + source).replace("@staticmethod\n", "")
    assert source.count("dtype=torch.float)") == 1
    source = source.replace("dtype=torch.float)", "dtype=torch.float64)")
    import transformers.models.llama.modeling_llama as llama

    namespace = dict(vars(llama))
    exec(compile(source, "<float64 default>", "exec"), namespace)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    inv_freq, factor = namespace["compute_default_rope_parameters"](config)
    theta, ours = cn.rotary_frequencies(16, base=500.0)
    assert_close(theta, inv_freq.numpy(), rtol=1e-14, atol=0.0)
    assert ours == factor == 1.0


def test_defaults_unchanged():
    """No scaling is the rotation as before, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 12))
    positions = np.arange(5, 12)
    theta = 10000.0 ** (-2.0 * np.arange(6) / 12)
    angle = positions[:, None] * theta
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., :6], x[..., 6:]
    expected = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    assert np.array_equal(cn.rotary_embedding(x, positions), expected)
    assert np.array_equal(cn.rotary_embedding(x, positions, scaling=None), expected)
    assert cn.RotaryConfig() == cn.RotaryConfig(scaling=None)
    assert np.array_equal(cn.rotary_frequencies(12)[0], theta)


def test_linear_is_position_interpolation():
    """Linear scaling by ``s`` rotates position ``s p`` as RoPE rotates ``p``."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 16))
    p = np.arange(3, 9)
    scaled = cn.rotary_embedding(x, 4 * p, scaling={"rope_type": "linear", "factor": 4})
    assert_close(scaled, cn.rotary_embedding(x, p), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", ["yarn", "longrope-long"])
def test_attention_factor_scales_the_rotated_features(case):
    scaling, seq_len = CASES[case][2], CASES[case][3]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 20))  # 16 rotated, 4 passed through
    positions = np.arange(600, 605)
    y = cn.rotary_embedding(x, positions, scaling=scaling, rotary_dim=16)
    theta, factor = cn.rotary_frequencies(16, scaling=scaling, seq_len=seq_len)
    assert factor != 1.0
    a, b = x[..., :8], x[..., 8:16]
    angle = positions[:, None] * theta
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1) * factor
    assert_close(y[..., :16], rotated, rtol=1e-12, atol=1e-13)
    assert np.array_equal(y[..., 16:], x[..., 16:])


def test_dynamic_and_longrope_follow_the_longest_position():
    """Without ``seq_len`` the length is the largest position + 1 (HF's rule)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 16))
    for case in ("dynamic-long", "longrope-long"):
        scaling = CASES[case][2]
        positions = np.array([0, 5, 200, 700])
        implicit = cn.rotary_embedding(x, positions, scaling=scaling)
        explicit = cn.rotary_embedding(x, positions, scaling=scaling, seq_len=701)
        assert np.array_equal(implicit, explicit)
        short = cn.rotary_embedding(x, positions, scaling=scaling, seq_len=100)
        assert not np.allclose(short, implicit)


@pytest.mark.parametrize("case", ["linear", "yarn", "llama3", "longrope-long"])
def test_backends_agree(case):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    from companion import tensorflow as ctf
    from companion import torch as ct

    scaling, seq_len = CASES[case][2], CASES[case][3]
    theta, factor = cn.rotary_frequencies(16, scaling=scaling, seq_len=seq_len)
    for backend in (ct, ctf):
        t, f = backend.rotary_frequencies(
            16,
            scaling=scaling,
            seq_len=seq_len,
            dtype="float64" if backend is ctf else torch.float64,
        )
        assert np.array_equal(np.asarray(t), theta) and f == factor
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 20))
    positions = np.arange(690, 696)
    kwargs = dict(scaling=scaling, rotary_dim=16, interleaved=True)
    expected = cn.rotary_embedding(x, positions, **kwargs)
    got_torch = ct.rotary_embedding(torch.tensor(x), torch.tensor(positions), **kwargs)
    got_tf = ctf.rotary_embedding(tf.constant(x), tf.constant(positions), **kwargs)
    assert_close(got_torch, expected, rtol=1e-12, atol=1e-13)
    assert_close(got_tf, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
def test_attention_with_scaled_rope_cached_equals_full(backend):
    """``rope=`` with a YaRN scaling in ``multi_head_attention``: the same in every
    backend, different from unscaled, and cached decoding equals the full pass (YaRN's
    frequencies do not depend on the length)."""
    from companion import registry
    from companion.numpy import MultiHeadParams
    from companion.testing import as_backend, to_numpy

    mod = registry.namespace(backend)
    params = MultiHeadParams.random(32, 2, 1, seed=5)
    x = np.random.default_rng(5).normal(size=(2, 7, 32))
    rope = {"base": 100.0, "scaling": CASES["yarn"][2]}
    numpy_ = registry.namespace("numpy")
    oracle = numpy_.multi_head_attention(x, x, params, causal=True, rope=rope)
    plain = numpy_.multi_head_attention(x, x, params, causal=True, rope=100.0)
    assert not np.allclose(oracle, plain)
    xb = as_backend(x, backend)
    full = mod.multi_head_attention(xb, xb, params, causal=True, rope=rope)
    assert_close(full, oracle)
    cache = mod.KVCache()
    steps = []
    for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, 7)]:
        chunk = as_backend(x[:, start:stop], backend)
        steps.append(
            to_numpy(
                mod.multi_head_attention(
                    chunk, chunk, params, causal=True, cache=cache, rope=rope
                )
            )
        )
    assert_close(np.concatenate(steps, axis=1), oracle)


def test_keras_layer_config_round_trips_the_scaling():
    pytest.importorskip("tensorflow")
    from companion import tensorflow as ctf
    from companion.numpy import MultiHeadParams

    params = MultiHeadParams.random(32, 2, seed=1)
    rope = {"base": 500.0, "scaling": CASES["longrope-long"][2]}
    layer = ctf.MultiHeadAttention.from_params(params, rope=rope)
    config = layer.get_config()["rope"]
    assert config["scaling"]["short_factor"] == SHORT
    assert ctf.MultiHeadAttention.from_config(layer.get_config()).rope == layer.rope
    plain = ctf.MultiHeadAttention.from_params(params, rope=True).get_config()
    assert "scaling" not in plain["rope"]


def test_dynamic_cached_equals_full_within_the_original_length():
    """Dynamic NTK depends on the length: within ``original_max_positions`` it is
    unscaled, so cached decoding equals the full pass; beyond, keys cached earlier
    keep their step's rotation (as in Transformers) and the two differ."""
    from companion import registry
    from companion.numpy import MultiHeadParams

    mod = registry.namespace("numpy")
    params = MultiHeadParams.random(16, 2, seed=6)
    x = np.random.default_rng(6).normal(size=(1, 9, 16))
    for original, equal in ((16, True), (4, False)):
        scaling = {"rope_type": "dynamic", "factor": 2.0}
        rope = {"scaling": {**scaling, "original_max_positions": original}}
        full = mod.multi_head_attention(x, x, params, causal=True, rope=rope)
        cache = mod.KVCache()
        steps = [
            mod.multi_head_attention(
                x[:, t : t + 1],
                x[:, t : t + 1],
                params,
                causal=True,
                cache=cache,
                rope=rope,
            )
            for t in range(9)
        ]
        same = np.allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-13)
        assert same is equal


@pytest.mark.parametrize(
    "parameters, extras",
    [
        (
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 256,
            },
            {"max_position_embeddings": 2048},
        ),
        ({"rope_type": "dynamic", "factor": 3.0}, {"max_position_embeddings": 8}),
        (
            {
                "rope_type": "longrope",
                "short_factor": SHORT,
                "long_factor": LONG,
                "original_max_position_embeddings": 8,
            },
            {"max_position_embeddings": 64},
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            {"max_position_embeddings": 256},
        ),
    ],
    ids=["yarn", "dynamic", "longrope", "llama3"],
)
def test_rotation_equals_llama_apply_rotary_pos_emb(hf, parameters, extras):
    """The whole rotation, attention factor included, as Llama applies it (HF's cos
    and sin are float32: positions below 16, float32 tolerance)."""
    import torch
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    from companion import hf as chf
    from companion import torch as ct

    _, _, LlamaConfig = hf
    config = _config(LlamaConfig, parameters, extras)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 4, 13, 16, generator=g)  # (B, H, L, D) each
    position_ids = torch.arange(13)[None]  # (1, L): up to 12, past 8 for longrope
    cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    rope = chf.rope(config)
    kwargs = dict(base=rope["base"], scaling=rope["scaling"])
    assert_close(ct.rotary_embedding(q, torch.arange(13), **kwargs), hf_q)
    assert_close(ct.rotary_embedding(k, torch.arange(13), **kwargs), hf_k)


# --- Hugging Face configurations ------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_hf_rope_converts_every_type(hf, case):
    from companion import hf as chf

    float64, _, LlamaConfig = hf
    parameters, extras, _, seq_len = CASES[case]
    config = _config(LlamaConfig, parameters, extras)
    before = config.to_dict()
    rope = cn.RotaryConfig(**chf.rope(config))
    assert config.to_dict() == before  # the configuration is not modified
    assert rope.scaling is not None
    expected, expected_factor = _hf_frequencies(float64, config, seq_len)
    theta, factor = cn.rotary_frequencies(
        16, base=rope.base, scaling=rope.scaling, seq_len=seq_len
    )
    assert_close(theta, expected, rtol=1e-12, atol=0.0)
    assert math.isclose(factor, expected_factor, rel_tol=1e-12)


def test_hf_rope_refuses_unknown_types_by_name(hf):
    from companion import hf as chf

    _, _, LlamaConfig = hf
    # a made-up name (every type of the installed Transformers is converted)
    config = _config(LlamaConfig, {"rope_type": "made-up-type", "factor": 2.0}, {})
    with pytest.raises(ValueError, match="rope_type 'made-up-type'"):
        chf.rope(config)
    parameters, extras, _, _ = CASES["longrope-short"]
    incomplete = _config(LlamaConfig, parameters, extras)
    del incomplete.rope_parameters["short_factor"]  # e.g. a hand-edited config
    with pytest.raises(ValueError, match="short_factor"):
        cn.RotaryConfig(**chf.rope(incomplete))


def test_hf_rope_default_has_no_scaling(hf):
    from companion import hf as chf

    _, _, LlamaConfig = hf
    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    assert "scaling" not in chf.rope(config)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"rope_type": "ntk-by-parts", "factor": 2}, "rope_type"),
        ({"rope_type": "default", "factor": 2}, "rope_type"),
        ({"rope_type": "linear", "factor": 0}, "factor"),
        ({"rope_type": "linear", "factor": -2.0}, "factor"),
        ({"rope_type": "linear", "factor": float("nan")}, "factor"),
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "dynamic", "factor": 2}, "original_max_positions"),
        (
            {
                "rope_type": "yarn",
                "factor": 4,
                "original_max_positions": 4096,
                "max_positions": 2048,
            },
            "original_max_positions",
        ),
        (
            {"rope_type": "yarn", "factor": 4, "original_max_positions": 0},
            "original_max_positions",
        ),
        ({"rope_type": "yarn", "original_max_positions": 64}, "factor"),
        (
            {
                "rope_type": "yarn",
                "factor": 4,
                "original_max_positions": 64,
                "beta_fast": 0,
            },
            "beta_fast",
        ),
        (
            {
                "rope_type": "yarn",
                "factor": 4,
                "original_max_positions": 64,
                "attention_factor": -1.0,
            },
            "attention_factor",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8,
                "original_max_positions": 64,
                "low_freq_factor": 4,
                "high_freq_factor": 1,
            },
            "high_freq_factor",
        ),
        (
            {
                "rope_type": "longrope",
                "original_max_positions": 64,
                "long_factor": [1.0] * 8,
            },
            "short_factor",
        ),
        (
            {
                "rope_type": "longrope",
                "original_max_positions": 64,
                "short_factor": [1.0] * 8,
                "long_factor": [1.0] * 7,
            },
            "long_factor",
        ),
        (
            {
                "rope_type": "longrope",
                "original_max_positions": 64,
                "short_factor": [1.0] * 7 + [0.0],
                "long_factor": [1.0] * 8,
            },
            r"short_factor\[7\]",
        ),
    ],
)
def test_bad_scaling_is_a_value_error_naming_the_argument(fields, match):
    with pytest.raises(ValueError, match=match):
        cn.RopeScaling(**fields)
    with pytest.raises(ValueError, match=match):
        cn.RotaryConfig(scaling=fields)


def test_bad_use_is_a_value_error():
    longrope = dict(CASES["longrope-short"][2])
    with pytest.raises(ValueError, match="short_factor.*d/2 = 4"):
        cn.rotary_frequencies(8, scaling=longrope)
    x = np.zeros((3, 8))
    with pytest.raises(ValueError, match="short_factor"):
        cn.rotary_embedding(x, np.arange(3), scaling=longrope)
    with pytest.raises(ValueError, match="at least 4"):
        cn.rotary_frequencies(2, scaling={"rope_type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match="seq_len"):
        cn.rotary_frequencies(16, scaling=CASES["dynamic-long"][2], seq_len=-1)
    with pytest.raises(TypeError, match="factor"):
        cn.RopeScaling("linear", factor="2")
    with pytest.raises(TypeError, match="scaling"):
        cn.rotary_frequencies(16, scaling="yarn")
    with pytest.raises(TypeError, match="truncate"):
        cn.RopeScaling("yarn", factor=2, original_max_positions=8, truncate=1)


def test_scaling_is_frozen_and_hashable():
    a = cn.RopeScaling(**CASES["longrope-short"][2])
    b = cn.RopeScaling(**CASES["longrope-short"][2])
    assert a == b and hash(a) == hash(b) and a.short_factor == tuple(SHORT)
    assert isinstance(
        cn.RotaryConfig(scaling=dict(CASES["yarn"][2])).scaling, _positions.RopeScaling
    )


def test_gemma4_proportional_rotation_equals_hugging_face(hf):
    """Gemma 4's full-attention layers (``"proportional"``, a larger
    ``global_head_dim``): Transformers' cos/sin applied with ``rotate_half`` to the
    whole head equal our halves' layout with ``hf.rope``'s scaling, weights
    unpermuted; the pairs of frequency 0 come out unchanged. The sliding layers
    (default type, ``head_dim``) as well."""
    import torch

    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma4 import modeling_gemma4 as gemma4

    from companion import hf as chf
    from companion import torch as ct

    config = transformers.Gemma4TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size=100,
        intermediate_size=32,
    )
    embedding = gemma4.Gemma4TextRotaryEmbedding(config)
    g = torch.Generator().manual_seed(3)
    positions = torch.arange(11)
    for layer_type, D in (("full_attention", 32), ("sliding_attention", 16)):
        x = torch.randn(1, 11, 4, D, generator=g)  # (B, L, H, D), as Gemma 4 holds it
        cos, sin = embedding(x, positions[None], layer_type)
        theirs = gemma4.apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
        rope = cn.RotaryConfig(**chf.rope(config, layer_type=layer_type))
        assert rope.rotary_dim is None and not rope.interleaved
        # (B, H, L, D)
        ours = ct.rotary_embedding(
            x.transpose(1, 2), positions, base=rope.base, scaling=rope.scaling
        ).transpose(1, 2)
        assert_close(ours, theirs)  # HF's cos and sin are float32
        if layer_type == "full_attention":
            turned = int(0.25 * D // 2)  # 4 pairs: features 0..3 and 16..19
            still = [i for i in range(D) if i % (D // 2) >= turned]
            assert torch.equal(ours[..., still], x[..., still])
            assert not torch.allclose(ours[..., :turned], x[..., :turned])
