"""Parameter sharing in PyTorch: shared by identity, gradients add up, counted once."""

import copy

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from companion.numpy import conv as npconv  # noqa: E402
from companion.params import (  # noqa: E402
    conv2d_parameter_count,
    count_parameters,
    dense_parameter_count,
)
from companion.testing import (  # noqa: E402
    as_backend,
    assert_close,
    assert_close_to_oracle,
    default_tolerance,
    to_numpy,
)
from companion.torch import padding_mask  # noqa: E402
from companion.torch.conv import conv2d_reference, convolve2d, locally_connected2d  # noqa: E402
from companion.torch.sharing import (  # noqa: E402
    TiedEmbedding,
    TiedLMHead,
    TransformerEncoder,
    param_groups_for_weight_decay,
    shared_parameter_names,
    tie_weights,
)

V, E, B, L = 13, 6, 2, 5  # a prime vocabulary, small widths


def _unique_numel(model):
    return sum(p.numel() for p in model.parameters())


# --- weight tying ---------------------------------------------------------------------


@pytest.mark.parametrize("output_bias", [False, True], ids=["no-bias", "bias"])
def test_tied_embedding_shares_one_parameter(output_bias):
    tied = TiedEmbedding(V, E, output_bias=output_bias)
    assert tied.head.weight is tied.embedding.weight
    assert tied.weight is tied.embedding.weight
    assert shared_parameter_names(tied) == [["embedding.weight", "head.weight"]]
    assert _unique_numel(tied) == V * E + (V if output_bias else 0)  # the matrix once


def test_tied_lm_head_is_h_times_embedding_transposed(rng):
    tied = TiedEmbedding(V, E, dtype=torch.float64)
    hidden = torch.from_numpy(rng.standard_normal((B, L, E)))
    assert_close(
        tied.logits(hidden), to_numpy(hidden) @ to_numpy(tied.weight).T, name="logits"
    )
    ids = torch.from_numpy(rng.integers(0, V, (B, L)))
    assert_close(tied(ids), to_numpy(tied.weight)[to_numpy(ids)], name="embeddings")


def test_tie_weights_on_linear_makes_one_parameter():
    embedding, head = nn.Embedding(V, E), nn.Linear(E, V, bias=False)
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    assert _unique_numel(model) == 2 * V * E
    tie_weights(head, embedding)
    assert head.weight is embedding.weight
    assert _unique_numel(model) == V * E


@pytest.mark.parametrize("bad", ["shape", "type"])
def test_tying_rejects_mismatches(bad):
    if bad == "shape":
        with pytest.raises(ValueError, match=r"\(13, 6\)"):
            tie_weights(nn.Linear(E, V + 1, bias=False), nn.Embedding(V, E))
    else:
        with pytest.raises(TypeError, match="embedding"):
            TiedLMHead(nn.ReLU())


def test_tied_head_rejects_wrong_width():
    with pytest.raises(ValueError, match="last axis E=6"):
        TiedEmbedding(V, E).logits(torch.zeros(B, L, E + 1))


def _language_model_loss(embedding_matrix, output_matrix, mixer, ids, targets):
    """Embed, mix, project back to logits; one code for tied and untied matrices."""
    hidden = torch.tanh(embedding_matrix[ids] @ mixer)  # (B, L, E)
    logits = hidden @ output_matrix.T  # (B, L, V)
    return nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64], ids=["float32", "float64"]
)
def test_gradients_of_both_uses_accumulate_in_the_one_tensor(rng, dtype):
    tied = TiedEmbedding(V, E, dtype=dtype)
    mixer = torch.from_numpy(rng.standard_normal((E, E))).to(dtype)
    ids = torch.from_numpy(rng.integers(0, V, (B, L)))
    targets = torch.from_numpy(rng.integers(0, V, (B, L)))

    _language_model_loss(
        tied.embedding.weight, tied.head.weight, mixer, ids, targets
    ).backward()

    # untied copies with the same values: one gradient per use
    as_input = tied.weight.detach().clone().requires_grad_(True)
    as_output = tied.weight.detach().clone().requires_grad_(True)
    _language_model_loss(as_input, as_output, mixer, ids, targets).backward()
    # both uses contribute
    assert as_input.grad.abs().max() > 0 and as_output.grad.abs().max() > 0
    assert_close(tied.weight.grad, as_input.grad + as_output.grad, name="tied gradient")


# --- optimizer groups -----------------------------------------------------------------


class _TinyTiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(V, E)
        self.mixer = nn.Linear(E, E)
        self.norm = nn.LayerNorm(E)
        self.head = tie_weights(nn.Linear(E, V, bias=False), self.tokens)


def test_weight_decay_groups_hold_each_tensor_once():
    model = _TinyTiedLM()
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids_decay = [id(p) for p in decay["params"]]
    ids_no_decay = [id(p) for p in no_decay["params"]]
    everything = ids_decay + ids_no_decay
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))
    assert ids_decay == [id(model.mixer.weight)]
    assert set(ids_no_decay) == {
        id(model.tokens.weight),
        id(model.mixer.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    # accepted as is
    torch.optim.AdamW(param_groups_for_weight_decay(model, 0.1), lr=1e-3)


def test_naive_groups_list_the_tied_tensor_twice():
    """Why the helper exists: grouping by module lists the tied tensor in two groups."""
    model = _TinyTiedLM()
    naive = [
        {"params": list(model.tokens.parameters())},
        {"params": list(model.head.parameters())},
    ]
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.AdamW(naive, lr=1e-3)


def test_weight_decay_rejects_negative():
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups_for_weight_decay(_TinyTiedLM(), -0.1)


def test_weight_decay_skips_frozen_parameters():
    model = _TinyTiedLM()
    model.mixer.weight.requires_grad_(False)
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    assert decay["params"] == [] and len(no_decay["params"]) == 4


def test_adamw_step_with_groups_leaves_embedding_undecayed():
    """With zero gradients AdamW only decays: the matrices shrink, the tied embedding
    does not."""
    model = _TinyTiedLM()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups_for_weight_decay(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert_close(
        model.tokens.weight,
        before["tokens.weight"],
        rtol=0,
        atol=0,
        name="tied embedding",
    )
    assert_close(
        model.mixer.weight,
        before["mixer.weight"] * (1 - 0.1 * 0.5),
        name="decayed weight",
    )
    assert model.head.weight is model.tokens.weight
    assert_close(
        model.norm.weight, before["norm.weight"], rtol=0, atol=0, name="norm gain"
    )


# --- sharing across positions: conv vs the same layer without sharing -----------------

LOCAL_CASES = {
    "3x3": (1, 0, (3, 3)),
    "stride2-pad1": (2, 1, (2, 3)),
    "same-even": (1, "same", (2, 2)),
    "1x1-stride3": (3, (0, 2), (1, 1)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", LOCAL_CASES, ids=list(LOCAL_CASES))
def test_locally_connected2d_matches_numpy_oracle(case, dtype, rng):

    stride, padding, kernel = LOCAL_CASES[case]
    x = rng.standard_normal((2, 3, 7, 8))
    H_out, W_out = npconv.conv2d_output_size(
        (7, 8), kernel, stride=stride, padding=padding
    )
    weight = rng.standard_normal((H_out, W_out, 4, 3, *kernel))
    bias = rng.standard_normal((H_out, W_out, 4))
    oracle = npconv.locally_connected2d(x, weight, bias, stride=stride, padding=padding)
    baseline = npconv.locally_connected2d(
        *(a.astype(dtype) for a in (x, weight, bias)), stride=stride, padding=padding
    )
    out = locally_connected2d(
        *(as_backend(a, "torch", dtype) for a in (x, weight, bias)),
        stride=stride,
        padding=padding,
    )
    assert out.dtype == getattr(torch, dtype)
    assert_close_to_oracle(
        out, baseline, oracle, name=f"torch locally_connected2d {dtype}"
    )


def test_locally_connected2d_with_one_kernel_everywhere_is_conv2d(rng):

    x = torch.from_numpy(rng.standard_normal((2, 3, 6, 5)))
    kernel = torch.from_numpy(rng.standard_normal((4, 3, 3, 3)))
    bias = torch.from_numpy(rng.standard_normal(4))
    H_out, W_out = 4, 3
    # (H_out, W_out, C_out, C_in, kH, kW)
    shared = kernel.expand(H_out, W_out, *kernel.shape)
    assert_close(
        locally_connected2d(x, shared, bias.expand(H_out, W_out, 4)),
        conv2d_reference(x, kernel, bias),
        name="locally connected with one kernel",
    )


def test_locally_connected2d_rejects_wrong_positions():

    with pytest.raises(ValueError, match="output positions"):
        locally_connected2d(torch.zeros(1, 3, 6, 5), torch.zeros(3, 3, 4, 3, 3, 3))


def test_convolve2d_flips_the_kernel(rng):

    x, kernel = rng.standard_normal((5, 7)), rng.standard_normal((2, 3))
    assert_close(
        convolve2d(torch.from_numpy(x), torch.from_numpy(kernel)),
        npconv.convolve2d(x, kernel),
        name="convolve2d",
    )


# --- cross-layer sharing (ALBERT) -----------------------------------------------------

VOCAB, E_EMB, HIDDEN, HEADS, FFN, POSITIONS = 31, 8, 12, 4, 20, 16


def _hand_count(num_layers, num_kv_heads, shared):
    """ALBERT's count: embeddings + projection + (1 or num_layers) layers."""
    kv = (num_kv_heads or HEADS) * (HIDDEN // HEADS)  # H_kv * D
    embeddings = (
        VOCAB * E_EMB + POSITIONS * E_EMB + 2 * E_EMB + (E_EMB * HIDDEN + HIDDEN)
    )
    attention = (
        (HIDDEN * HIDDEN + HIDDEN) + 2 * (HIDDEN * kv + kv) + (HIDDEN * HIDDEN + HIDDEN)
    )
    layer = attention + 2 * 2 * HIDDEN + (HIDDEN * FFN + FFN) + (FFN * HIDDEN + HIDDEN)
    return embeddings + (1 if shared else num_layers) * layer


def _encoder(num_layers=3, num_kv_heads=None, share_layers=True, **kwargs):
    torch.manual_seed(0)
    return TransformerEncoder(
        VOCAB,
        E_EMB,
        HIDDEN,
        num_layers,
        HEADS,
        FFN,
        share_layers=share_layers,
        num_kv_heads=num_kv_heads,
        max_positions=POSITIONS,
        **kwargs,
    )


@pytest.mark.parametrize("share_layers", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize(
    "num_kv_heads", [None, 2, 1], ids=["H_kv=H", "H_kv=2", "H_kv=1"]
)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_albert_parameter_count(num_layers, num_kv_heads, share_layers):
    model = _encoder(num_layers, num_kv_heads, share_layers)
    expected = _hand_count(num_layers, num_kv_heads, share_layers)
    assert (
        count_parameters(model)
        == sum(p.numel() for p in model.parameters())
        == expected
    )
    if share_layers:
        assert all(layer is model.layers[0] for layer in model.layers)
    else:
        assert len({id(layer) for layer in model.layers}) == num_layers


def test_albert_shared_gradient_is_the_sum_over_positions(rng):
    """The shared layer's gradient equals the sum of the gradients of untied copies, one
    per position."""
    shared = _encoder(num_layers=3).double()
    untied = _encoder(num_layers=3, share_layers=False).double()
    untied.load_state_dict(shared.state_dict(), strict=False)  # embeddings
    # same values, 3 tensors
    untied.layers = nn.ModuleList([copy.deepcopy(shared.layers[0]) for _ in range(3)])
    ids = torch.from_numpy(rng.integers(0, VOCAB, (2, 7)))
    target = torch.from_numpy(rng.standard_normal((2, 7, HIDDEN)))
    for model in (shared, untied):
        ((model(ids) - target) ** 2).sum().backward()
    assert_close(shared(ids), untied(ids), name="same function")
    for name, p in shared.layers[0].named_parameters():
        per_position = [
            dict(layer.named_parameters())[name].grad for layer in untied.layers
        ]
        assert all(g.abs().max() > 0 for g in per_position), name
        assert_close(p.grad, sum(per_position), name=f"shared {name} gradient")


def test_albert_weight_decay_groups_list_the_shared_layer_once():
    model = _encoder(num_layers=4)
    groups = param_groups_for_weight_decay(model, 0.01)
    listed = [p for group in groups for p in group["params"]]
    assert len({id(p) for p in listed}) == len(listed)
    assert sum(p.numel() for p in listed) == count_parameters(model)
    assert id(model.token_embedding.weight) in {id(p) for p in groups[1]["params"]}


def test_albert_padding_mask_is_honoured(rng):
    """With a padding mask, tokens after a row's length do not change the outputs before
    it."""
    model = _encoder().double()
    ids = torch.from_numpy(rng.integers(0, VOCAB, (2, 6)))
    lengths = torch.tensor([4, 6])
    changed = ids.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % VOCAB
    mask = padding_mask(lengths, 6)  # (B, 1, 1, S)
    out, out_changed = model(ids, mask=mask), model(changed, mask=mask)
    assert_close(out_changed[0, :4], out[0, :4], name="unpadded positions")
    # without the mask they differ
    assert (model(changed)[0, :4] - model(ids)[0, :4]).abs().max() > 1e-6


@pytest.mark.parametrize("bad", ["too-long", "float-ids", "zero-layers"])
def test_albert_rejects_bad_input(bad):
    if bad == "zero-layers":
        with pytest.raises(ValueError, match="num_layers"):
            _encoder(num_layers=0)
        return
    model = _encoder()
    ids = (
        torch.zeros(1, POSITIONS + 1, dtype=torch.long)
        if bad == "too-long"
        else torch.zeros(1, 3)
    )
    with pytest.raises(
        ValueError, match="max_positions" if bad == "too-long" else "integer"
    ):
        model(ids)


# --- hand formulas equal the framework's counts ---------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dense_count(bias):
    layer = nn.Linear(7, 5, bias=bias)
    assert (
        count_parameters(layer)
        == sum(p.numel() for p in layer.parameters())
        == 7 * 5 + (5 if bias else 0)
    )
    assert dense_parameter_count(7, 5, bias=bias) == count_parameters(layer)


@pytest.mark.parametrize("groups", [1, 2, 6], ids=["groups=1", "groups=2", "depthwise"])
def test_conv_count_does_not_depend_on_the_image(groups):
    layer = nn.Conv2d(6, 12, (3, 2), groups=groups)
    hand = 12 * (6 // groups) * 3 * 2 + 12
    assert count_parameters(layer) == sum(p.numel() for p in layer.parameters()) == hand
    assert conv2d_parameter_count(6, 12, (3, 2), groups=groups) == hand


@pytest.mark.parametrize("output_bias", [False, True], ids=["no-bias", "bias"])
def test_tied_count_is_one_matrix(output_bias):
    tied = TiedEmbedding(V, E, output_bias=output_bias)
    untied = nn.ModuleDict(
        {"embedding": nn.Embedding(V, E), "head": nn.Linear(E, V, bias=output_bias)}
    )
    assert count_parameters(tied) == V * E + (V if output_bias else 0)
    assert count_parameters(untied) == count_parameters(tied) + V * E


# --- conv in half precision: computed in float32, returned in the input dtype ---------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["conv2d_reference", "conv2d_im2col"])
def test_conv2d_half_precision_accumulates_in_float32(name, dtype, rng):
    import companion.torch as ct

    x = as_backend(rng.standard_normal((2, 4, 7, 6)), "torch", dtype)
    weight = as_backend(rng.standard_normal((6, 2, 3, 3)), "torch", dtype)
    bias = as_backend(rng.standard_normal(6), "torch", dtype)
    out = getattr(ct, name)(x, weight, bias, stride=(2, 1), padding="valid", groups=2)
    assert out.dtype == getattr(torch, dtype)
    # the oracle sees the same rounded inputs, so only the output's rounding is left
    oracle = npconv.conv2d_reference(
        *(to_numpy(t).astype("float64") for t in (x, weight, bias)),
        stride=(2, 1),
        padding="valid",
        groups=2,
    )
    # bfloat16 reaches numpy as float32: name the dtype's own tolerance
    rtol, atol = default_tolerance(dtype)
    assert_close(out, oracle, rtol=rtol, atol=atol, name=f"torch {name} {dtype}")
