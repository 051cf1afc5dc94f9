"""companion.params: hand formulas against the frameworks' own counts, and the published
totals.

Published totals are those the reference implementations report for the real checkpoints
(Hugging Face ``num_parameters()``); they are checked by construction from the
configurations, with no download. The formulas are then checked against real torch and
Keras models built at small sizes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from companion import params
from companion.numpy import conv2d_output_size, locally_connected2d

# What the reference implementations report for the real checkpoints.
PUBLISHED = {
    "gpt2-small": 124_439_808,  # GPT2LMHeadModel "gpt2", LM head tied
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "bert-base": 109_482_240,  # BertModel "bert-base-uncased", with pooler
    "bert-large": 335_141_888,  # BertModel "bert-large-uncased"
    "albert-base": 11_683_584,  # AlbertModel "albert-base-v2", with pooler
}


def test_preset_names_are_exactly_the_contract():
    assert set(params.PRESETS) == {
        "gpt2-small",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "bert-base",
        "bert-large",
        "albert-base",
        "albert-large",
        "albert-xlarge",
        "albert-xxlarge",
    }


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_totals(preset):
    assert (
        params.transformer_parameter_count(params.PRESETS[preset]) == PUBLISHED[preset]
    )


@pytest.mark.parametrize("preset", list(params.PRESETS))
def test_breakdown_sums_to_the_total(preset):
    config = params.PRESETS[preset]
    parts = params.parameter_breakdown(config)
    assert set(parts) == {"embeddings", "attention", "mlp", "norms", "pooler", "head"}
    assert sum(parts.values()) == params.transformer_parameter_count(config)


def test_albert_sharing_divides_the_layers_only():
    """Unsharing ALBERT-base's layer multiplies attention, MLP and norms by the layer
    count."""
    shared = params.PRESETS["albert-base"]
    unshared = params.parameter_breakdown(shared.replace(share_layers=False))
    one = params.parameter_breakdown(shared)
    for part in ("attention", "mlp", "norms"):
        assert unshared[part] == shared.num_layers * one[part]
    for part in ("embeddings", "pooler", "head"):
        assert unshared[part] == one[part]


def test_untying_gpt2_adds_a_vocabulary_matrix():
    tied = params.PRESETS["gpt2-small"]
    untied = tied.replace(tie_embeddings=False)
    extra = params.transformer_parameter_count(
        untied
    ) - params.transformer_parameter_count(tied)
    assert extra == tied.vocab_size * tied.hidden_size


def test_flops_and_bytes():
    n = params.transformer_parameter_count(params.PRESETS["gpt2-small"])
    assert (
        params.training_flops_per_token(n)
        == 3 * params.inference_flops_per_token(n)
        == 6 * n
    )
    for dtype in ("float64", "float32", "float16"):
        assert params.weight_bytes(1000, dtype) == np.zeros(1000, dtype=dtype).nbytes
    with pytest.raises(ValueError, match="dtype"):
        params.weight_bytes(10, "float13")


# --- single layers against torch and keras --------------------------------------------


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", [(1, 1), (7, 3), (16, 5)], ids=["1-1", "7-3", "16-5"])
def test_dense_count_matches_frameworks(sizes, bias, keras):
    import torch

    d_in, d_out = sizes
    expected = params.dense_parameter_count(d_in, d_out, bias=bias)
    assert params.count_parameters(torch.nn.Linear(d_in, d_out, bias=bias)) == expected
    layer = keras.layers.Dense(d_out, use_bias=bias)
    layer.build((None, d_in))
    assert layer.count_params() == params.count_parameters(layer) == expected


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "channels,kernel,groups",
    [((3, 8), 3, 1), ((4, 6), (1, 5), 2), ((6, 6), 3, 6)],
    ids=["3x3", "1x5-groups2", "depthwise"],
)
def test_conv2d_count_matches_frameworks(channels, kernel, groups, bias, keras):
    import torch

    c_in, c_out = channels
    expected = params.conv2d_parameter_count(
        c_in, c_out, kernel, groups=groups, bias=bias
    )
    assert (
        params.count_parameters(
            torch.nn.Conv2d(c_in, c_out, kernel, groups=groups, bias=bias)
        )
        == expected
    )
    layer = keras.layers.Conv2D(c_out, kernel, groups=groups, use_bias=bias)
    layer.build((None, 11, 11, c_in))
    assert layer.count_params() == expected


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, "same")])
def test_locally_connected_count_is_its_weight_size(stride, padding, rng):
    c_in, c_out, k, size = 3, 4, 3, (9, 7)
    out_size = conv2d_output_size(size, k, stride=stride, padding=padding)
    weight = rng.standard_normal((*out_size, c_out, c_in, k, k))
    bias = rng.standard_normal((*out_size, c_out))
    y = locally_connected2d(
        rng.standard_normal((1, c_in, *size)),
        weight,
        bias,
        stride=stride,
        padding=padding,
    )
    assert y.shape[2:] == out_size
    expected = params.locally_connected2d_parameter_count(c_in, c_out, k, out_size)
    assert expected == weight.size + bias.size
    assert expected == out_size[0] * out_size[1] * params.conv2d_parameter_count(
        c_in, c_out, k
    )


@pytest.mark.parametrize("embed_dim,num_heads", [(8, 1), (12, 3), (16, 4)])
def test_attention_count_matches_torch_and_keras(embed_dim, num_heads, keras):
    import torch

    expected = params.attention_parameter_count(embed_dim, num_heads, num_heads)
    assert (
        params.count_parameters(torch.nn.MultiheadAttention(embed_dim, num_heads))
        == expected
    )
    layer = keras.layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=embed_dim // num_heads
    )
    x = np.zeros((1, 2, embed_dim), dtype="float32")
    layer(x, x)
    assert layer.count_params() == expected


def _gqa_projections(embed_dim, num_heads, num_kv_heads, head_dim, bias):
    import torch

    return torch.nn.ModuleDict(
        {
            "q": torch.nn.Linear(embed_dim, num_heads * head_dim, bias=bias),
            "k": torch.nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias),
            "v": torch.nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias),
            "o": torch.nn.Linear(num_heads * head_dim, embed_dim, bias=bias),
        }
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 6], ids=lambda h: f"Hkv{h}")
def test_grouped_query_attention_count(num_kv_heads, bias):
    embed_dim, num_heads, head_dim = 24, 6, 5
    expected = params.attention_parameter_count(
        embed_dim, num_heads, num_kv_heads, head_dim, bias=bias
    )
    model = _gqa_projections(embed_dim, num_heads, num_kv_heads, head_dim, bias)
    assert params.count_parameters(model) == expected


def test_grouped_query_attention_rejects_uneven_groups():
    with pytest.raises(ValueError, match="multiple"):
        params.attention_parameter_count(16, 4, 3)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
def test_kv_cache_bytes_is_the_cache_arrays_size(num_kv_heads):
    layers, batch, seq_len, head_dim = 3, 2, 17, 4
    keys = np.zeros((layers, batch, num_kv_heads, seq_len, head_dim), dtype=np.float16)
    values = np.zeros_like(keys)
    assert (
        params.kv_cache_bytes(layers, num_kv_heads, head_dim, seq_len, batch, 2)
        == keys.nbytes + values.nbytes
    )


# --- whole models built small ---------------------------------------------------------


def _tiny_transformer(config: params.TransformerConfig):
    """A transformer built from torch.nn pieces, shaped like GPT-2 / BERT / ALBERT by
    ``config``."""
    import torch
    from torch import nn

    E, e = config.hidden_size, config.embedding_size or config.hidden_size
    H, H_kv = config.num_heads, config.num_kv_heads or config.num_heads
    D = E // H

    def layer():
        return nn.ModuleDict(
            {
                "attention": _gqa_projections(E, H, H_kv, D, config.attention_bias),
                "norm1": nn.LayerNorm(E),
                "norm2": nn.LayerNorm(E),
                "mlp_in": nn.Linear(E, config.intermediate_size, bias=config.mlp_bias),
                "mlp_out": nn.Linear(config.intermediate_size, E, bias=config.mlp_bias),
            }
        )

    model = nn.ModuleDict(
        {
            "token": nn.Embedding(config.vocab_size, e),
            "position": nn.Embedding(config.max_positions, e),
        }
    )
    if config.type_vocab_size:
        model["segment"] = nn.Embedding(config.type_vocab_size, e)
    if config.embedding_norm:
        model["embedding_norm"] = nn.LayerNorm(e)
    if e != E:
        model["project"] = nn.Linear(e, E)
    shared = layer()
    model["layers"] = nn.ModuleList(
        [shared if config.share_layers else layer() for _ in range(config.num_layers)]
    )
    if config.final_norm:
        model["final_norm"] = nn.LayerNorm(E)
    if config.pooler:
        model["pooler"] = nn.Linear(E, E)
    if config.lm_head:
        model["head"] = nn.Linear(E, config.vocab_size, bias=False)
        if config.tie_embeddings:
            model["head"].weight = model["token"].weight  # one tensor, two uses
    assert isinstance(model, torch.nn.Module)
    return model


TINY = {
    "gpt2-like": dict(preset="gpt2-small"),
    "gpt2-untied": dict(preset="gpt2-small", tie_embeddings=False),
    "gpt2-gqa": dict(preset="gpt2-small", num_kv_heads=2),
    "bert-like": dict(preset="bert-base"),
    "albert-like": dict(preset="albert-base", embedding_size=6),
    "albert-unshared": dict(preset="albert-base", embedding_size=6, share_layers=False),
}


@pytest.mark.parametrize("name", list(TINY))
def test_formula_matches_a_tiny_torch_model(name):
    changes = dict(TINY[name])
    base = params.PRESETS[changes.pop("preset")]
    config = base.replace(
        vocab_size=53,
        max_positions=11,
        hidden_size=16,
        num_layers=3,
        num_heads=4,
        intermediate_size=24,
        **changes,
    )
    model = _tiny_transformer(config)
    assert params.count_parameters(model) == params.transformer_parameter_count(config)
    # torch's own dedup agrees; summing without it would count the shared tensors again
    assert params.count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_count_parameters_counts_a_shared_tensor_once():
    import torch

    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleList([embedding, head])
    assert params.count_parameters(model) == 40
    assert (
        sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) == 80
    )


def test_count_parameters_trainable_only():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert (
        params.count_parameters(model, trainable_only=True)
        == params.count_parameters(model) - 12
    )


def test_count_parameters_keras_shared_layer_once(keras):
    shared = keras.layers.Dense(5)
    inputs = keras.Input((5,))
    # one layer used twice
    outputs = shared(shared(inputs))
    model = keras.Model(inputs, outputs)
    assert (
        params.count_parameters(model)
        == model.count_params()
        == params.dense_parameter_count(5, 5)
    )


def test_count_parameters_rejects_other_objects():
    with pytest.raises(TypeError, match="model"):
        params.count_parameters(np.zeros(3))


# --- the source document's Keras CNN and its torch twin -------------------------------


def _source_cnn_formula(image_size=28, in_channels=1):
    """The hand count: conv, pool (no parameters), conv, pool, dense, dense."""
    # conv 3x3 "valid", then 2x2 pooling
    side = conv2d_output_size(image_size, 3)[0] // 2
    side = conv2d_output_size(side, 3)[0] // 2
    return (
        params.conv2d_parameter_count(in_channels, 32, 3)
        + params.conv2d_parameter_count(32, 64, 3)
        + params.dense_parameter_count(64 * side * side, 64)
        + params.dense_parameter_count(64, 10)
    )


@pytest.fixture(scope="module")
def source_keras_cnn(keras):
    from companion.sources import run_source

    keras.utils.set_random_seed(0)
    with warnings.catch_warnings():
        # keras 3: `input_shape` on a layer
        warnings.simplefilter("ignore", UserWarning)
        return run_source("keras_cnn")["model"]


def test_source_keras_cnn_count(source_keras_cnn):
    assert source_keras_cnn.count_params() == _source_cnn_formula()
    assert params.count_parameters(source_keras_cnn) == source_keras_cnn.count_params()


def test_source_cnn_torch_twin_count():
    from companion.torch import SourceCNN

    assert params.count_parameters(SourceCNN()) == _source_cnn_formula()


def test_source_cnn_torch_twin_computes_the_same_function(source_keras_cnn, rng):
    import torch

    from companion.testing import assert_close
    from companion.torch import SourceCNN

    images = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)  # NHWC for keras
    expected = source_keras_cnn(images)
    twin = SourceCNN.from_keras(source_keras_cnn)
    with torch.no_grad():
        # NCHW for torch
        out = twin(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    assert_close(out, expected, rtol=1e-4, atol=1e-6, name="torch twin vs keras")


# --- encoder-decoder transformers (Vaswani et al. 2017) -------------------------------


# Vaswani et al. 2017, Table 3, and what torch counts for the same sizes (three-way tied
# embeddings over a shared vocabulary of 37000 tokens, no final LayerNorms).
PAPER = {"transformer-base": 65e6, "transformer-big": 213e6}


@pytest.mark.parametrize("preset", list(PAPER))
def test_encoder_decoder_presets_against_torch(preset):
    """Built on the meta device (no memory): ours and nn.Transformer count alike."""
    torch = pytest.importorskip("torch")
    from companion.torch.seq2seq import Seq2SeqTransformer

    c = params.ENCODER_DECODER_PRESETS[preset]
    n = params.encoder_decoder_parameter_count(c)
    ours = Seq2SeqTransformer(
        c.vocab_size,
        c.vocab_size,
        c.hidden_size,
        c.num_heads,
        c.num_encoder_layers,
        c.num_decoder_layers,
        c.intermediate_size,
        share_embeddings=c.share_embeddings,
        device="meta",
    )
    assert params.count_parameters(ours) == n
    theirs = torch.nn.Transformer(
        c.hidden_size,
        c.num_heads,
        c.num_encoder_layers,
        c.num_decoder_layers,
        c.intermediate_size,
        batch_first=True,
        device="meta",
    )
    # nn.Transformer has a final LayerNorm (gamma, beta) after each stack; one embedding
    final_norms = 2 * 2 * c.hidden_size
    embedding = c.vocab_size * c.hidden_size
    assert params.count_parameters(theirs) - final_norms + embedding == n
    # within 3% of the paper's rounded totals (the chapter explains the gap)
    assert abs(n / PAPER[preset] - 1) < 0.03


def test_encoder_decoder_sharing_removes_vocabulary_matrices():
    base = params.ENCODER_DECODER_PRESETS["transformer-base"]
    V, E = base.vocab_size, base.hidden_size
    counts = {
        share: params.encoder_decoder_parameter_count(
            base.replace(share_embeddings=share)
        )
        for share in ("none", "decoder-output", "all")
    }
    assert counts["none"] - counts["decoder-output"] == V * E
    assert counts["decoder-output"] - counts["all"] == V * E
    with pytest.raises(ValueError, match="share_embeddings"):
        params.encoder_decoder_parameter_count(base.replace(share_embeddings="some"))
    with pytest.raises(ValueError, match="one vocabulary"):
        params.encoder_decoder_parameter_count(base.replace(tgt_vocab_size=V + 1))
    parts = params.encoder_decoder_parameter_breakdown(base.replace(final_norm=True))
    assert parts["final_norms"] == 4 * E
