"""Whole tiny Qwen3, Gemma 3 and Gemma 2 models (and Llama, Mistral) against the
package's ``GPT`` (issue 26): logits to 1e-10 in float64, greedy tokens equal.

Every model is built from a configuration with random weights (nothing downloaded),
its weights are copied by :func:`companion.hf.gpt_from_hf`, and the two are compared:

* **logits** in float64, at most 1e-10 apart, for a prompt longer than the sliding
  window (so the window decides the result: checked by removing it);
* **greedy generation** of 20 tokens: Hugging Face's ``generate`` with its cache, the
  GPT without a cache, the GPT with its rolling caches (a ``KVCache(max_length=W)``
  on each sliding layer, the cache bug most reported in the anchors), and with full
  caches: the same tokens.

Transformers computes in float32 inside a float64 model in three places: the RoPE
tables (``.float()`` and ``dtype=torch.float``), Qwen3's RMSNorm
(``.to(torch.float32)``), Gemma's RMSNorm (``x.float()``), and the eager softmax
(``dtype=torch.float32``). :func:`_float64` runs Transformers' own modelling code with
``torch.float32`` read as ``torch.float64`` in that module and Gemma's norm without its
two ``.float()`` calls (the same formula in the input's dtype); the unchanged model is
compared too, at float32's tolerance, which is all those casts cost.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import modeling_rope_utils  # noqa: E402
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

from companion import hf  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch.gpt import generate  # noqa: E402

F64 = {"rtol": 0.0, "atol": 1e-10}
# what Transformers' float32 casts cost, logits of size ~3 (measured: 1.4e-6)
F32 = {"rtol": 1e-5, "atol": 1e-5}
V, W = 97, 5  # vocabulary, sliding window
PROMPT, STEPS = 9, 20  # the prompt is longer than the window


class _WideTorch:
    """``torch`` as a Transformers modelling module sees it, float32 read as
    float64."""

    float32 = torch.float64
    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _gemma_norm(self, x):
    """Gemma's RMSNorm forward without its ``.float()`` casts: the same formula."""
    return self._norm(x) * (1.0 + self.weight)


_MODULES = {
    "qwen3": (modeling_qwen3, None),
    "gemma3_text": (modeling_gemma3, modeling_gemma3.Gemma3RMSNorm),
    "gemma2": (modeling_gemma2, modeling_gemma2.Gemma2RMSNorm),
    "llama": (modeling_llama, None),
    "mistral": (modeling_mistral, None),
}


@contextlib.contextmanager
def _float64(model_type: str):
    """Transformers' modelling code of ``model_type`` (and its RoPE scaling rules)
    with no float32 inside."""
    module, norm = _MODULES[model_type]
    saved = module.torch, None if norm is None else norm.forward
    module.torch = modeling_rope_utils.torch = _WideTorch()
    if norm is not None:
        norm.forward = _gemma_norm
    try:
        yield
    finally:
        module.torch = modeling_rope_utils.torch = saved[0]
        if norm is not None:
            norm.forward = saved[1]


def _randomise(model, seed: int, gemma: bool):
    """Weights of size ~1/sqrt(fan_in), norms near 1 (Gemma: ``w`` near 0, it
    multiplies by ``1 + w``), so that logits are of size ~3, not ~0.01."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() == 1:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model


_COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    vocab_size=V,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)

CASES = {
    # Qwen3: QK-norm, untied, first layer global then sliding (max_window_layers=1)
    "qwen3-sliding": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=W,
            max_window_layers=1,
        ),
    ),
    "qwen3-tied": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(num_hidden_layers=2, tie_word_embeddings=True, head_dim=8),
    ),
    # Gemma 3: five sliding layers to one global, two RoPE bases, sandwich norms,
    # QK-norm, query_pre_attn_scalar, embeddings * sqrt(E), final soft-capping
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            num_hidden_layers=7,
            sliding_window=W,
            query_pre_attn_scalar=24,
            final_logit_softcapping=4.0,
        ),
    ),
    # Gemma 2: soft-capped attention scores (eager: SDPA refuses softcap)
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            num_hidden_layers=4,
            tie_word_embeddings=False,
            sliding_window=W,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=4.0,
        ),
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(num_hidden_layers=2, rope_theta=500.0),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_hidden_layers=2, sliding_window=W),
    ),
}


def _model(case: str, **changes):
    config_class, model_class, kwargs = CASES[case]
    config = config_class(
        **{**_COMMON, **kwargs, **changes},
        attn_implementation="eager" if case == "gemma2" else "sdpa",
    )
    torch.manual_seed(0)
    with _float64(config.model_type):  # RoPE tables computed in float64
        model = model_class(config).double().eval()
    return _randomise(model, seed=len(case), gemma=case.startswith("gemma"))


def _ids(T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_in_float64(case):
    model = _model(case)
    ours = hf.gpt_from_hf(model)
    ids = _ids(PROMPT + 4)
    with torch.no_grad():
        with _float64(model.config.model_type):
            expected = model(ids).logits
        actual = ours(ids)
    assert expected.abs().max() > 1.0  # logits of a size where 1e-10 means something
    assert_close(actual, expected, name=f"{case} logits", **F64)
    if case in ("qwen3-sliding", "gemma3"):
        # Transformers unchanged: only its float32 casts differ
        with torch.no_grad():
            plain = model(ids).logits
        assert_close(actual, plain, name=f"{case} logits, HF float32 casts", **F32)


@pytest.mark.parametrize("case", ["qwen3-sliding", "gemma3", "gemma2", "mistral"])
def test_the_window_matters(case):
    """Without its sliding windows the GPT computes other logits from position W on
    (so the equality above checks the windows), and the same ones before."""
    model = _model(case)
    ours = hf.gpt_from_hf(model)
    assert any(block.window == W for block in ours.blocks)
    ids = _ids(PROMPT + 4)
    with torch.no_grad():
        windowed = ours(ids)
        for block in ours.blocks:
            block.window = None
        full = ours(ids)
    assert_close(full[:, :W], windowed[:, :W], **F64)
    assert (full[:, W:] - windowed[:, W:]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["qwen3-sliding", "gemma3", "gemma2"])
def test_greedy_generation_equal_cached_and_not(case):
    # untied: a random tied Gemma repeats its last token (the embedding, times
    # sqrt(E), dominates the residual stream and the tied head reads it back)
    untied = {"tie_word_embeddings": False} if case.startswith("gemma") else {}
    model = _model(case, **untied)
    ours = hf.gpt_from_hf(model)
    prompt = _ids(PROMPT, seed=5)
    with torch.no_grad(), _float64(model.config.model_type):
        theirs = model.generate(
            prompt,
            max_new_tokens=STEPS,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    uncached = generate(ours, prompt, STEPS, temperature=0, use_cache=False)
    cached = generate(ours, prompt, STEPS, temperature=0)  # rolling caches
    assert theirs.shape == (2, PROMPT + STEPS)
    assert torch.equal(uncached, theirs)
    assert torch.equal(cached, theirs)
    assert len(set(theirs[:, PROMPT:].flatten().tolist())) > 4  # not one token
    # the rolling caches of the sliding layers hold the last W positions only, and
    # full caches give the same logits
    rolling, full = ours.new_caches(), ours.new_caches(rolling=False)
    with torch.no_grad():
        a = torch.cat([ours(t, caches=rolling) for t in theirs.split(3, dim=1)], 1)
        b = torch.cat([ours(t, caches=full) for t in theirs.split(3, dim=1)], 1)
    assert_close(a, b, **F64)
    for block, cache in zip(ours.blocks, rolling):
        assert cache.max_length == block.window
        expected = PROMPT + STEPS if block.window is None else W
        assert cache.length == expected and cache.seen == PROMPT + STEPS


def test_gemma3_configuration_becomes_keywords():
    model = _model("gemma3")
    config = hf.gpt_from_hf(model).config
    assert config["layer_types"] == ["local"] * 5 + ["global", "local"]
    assert (config["window"], config["rope_base"], config["local_rope_base"]) == (
        W,
        1e6,
        1e4,
    )
    assert config["embedding_scale"] == 8.0  # sqrt(64)
    assert config["attention_scale"] == 24**-0.5
    assert config["qk_norm"] and config["post_norms"] and config["tied"]
    assert (config["mlp"], config["logit_softcap"]) == ("geglu_tanh", 4.0)
    assert "attn_softcap" not in config  # Gemma 3 does not cap its scores


def test_parameter_counts_equal():
    for case in ("qwen3-sliding", "qwen3-tied", "gemma3"):
        model = _model(case)
        ours = hf.gpt_from_hf(model)
        assert ours.num_parameters() == model.num_parameters(), case


def test_rope_of_gemma3_per_layer_type():
    config = _model("gemma3").config
    assert hf.rope(config, layer_type="sliding_attention")["base"] == 1e4
    assert hf.rope(config, layer_type="full_attention")["base"] == 1e6
    with pytest.raises(ValueError, match="layer_type"):
        hf.rope(config)
    with pytest.raises(ValueError, match="layer_type"):
        hf.rope(transformers.Qwen3Config(), layer_type="full_attention")


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_logits_equal(kind):
    model = _model("llama", rope_parameters={**SCALINGS[kind], "rope_theta": 1e4})
    ours = hf.gpt_from_hf(model)
    assert ours.config["rope_scaling"]["rope_type"] == kind
    ids = _ids(PROMPT + 4)
    with torch.no_grad(), _float64("llama"):
        assert_close(ours(ids), model(ids).logits, name=f"{kind} logits", **F64)


def test_gemma3_scaled_global_layers():
    """Gemma 3 (4B and larger) scales the RoPE of its global layers only (linear,
    factor 8): ``rope_scaling`` for the global layers, the local ones unscaled."""
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    }
    model = _model("gemma3", rope_parameters=rope)
    ours = hf.gpt_from_hf(model)
    scaled = [b.attention.rope.scaling is not None for b in ours.blocks]
    assert scaled == [False] * 5 + [True, False]
    ids = _ids(PROMPT + 4)
    with torch.no_grad(), _float64("gemma3_text"):
        assert_close(ours(ids), model(ids).logits, name="Gemma 3 logits", **F64)


def test_refused():
    with pytest.raises(TypeError, match="model must be"):
        hf.gpt_from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mlp_bias"):
        hf.gpt_from_hf(_model("llama", mlp_bias=True))
    made_up = transformers.LlamaConfig(  # every rope type of Transformers converts
        rope_parameters={"rope_type": "made-up-type", "rope_theta": 1e4}
    )
    with pytest.raises(ValueError, match="made-up-type"):
        hf.rope(made_up)


def test_base_model_without_head():
    """The decoder without its head: its tied head is the token embedding; untied,
    there is no head to copy."""
    model = _model("qwen3-tied")
    ids = _ids(PROMPT)
    with torch.no_grad():
        assert_close(
            hf.gpt_from_hf(model.model)(ids), hf.gpt_from_hf(model)(ids), **F64
        )
    with pytest.raises(ValueError, match="no lm_head"):
        hf.gpt_from_hf(_model("qwen3-sliding").model)
