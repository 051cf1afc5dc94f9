"""companion.hf follows each architecture or refuses it by name (issue 22 items 29-31,
issue 23's companion.hf errors). Models are built from configurations with random
weights; nothing downloads."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from companion import hf  # noqa: E402
from companion.numpy import multi_head_attention  # noqa: E402
from companion.testing import assert_close  # noqa: E402

B, L, E, H, D = 2, 7, 32, 4, 8
VOCAB = 61
SMALL = dict(
    hidden_size=E,
    num_attention_heads=H,
    num_hidden_layers=1,
    intermediate_size=64,
    vocab_size=VOCAB,
)


def _rotated_features(rotary_embedding) -> int:
    """How many features Transformers' own rotary module turns (2 per frequency)."""
    return 2 * rotary_embedding.inv_freq.shape[-1]


# --- rope: what each architecture does ------------------------------------------------


def test_llama_ignores_partial_rotary_factor():
    # before: rotary_dim=4 where Transformers rotates all 8 features
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(**SMALL, partial_rotary_factor=0.5)
    assert hf.rope(config) == {
        "base": 10000.0,
        "interleaved": False,
        "rotary_dim": None,
    }
    assert _rotated_features(LlamaRotaryEmbedding(config)) == D


def test_gpt_neox_and_stablelm_honour_the_factor():
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.stablelm.modeling_stablelm import (
        StableLmRotaryEmbedding,
    )

    neox = transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.25)
    assert (
        hf.rope(neox)["rotary_dim"]
        == 2
        == _rotated_features(GPTNeoXRotaryEmbedding(neox))
    )
    assert hf.rope(neox)["interleaved"] is False
    stable = transformers.StableLmConfig(**SMALL, partial_rotary_factor=0.5)
    assert (
        hf.rope(stable)["rotary_dim"]
        == 4
        == _rotated_features(StableLmRotaryEmbedding(stable))
    )


def test_glm_and_deepseek_rotate_neighbouring_pairs():
    glm = transformers.GlmConfig(**SMALL, head_dim=D)
    assert hf.rope(glm) == {"base": 10000.0, "interleaved": True, "rotary_dim": 4}
    v2 = transformers.DeepseekV2Config(**SMALL)
    assert hf.rope(v2)["interleaved"] is True
    v3 = transformers.DeepseekV3Config(**SMALL)
    assert hf.rope(v3)["interleaved"] is True
    plain = transformers.DeepseekV3Config(**SMALL, rope_interleave=False)
    assert hf.rope(plain)["interleaved"] is False


def test_rope_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match=r"GPT2Config \(model_type 'gpt2'\)"):
        hf.rope(transformers.GPT2Config())
    with pytest.raises(ValueError, match="FalconConfig"):
        hf.rope(transformers.FalconConfig())
    with pytest.raises(TypeError, match="config must be a Hugging Face configuration"):
        hf.rope(None)
    with pytest.raises(TypeError, match="got dict"):
        hf.rope({"model_type": "llama"})


def _glm_attention():
    config = transformers.GlmConfig(
        **SMALL,
        head_dim=D,
        num_key_value_heads=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(config).double().eval()
    return model, model.model.layers[0].self_attn


def _glm_tables(T: int, rotary_dim: int, theta: float):
    """GLM's ``(cos, sin)`` ``(1, T, rotary_dim)`` from its formula, in float64."""
    inv_freq = theta ** (
        -torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    )
    freqs = torch.arange(T, dtype=torch.float64)[None, :, None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)  # GLM's layout, as Llama's
    return angles.cos(), angles.sin()


def test_glm_attention_converts_with_its_rope():
    """GLM: neighbouring pairs over half the head; through sdpa, float64 tables."""
    model, attention = _glm_attention()
    rope = hf.rope(model.config)
    params = hf.attention_params(attention)
    assert (params.num_heads, params.num_kv_heads) == (H, 2)
    x = np.random.default_rng(1).standard_normal((B, L, E))
    hidden = torch.from_numpy(x)
    cos, sin = _glm_tables(L, rope["rotary_dim"], rope["base"])
    with torch.no_grad():
        theirs_cos, theirs_sin = model.model.rotary_emb(hidden, torch.arange(L)[None])
        causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
        expected = attention(
            hidden, position_embeddings=(cos, sin), attention_mask=causal[None, None]
        )[0]
    # the float64 tables are Transformers' own (which it builds in float32)
    assert_close(theirs_cos, cos, rtol=1e-6, atol=1e-6, name="GLM cos")
    assert_close(theirs_sin, sin, rtol=1e-6, atol=1e-6, name="GLM sin")
    ours = multi_head_attention(x, x, params, causal=True, rope=rope)
    assert_close(ours, expected, rtol=1e-10, atol=1e-10, name="GLM attention")


# --- attention_params: what it cannot convert ---------------------------------------


def _deepseek_v3_attention(q_lora_rank):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
    )

    config = transformers.DeepseekV3Config(
        **SMALL,
        num_key_value_heads=H,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    )
    return DeepseekV3Attention(config, layer_idx=0)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_latent_attention_is_refused_by_name(q_lora_rank):
    # before: a bare AttributeError (k_proj) with q_lora_rank=None
    with pytest.raises(TypeError, match="DeepseekV3Attention is multi-head latent"):
        hf.attention_params(_deepseek_v3_attention(q_lora_rank))


def test_query_key_norms_are_refused_by_name():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = transformers.Qwen3Config(**SMALL, head_dim=D, num_key_value_heads=2)
    with pytest.raises(ValueError, match="Qwen3Attention normalises .*q_norm"):
        hf.attention_params(Qwen3Attention(config, layer_idx=0))


def test_other_modules_are_refused_by_name():
    class Half(torch.nn.Module):  # q_proj and o_proj, nothing else
        def __init__(self):
            super().__init__()
            self.q_proj = self.o_proj = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Half has q_proj and o_proj but no k_proj"):
        hf.attention_params(Half())
    with pytest.raises(TypeError, match="got NoneType"):
        hf.attention_params(None)


# --- whole models -------------------------------------------------------------------


def _gpt2_lm():
    config = transformers.GPT2Config(
        n_embd=E, n_head=H, n_layer=2, vocab_size=VOCAB, n_positions=24
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_tiny_lm_from_the_gpt2_base_model():
    # before: AttributeError ('GPT2Model' has no attribute 'transformer')
    model = _gpt2_lm()
    tiny = hf.tiny_lm_from_gpt2(model.transformer)  # the GPT2Model
    ids = torch.randint(0, VOCAB, (B, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(tiny(ids), model(ids).logits, name="logits from GPT2Model")
    classifier = transformers.GPT2ForSequenceClassification(model.config)
    with pytest.raises(TypeError, match="GPT2LMHeadModel or GPT2Model, got GPT2For"):
        hf.tiny_lm_from_gpt2(classifier)


def test_dtype_may_be_named():
    # before: dtype="float16" reached .to() as a device string
    model = _gpt2_lm()
    assert hf.tiny_lm_from_gpt2(model, dtype="float32").head.weight.dtype == (
        torch.float32
    )
    assert hf.tiny_lm_from_gpt2(
        model, dtype="torch.float16"
    ).embedding.weight.dtype == (torch.float16)
    with pytest.raises(ValueError, match="'nodtype' names no torch dtype"):
        hf.tiny_lm_from_gpt2(model, dtype="nodtype")
    with pytest.raises(ValueError, match="floating"):
        hf.tiny_lm_from_gpt2(model, dtype="int32")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or its name"):
        hf.tiny_lm_from_gpt2(model, dtype=3)


def _albert_config():
    return transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=E,
        num_hidden_layers=2,
        num_attention_heads=H,
        intermediate_size=64,
        max_position_embeddings=20,
        hidden_act="gelu",
    )


def test_albert_from_a_model_with_a_head_and_without_a_pooler():
    # before: AttributeError for AlbertForMaskedLM (no .embeddings; its AlbertModel
    # has no pooler)
    torch.manual_seed(0)
    masked = transformers.AlbertForMaskedLM(_albert_config()).double().eval()
    assert masked.albert.pooler is None
    encoder, pooler = hf.albert_encoder_from_hf(masked, dtype="float64")
    assert pooler is None
    ids = torch.randint(0, VOCAB, (B, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = masked.albert(ids).last_hidden_state
        assert_close(encoder(ids), expected, name="AlbertForMaskedLM's encoder")
    bare = transformers.AlbertModel(_albert_config(), add_pooling_layer=False)
    assert hf.albert_encoder_from_hf(bare)[1] is None
    with pytest.raises(TypeError, match="AlbertModel, got GPT2LMHeadModel"):
        hf.albert_encoder_from_hf(_gpt2_lm())
