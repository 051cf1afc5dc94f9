"""The vision transformer (issue 25): the patch embedding is one linear map shared by
every patch and the same function as a convolution with kernel = stride = patch size;
the small ViT's pooling and position options; parity with Hugging Face ``ViTModel``
from a tiny config in float64 (weights copied, the sdpa path)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")

from companion.params import count_parameters  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch import models  # noqa: E402
from companion.torch.positions import sinusoidal_positions  # noqa: E402
from companion.torch.vit import (  # noqa: E402
    EncoderBlock,
    PatchEmbedding,
    VisionTransformer,
    sinusoidal_positions_2d,
)

F64 = {"rtol": 1e-12, "atol": 1e-12}


def _images(B=3, C=2, H=8, W=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64)


def test_patch_embedding_is_one_map_applied_to_every_patch():
    torch.manual_seed(0)
    embed = PatchEmbedding(2, 5, 4).double()
    images = _images()  # 2 x 3 patches of 4 x 4
    tokens = embed(images)
    assert tokens.shape == (3, 6, 5)
    n = 0
    for row in range(2):
        for col in range(3):
            patch = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            # the same weight and bias for every patch, features (channel, row, col)
            expected = patch.reshape(3, -1) @ embed.weight.T + embed.bias
            assert_close(tokens[:, n], expected, **F64, name=f"patch {n}")
            n += 1
    # one weight matrix, whatever the number of patches
    assert count_parameters(embed) == 5 * 2 * 4 * 4 + 5


def test_patch_embedding_equals_a_strided_convolution_both_ways():
    torch.manual_seed(1)
    embed = PatchEmbedding(2, 5, 4).double()
    images = _images(seed=1)
    # our conv path uses the same parameters
    assert_close(embed.forward_conv(images), embed(images), **F64)
    # torch's Conv2d given our weights computes our tokens ...
    conv = torch.nn.Conv2d(2, 5, 4, stride=4).double()
    with torch.no_grad():
        conv.weight.copy_(embed.weight.reshape(5, 2, 4, 4))
        conv.bias.copy_(embed.bias)
    assert_close(conv(images).flatten(2).transpose(1, 2), embed(images), **F64)
    # ... and a Conv2d's kernel, flattened, is our linear map
    torch.manual_seed(2)
    conv2 = torch.nn.Conv2d(2, 5, 4, stride=4).double()
    with torch.no_grad():
        embed.weight.copy_(conv2.weight.reshape(5, -1))
        embed.bias.copy_(conv2.bias)
    assert_close(embed(images), conv2(images).flatten(2).transpose(1, 2), **F64)
    # gradients reach the one shared weight from every patch, by both paths
    embed.zero_grad()
    embed(images).sum().backward()
    linear_grad = embed.weight.grad.clone()
    embed.zero_grad()
    embed.forward_conv(images).sum().backward()
    assert_close(embed.weight.grad, linear_grad, **F64)
    patch_sum = embed.patches(images).sum(dim=(0, 1))  # (C p p,)
    assert_close(linear_grad, patch_sum.expand(5, -1), **F64)


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(10, 4, 3)
    embed = PatchEmbedding(1, 4, 3)
    with pytest.raises(ValueError, match="patch_size"):
        embed(torch.zeros(1, 1, 9, 10))
    with pytest.raises(ValueError, match="images"):
        embed(torch.zeros(1, 2, 9, 9))
    with pytest.raises(ValueError, match="pooling"):
        VisionTransformer(8, 4, 3, pooling="max")
    with pytest.raises(ValueError, match="positions"):
        VisionTransformer(8, 4, 3, positions="rope")
    with pytest.raises(ValueError, match="images"):
        VisionTransformer(8, 4, 3)(torch.zeros(1, 1, 12, 12))
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_positions_2d(2, 2, 6)


def test_sinusoidal_2d_is_row_then_column():
    table = sinusoidal_positions_2d(3, 4, 8, dtype=torch.float64)
    assert table.shape == (12, 8)
    rows = sinusoidal_positions(3, 4, dtype=torch.float64)
    cols = sinusoidal_positions(4, 4, dtype=torch.float64)
    for r in range(3):
        for c in range(4):
            expected = torch.cat([rows[r], cols[c]])
            assert_close(table[4 * r + c], expected, **F64)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_vit_options_shapes_counts_and_pooling(pooling, positions):
    torch.manual_seed(3)
    E, N, classes = 16, 4, 3
    model = VisionTransformer(
        8, 4, classes, embed_dim=E, num_heads=2, pooling=pooling, positions=positions
    ).double()
    images = _images(B=2, C=1, H=8, W=8, seed=3)
    logits = model(images)
    assert logits.shape == (2, classes)
    T = N + (pooling == "cls")
    states, weights = model.encode(images, return_weights=True)
    assert states.shape == (2, T, E)
    assert [w.shape for w in weights] == [(2, 2, T, T)] * 2
    pooled = states[:, 0] if pooling == "cls" else states.mean(dim=1)
    assert_close(logits, model.head(pooled), **F64)
    block = EncoderBlock(E, 2)
    expected = (
        count_parameters(model.patch_embedding)
        + 2 * count_parameters(block)
        + 2 * E  # final norm
        + E * classes
        + classes
        + (E if pooling == "cls" else 0)
        + (T * E if positions == "learned" else 0)
    )
    assert count_parameters(model) == expected
    # bidirectional: the first token's state depends on the last patch
    changed = images.clone()
    changed[:, :, 4:, 4:] += 1.0
    assert not torch.allclose(model.encode(changed)[:, 0], states[:, 0])


def test_mean_pooling_is_blind_to_patch_order_without_positions():
    # no class token, positions zeroed: permuting the patches permutes the states and
    # leaves the mean-pooled logits unchanged (what positions are for)
    torch.manual_seed(4)
    model = VisionTransformer(8, 4, 3, embed_dim=16, num_heads=2, pooling="mean")
    model = model.double()
    with torch.no_grad():
        model.position_embedding.zero_()
    images = _images(B=2, C=1, H=8, W=8, seed=4)
    swapped = images.clone()
    swapped[:, :, :4, :4], swapped[:, :, 4:, 4:] = (
        images[:, :, 4:, 4:],
        images[:, :, :4, :4],
    )
    assert_close(model(swapped), model(images), **F64)


def test_encoder_block_is_the_transformer_block_without_the_causal_mask():
    torch.manual_seed(5)
    block = EncoderBlock(16, 2).double()
    causal = models.TransformerBlock(16, 2).double()
    causal.load_state_dict(block.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    full = torch.ones(5, 5, dtype=torch.bool).tril()
    assert_close(block(x, mask=full)[0], causal(x)[0], **F64)
    assert not torch.allclose(block(x)[0], causal(x)[0])


def _copy_into_hf(ours: VisionTransformer, hf) -> None:
    """Our weights into a Hugging Face ViTModel (names and layouts mapped)."""
    E, C, p = ours.patch_embedding.embed_dim, ours.patch_embedding.in_channels, 4
    state = {
        "embeddings.cls_token": ours.class_token,
        "embeddings.position_embeddings": ours.position_embedding,
        "embeddings.patch_embeddings.projection.weight": (
            ours.patch_embedding.weight.reshape(E, C, p, p)
        ),
        "embeddings.patch_embeddings.projection.bias": ours.patch_embedding.bias,
        "layernorm.weight": ours.norm.weight,
        "layernorm.bias": ours.norm.bias,
    }
    names = {
        "attention.q_proj": "attention.q_proj",
        "attention.k_proj": "attention.k_proj",
        "attention.v_proj": "attention.v_proj",
        "attention.o_proj": "attention.out_proj",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.2",
    }
    ours_state = ours.state_dict()
    for i in range(len(ours.blocks)):
        for theirs, mine in names.items():
            for kind in ("weight", "bias"):
                state[f"layers.{i}.{theirs}.{kind}"] = ours_state[
                    f"blocks.{i}.{mine}.{kind}"
                ]
    missing, unexpected = hf.load_state_dict(
        {k: v.detach().clone() for k, v in state.items()}, strict=True
    )
    assert not missing and not unexpected


def test_vit_matches_hugging_face_vit_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(6)
    hf = transformers.ViTModel(config, add_pooling_layer=False).double().eval()
    assert hf.config._attn_implementation == "sdpa"
    ours = VisionTransformer(
        8,
        4,
        5,
        in_channels=3,
        embed_dim=16,
        num_heads=2,
        mlp_hidden=24,
        norm_eps=1e-12,
    ).double()
    _copy_into_hf(ours, hf)
    # same parameters, counted apart from our classifier
    assert count_parameters(ours) - (16 * 5 + 5) == hf.num_parameters()
    images = _images(B=2, C=3, H=8, W=8, seed=6)
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state
        actual = ours.encode(images)
    assert_close(actual, expected, rtol=1e-10, atol=1e-10, name="last_hidden_state")
