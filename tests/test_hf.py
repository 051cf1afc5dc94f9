"""companion.hf against Hugging Face Transformers, in float64, nothing downloaded.

Every model is built from a configuration with random weights (``HF_HUB_OFFLINE=1``);
the numpy float64 reference (``companion.numpy``) and the package's torch models are
compared with what Transformers computes from the same weights.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from companion import hf  # noqa: E402
from companion.numpy import (  # noqa: E402
    MultiHeadParams,
    multi_head_attention,
    padding_mask,
)
from companion.params import (  # noqa: E402
    PRESETS,
    count_parameters,
    transformer_parameter_count,
)
from companion.testing import assert_close, default_tolerance  # noqa: E402

B, L, E, H = 2, 7, 32, 4
VOCAB = 61


@pytest.fixture
def x():
    # (B, L, E)
    return np.random.default_rng(0).standard_normal((B, L, E))


def _causal_float_mask(L: int) -> torch.Tensor:
    """Hugging Face's additive causal mask ``(1, 1, L, L)``: 0 or -inf."""
    return torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)[None, None]


def _padding_float_mask(lengths, S: int) -> torch.Tensor:
    """Hugging Face's additive padding mask ``(B, 1, 1, S)`` from ``padding_mask``."""
    keep = torch.from_numpy(padding_mask(lengths, S))  # (B, 1, 1, S)
    return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(
        ~keep, float("-inf")
    )


def _output_of(module, submodule, *args, **kwargs) -> torch.Tensor:
    """What ``submodule`` returns while ``module(*args, **kwargs)`` runs."""
    seen = {}
    handle = submodule.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        handle.remove()
    return seen["out"]


def _gpt2(**changes):
    config = transformers.GPT2Config(
        n_embd=E,
        n_head=H,
        n_layer=2,
        vocab_size=VOCAB,
        n_positions=24,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
        **changes,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


# --- import ---------------------------------------------------------------------------


def test_import_companion_hf_loads_no_framework():
    code = (
        "import sys, companion.hf; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'transformers', 'tensorflow')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- attention ------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_gpt2_attention_equals_multi_head_attention(x, implementation):
    attention = _gpt2(attn_implementation=implementation).transformer.h[0].attn
    params = hf.attention_params(attention)
    assert (params.num_heads, params.num_kv_heads, params.w_q.shape) == (H, H, (E, E))
    with torch.no_grad():
        expected = attention(torch.from_numpy(x), attention_mask=_causal_float_mask(L))[
            0
        ]
    actual = multi_head_attention(x, x, params, causal=True)
    assert_close(actual, expected, name="GPT-2 attention")


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_encoder_attention_equals_multi_head_attention(x, family):
    """The output projection ``dense`` (before the residual and LayerNorm), padded."""
    common = dict(
        hidden_size=E,
        num_attention_heads=H,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
        attention = model.double().eval().encoder.layer[0].attention
        dense = attention.output.dense
    else:
        config = transformers.AlbertConfig(embedding_size=16, **common)
        model = transformers.AlbertModel(config).double().eval()
        attention = model.encoder.albert_layer_groups[0].albert_layers[0].attention
        dense = attention.dense
    params = hf.attention_params(attention)
    lengths = [L, 3]
    expected = _output_of(
        attention,
        dense,
        torch.from_numpy(x),
        attention_mask=_padding_float_mask(lengths, L),
    )
    actual = multi_head_attention(x, x, params, mask=padding_mask(lengths, L))
    assert_close(actual, expected, name=f"{family} attention")


def _llama_attention(num_kv_heads: int, implementation: str = "sdpa"):
    config = transformers.LlamaConfig(
        hidden_size=E,
        num_attention_heads=H,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=VOCAB,
        attention_bias=True,
        attn_implementation=implementation,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    return model, model.model.layers[0].self_attn


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_llama_attention_without_rotation(x, num_kv_heads):
    """Grouped-query heads; cos = 1, sin = 0 makes the rotary embedding the identity."""
    _, attention = _llama_attention(num_kv_heads)
    params = hf.attention_params(attention)
    assert (params.num_heads, params.num_kv_heads) == (H, num_kv_heads)
    D = E // H
    identity = (
        torch.ones(1, L, D, dtype=torch.float64),
        torch.zeros(1, L, D, dtype=torch.float64),
    )
    with torch.no_grad():
        expected = attention(
            torch.from_numpy(x),
            position_embeddings=identity,
            attention_mask=_causal_float_mask(L),
        )[0]
    actual = multi_head_attention(x, x, params, causal=True)
    assert_close(actual, expected, name=f"Llama attention, H_kv={num_kv_heads}")


def _rotary_tables(positions: torch.Tensor, D: int, theta: float):
    """Llama's ``(cos, sin)``, ``(1, L, D)`` each, from the definition in float64.

    Pair ``(i, i + D/2)`` turns by ``p * theta^(-2i/D)``; rotate_half reads each angle
    twice, ``cat(freqs, freqs)``.
    """
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    freqs = positions.double()[..., None] * inv_freq  # (1, L, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (1, L, D)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_llama_attention_with_rotary_embedding(num_kv_heads):
    """Llama's rotate_half is ``rope=hf.rope(config)``, in float64, cached or not.

    Hugging Face computes its own tables in float32 whatever the model's dtype
    (``LlamaRotaryEmbedding.forward`` calls ``.float()``): they equal the float64
    tables to float32 rounding, so the float64 comparison gets the exact tables.
    """
    from companion.numpy import KVCache

    model, attention = _llama_attention(num_kv_heads)
    params = MultiHeadParams.from_hf(attention)
    rope = hf.rope(model.config)
    assert rope == {"base": 10000.0, "interleaved": False, "rotary_dim": None}
    T, prefix = L + 3, 3
    # (B, T, E)
    x = np.random.default_rng(1).standard_normal((B, T, E))
    hidden = torch.from_numpy(x)
    positions = torch.arange(T)[None]  # (1, T)
    cos, sin = _rotary_tables(positions, E // H, rope["base"])
    with torch.no_grad():
        theirs_cos, theirs_sin = model.model.rotary_emb(hidden, positions)
        expected = attention(
            hidden, position_embeddings=(cos, sin), attention_mask=_causal_float_mask(T)
        )[0]
    float32 = dict(zip(("rtol", "atol"), default_tolerance("float32")))
    assert_close(theirs_cos, cos, name="HF cos (float32 tables)", **float32)
    assert_close(theirs_sin, sin, name="HF sin (float32 tables)", **float32)
    whole = multi_head_attention(x, x, params, causal=True, rope=rope)
    assert_close(whole, expected, name="Llama attention with RoPE")
    # a cached prefix: the new tokens sit at positions prefix .. T - 1
    cache = KVCache()
    first, rest = x[:, :prefix], x[:, prefix:]
    multi_head_attention(first, first, params, causal=True, rope=rope, cache=cache)
    step = multi_head_attention(rest, rest, params, causal=True, rope=rope, cache=cache)
    assert_close(step, expected[:, prefix:], name="Llama attention with RoPE, cached")


def test_from_hf_refuses_what_it_cannot_express():
    scaled = _gpt2(scale_attn_by_inverse_layer_idx=True).transformer.h[1].attn
    with pytest.raises(ValueError, match="scale"):
        hf.attention_params(scaled)
    with pytest.raises(TypeError, match="module must be"):
        hf.attention_params(torch.nn.Linear(2, 2))


def test_from_hf_classmethod():
    attention = _gpt2().transformer.h[0].attn
    params = MultiHeadParams.from_hf(attention)
    expected = hf.attention_params(attention)
    for name in ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o"):
        np.testing.assert_array_equal(getattr(params, name), getattr(expected, name))


# --- configurations and counts --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counts_equal_num_parameters(name):
    config = PRESETS[name]
    with torch.device("meta"):  # no memory, whatever the size
        model = hf.hf_model(config)
    n = model.num_parameters()
    assert transformer_parameter_count(config) == n
    assert count_parameters(model) == n
    assert hf.transformer_config(model.config) == config


def test_gpt2_head_is_the_token_embedding():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_hf_config_refuses_grouped_heads():
    with pytest.raises(ValueError, match="grouped"):
        hf.hf_config(PRESETS["bert-base"].replace(num_kv_heads=4))
    with pytest.raises(TypeError, match="TransformerConfig"):
        hf.hf_config({"hidden_size": 8})


# --- whole models ---------------------------------------------------------------------


def test_gpt2_into_tiny_transformer_lm_logits():
    model = _gpt2()
    tiny = hf.tiny_lm_from_gpt2(model)
    assert tiny.head.weight is tiny.embedding.weight
    assert count_parameters(tiny) == model.num_parameters()
    ids = torch.randint(0, VOCAB, (B, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(tiny(ids), model(ids).logits, name="logits")


def test_cached_decoding_reproduces_generate():
    from companion.torch.models import generate

    model = _gpt2()
    tiny = hf.tiny_lm_from_gpt2(model)
    prompt = torch.randint(0, VOCAB, (B, 5), generator=torch.Generator().manual_seed(2))
    steps = 12
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
        )
    tokens = generate(tiny, prompt, steps, use_cache=True)
    assert torch.equal(tokens, out.sequences)
    # the caches after decoding: every position read, the last token produced only
    caches = tiny.new_caches()
    with torch.no_grad():
        tiny(tokens[:, :-1], caches=caches)
    theirs = out.cache
    for i, cache in enumerate(caches):
        assert cache.length == 5 + steps - 1
        assert_close(cache.key, theirs.layers[i].keys, name=f"keys of layer {i}")
        assert_close(cache.value, theirs.layers[i].values, name=f"values of layer {i}")


def test_gpt2_refused_when_different():
    with pytest.raises(ValueError, match="n_inner"):
        hf.tiny_lm_from_gpt2(_gpt2(n_inner=3 * E))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        hf.tiny_lm_from_gpt2(torch.nn.Linear(2, 2))


def _albert(**changes):
    config = transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=E,
        num_hidden_layers=3,
        num_attention_heads=H,
        intermediate_size=64,
        max_position_embeddings=20,
        **{"hidden_act": "gelu", **changes},
    )
    torch.manual_seed(0)
    return transformers.AlbertModel(config).double().eval()


def test_albert_into_transformer_encoder():
    model = _albert()
    assert model.config.layer_norm_eps == 1e-12
    encoder, pooler = hf.albert_encoder_from_hf(model)
    assert all(layer is encoder.layers[0] for layer in encoder.layers)
    assert encoder.embedding_norm.eps == 1e-12
    assert encoder.layers[0].ffn_norm.eps == 1e-12
    ids = torch.randint(0, VOCAB, (B, 9), generator=torch.Generator().manual_seed(3))
    lengths = [9, 6]
    keep = padding_mask(lengths, 9)  # (B, 1, 1, S), True = attend
    with torch.no_grad():
        expected = model(ids, attention_mask=torch.from_numpy(keep[:, 0, 0]).long())
        hidden = encoder(ids, mask=torch.from_numpy(keep))
        pooled = pooler(hidden[:, 0])
    assert_close(hidden, expected.last_hidden_state, name="hidden states")
    assert_close(pooled, expected.pooler_output, name="pooler")
    # parameters: the encoder has no segment table (one row folded into positions)
    segments = model.embeddings.token_type_embeddings.weight.numel()
    assert count_parameters(encoder) + count_parameters(pooler) + segments == (
        model.num_parameters()
    )


def test_albert_with_tanh_gelu_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf.albert_encoder_from_hf(_albert(hidden_act="gelu_new"))
