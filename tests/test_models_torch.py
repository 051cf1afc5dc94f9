"""The application models: shapes, parameter counts, sharing by identity, KV-cache
decoding."""

import pytest
import torch
import torch.nn.functional as F

from companion.data import shape_patterns
from companion.params import (
    conv2d_parameter_count,
    count_parameters,
    dense_parameter_count,
    locally_connected2d_parameter_count,
)
from companion.testing import assert_close
from companion.torch.models import (
    LocallyConnected2d,
    LocallyConnectedNet,
    MLPClassifier,
    SmallCNN,
    TinyTransformerLM,
    generate,
)
from companion.torch.sharing import shared_parameter_names

IMAGE, CLASSES = 12, 4


def _vision_model(name):
    torch.manual_seed(0)
    return {
        "mlp": lambda: MLPClassifier(IMAGE, CLASSES, hidden=(32, 16)),
        "locally_connected": lambda: LocallyConnectedNet(
            IMAGE, CLASSES, channels=(4, 6)
        ),
        "cnn": lambda: SmallCNN(CLASSES, channels=(4, 6)),
    }[name]()


@pytest.mark.parametrize("name", ["mlp", "locally_connected", "cnn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_vision_models_map_images_to_logits(name, batch):
    images = torch.randn(batch, 1, IMAGE, IMAGE)
    logits = _vision_model(name)(images)
    assert logits.shape == (batch, CLASSES) and logits.dtype == torch.float32


def test_vision_parameter_counts_follow_the_formulas():
    cnn, lc, mlp = (
        _vision_model("cnn"),
        _vision_model("locally_connected"),
        _vision_model("mlp"),
    )
    conv_layers = conv2d_parameter_count(1, 4, 3) + conv2d_parameter_count(4, 6, 3)
    lc_layers = locally_connected2d_parameter_count(
        1, 4, 3, IMAGE
    ) + locally_connected2d_parameter_count(4, 6, 3, IMAGE)
    head = dense_parameter_count(6, CLASSES)
    assert count_parameters(cnn) == conv_layers + head
    assert count_parameters(lc) == lc_layers + head
    # one kernel per position: H_out W_out times the conv
    assert lc_layers == IMAGE * IMAGE * conv_layers
    assert count_parameters(mlp) == (
        dense_parameter_count(IMAGE * IMAGE, 32)
        + dense_parameter_count(32, 16)
        + dense_parameter_count(16, CLASSES)
    )


@pytest.mark.parametrize("padding", [0, 1])
def test_locally_connected_with_one_kernel_everywhere_is_a_convolution(padding, rng):
    layer = LocallyConnected2d(3, 5, 3, (7, 6), padding=padding).double()
    kernel = torch.from_numpy(rng.standard_normal((5, 3, 3, 3)))
    bias = torch.from_numpy(rng.standard_normal(5))
    with torch.no_grad():
        # the same kernel at every position
        layer.weight.copy_(kernel.expand_as(layer.weight))
        layer.bias.copy_(bias.expand_as(layer.bias))
    x = torch.from_numpy(rng.standard_normal((2, 3, 7, 6)))
    assert_close(
        layer(x),
        F.conv2d(x, kernel, bias, padding=padding),
        rtol=1e-12,
        atol=1e-12,
        name="locally connected with shared kernels vs conv2d",
    )


def test_cnn_gives_the_same_logits_for_a_shape_wherever_it_is():
    cnn = _vision_model("cnn")
    pattern = torch.from_numpy(shape_patterns(5)[1])
    images = torch.zeros(2, 1, 16, 16)  # any size: no parameter belongs to a position
    # 3 pixels from the border: no receptive field that sees the shape reads layer 2's
    # zero padding
    images[0, 0, 3:8, 3:8] = pattern
    images[1, 0, 8:13, 7:12] = pattern
    logits = cnn(images)
    assert_close(
        logits[0], logits[1], rtol=1e-6, atol=1e-6, name="cnn logits of a shifted shape"
    )


# --- language -------------------------------------------------------------------------

V, MAX_LENGTH, E, HEADS, LAYERS = 11, 12, 16, 2, 2


def _lm(tied, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyTransformerLM(
        V, MAX_LENGTH, embed_dim=E, num_heads=HEADS, num_layers=LAYERS, tied=tied
    ).to(dtype)


def test_tied_head_is_the_embedding_parameter():
    model = _lm(tied=True)
    assert model.head.weight is model.embedding.weight
    assert shared_parameter_names(model) == [["embedding.weight", "head.weight"]]
    assert shared_parameter_names(_lm(tied=False)) == []


def test_tied_and_untied_counts_differ_by_one_embedding_matrix():
    assert count_parameters(_lm(tied=False)) - count_parameters(_lm(tied=True)) == V * E


def _logits_reading(model, ids, lookup, head):
    """The model's forward with the embedding lookup and the output layer reading given
    tensors."""
    hidden = F.embedding(ids, lookup) + model.position_embedding(
        torch.arange(ids.shape[1])
    )
    for block in model.blocks:
        hidden, _ = block(hidden)
    return model.norm(hidden) @ head.T


def test_tied_gradient_is_the_sum_of_both_uses():
    model = _lm(tied=True, dtype=torch.float64)
    ids = torch.tensor([[1, 4, 2, 7, 3]])
    weight = model.embedding.weight
    grads = []
    for lookup, head in (
        (weight, weight),
        (weight, weight.detach()),
        (weight.detach(), weight),
    ):
        model.zero_grad()
        _logits_reading(model, ids, lookup, head).logsumexp(-1).sum().backward()
        grads.append(weight.grad.clone())
    model.zero_grad()
    model(ids).logsumexp(-1).sum().backward()
    assert_close(
        weight.grad,
        grads[0],
        rtol=1e-12,
        atol=1e-12,
        name="model forward vs the spelled-out one",
    )
    assert_close(
        grads[0],
        grads[1] + grads[2],
        rtol=1e-12,
        atol=1e-12,
        name="tied gradient vs lookup + head",
    )
    assert torch.count_nonzero(grads[2]) > 0  # the head's use contributes


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_seeded_models_are_identical(tied):
    a, b = _lm(tied, seed=5).state_dict(), _lm(tied, seed=5).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_forward_with_cache_token_by_token_equals_full_forward(tied):
    model = _lm(tied, dtype=torch.float64)
    ids = torch.randint(V, (3, 9), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    caches = model.new_caches()
    prefix = model(ids[:, :4], caches=caches)  # a prompt of 4, then one token at a time
    steps = [model(ids[:, t : t + 1], caches=caches) for t in range(4, 9)]
    assert caches[0].length == 9
    assert_close(
        torch.cat([prefix, *steps], dim=1),
        full,
        rtol=1e-12,
        atol=1e-12,
        name=f"cached vs full logits ({'tied' if tied else 'untied'})",
    )


@pytest.mark.parametrize("prompt_length, steps", [(1, 11), (4, 5), (5, 0)])
def test_greedy_decoding_with_cache_equals_without(prompt_length, steps):
    model = _lm(tied=True)
    prompt = torch.randint(
        V, (4, prompt_length), generator=torch.Generator().manual_seed(2)
    )
    before = prompt.clone()
    with_cache = generate(model, prompt, steps, use_cache=True)
    without = generate(model, prompt, steps, use_cache=False)
    assert with_cache.shape == (4, prompt_length + steps)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :prompt_length], prompt)
    assert torch.equal(prompt, before)


def test_attention_weights_are_causal_distributions():
    model = _lm(tied=True, dtype=torch.float64)
    logits, weights = model(torch.tensor([[3, 1, 4, 1, 5, 9]]), return_weights=True)
    assert logits.shape == (1, 6, V) and len(weights) == LAYERS
    for w in weights:
        assert w.shape == (1, HEADS, 6, 6)
        assert_close(
            w.sum(-1),
            torch.ones(1, HEADS, 6, dtype=torch.float64),
            rtol=1e-12,
            atol=1e-12,
            name="attention rows",
        )
        assert torch.count_nonzero(torch.triu(w, diagonal=1)) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.zeros(1, MAX_LENGTH + 1, dtype=torch.long)), "max_length"),
        (lambda m: m(torch.zeros(1, 3)), "integer"),
        (
            lambda m: m(torch.zeros(1, 3, dtype=torch.long), caches=m.new_caches()[:1]),
            "one KVCache per block",
        ),
        (
            lambda m: generate(m, torch.zeros(1, 5, dtype=torch.long), MAX_LENGTH),
            "max_length",
        ),
        (lambda m: generate(m, torch.zeros(1, 5, dtype=torch.long), -1), "steps"),
    ],
    ids=["too-long", "float-ids", "caches", "generate-too-long", "negative-steps"],
)
def test_language_model_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(_lm(tied=True))
