"""Parameter sharing in Keras/TensorFlow: shared by identity, gradients accumulate,
counted once."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from companion.numpy import conv as npconv  # noqa: E402
from companion.params import (  # noqa: E402
    conv2d_parameter_count,
    count_parameters,
    dense_parameter_count,
)
from companion.tensorflow import padding_mask  # noqa: E402
from companion.tensorflow.conv import convolve2d, locally_connected2d  # noqa: E402
from companion.tensorflow.sharing import (  # noqa: E402
    TiedOutput,
    TransformerEncoder,
    no_weight_decay_variables,
)
from companion.testing import (  # noqa: E402
    as_backend,
    assert_close,
    assert_close_to_oracle,
    default_tolerance,
    to_numpy,
)

V, E, B, L = 13, 6, 2, 5  # a prime vocabulary, small widths


class _TinyTiedLM(keras.Model):
    """Embed, mix, normalise, project back to the vocabulary by the embedding matrix."""

    def __init__(self, use_bias=False, tied=True):
        super().__init__()
        self.tokens = keras.layers.Embedding(V, E)
        self.mixer = keras.layers.Dense(E, activation="tanh")
        self.norm = keras.layers.LayerNormalization()
        self.head = (
            TiedOutput(self.tokens, use_bias=use_bias)
            if tied
            else keras.layers.Dense(V, use_bias=use_bias)
        )

    def call(self, ids):
        return self.head(self.norm(self.mixer(self.tokens(ids))))  # (B, L, V)


def _built(model):
    model(tf.zeros((B, L), dtype="int32"))
    return model


@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
def test_tied_output_reuses_the_embedding_variable(use_bias):
    model = _built(_TinyTiedLM(use_bias))
    assert model.head.tied_weight is model.tokens.embeddings
    assert sum(w is model.tokens.embeddings for w in model.weights) == 1  # listed once
    # embedding once, Dense, LayerNorm, bias
    expected = V * E + (E * E + E) + 2 * E + (V if use_bias else 0)
    assert model.count_params() == expected


def test_tied_output_is_h_times_embedding_transposed(rng):
    tokens = keras.layers.Embedding(V, E, dtype="float64")
    tokens.build((None,))
    hidden = tf.constant(rng.standard_normal((B, L, E)))
    logits = TiedOutput(tokens, dtype="float64")(hidden)
    assert_close(
        logits, to_numpy(hidden) @ to_numpy(tokens.embeddings).T, name="logits"
    )


def test_tied_output_rejects_bad_input():
    with pytest.raises(TypeError, match="Embedding"):
        TiedOutput(keras.layers.Dense(V))
    tokens = keras.layers.Embedding(V, E)
    with pytest.raises(ValueError, match="last axis E=6"):
        TiedOutput(tokens)(tf.zeros((B, L, E + 1)))


def _loss(embedding_matrix, output_matrix, mixer, ids, targets):
    """The same computation for tied and untied matrices."""
    hidden = tf.tanh(tf.gather(embedding_matrix, ids) @ mixer)  # (B, L, E)
    logits = hidden @ tf.transpose(output_matrix)  # (B, L, V)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_of_both_uses_accumulate_in_the_one_variable(rng, dtype):
    tokens = keras.layers.Embedding(V, E, dtype=dtype)
    head = TiedOutput(tokens, dtype=dtype)
    ids = tf.constant(rng.integers(0, V, (B, L)), dtype="int32")
    targets = tf.constant(rng.integers(0, V, (B, L)), dtype="int32")
    mixer = tf.constant(rng.standard_normal((E, E)), dtype=dtype)
    with tf.GradientTape() as tape:
        logits = head(tf.tanh(tokens(ids) @ mixer))  # (B, L, V)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        )
    (tied_grad,) = tape.gradient(loss, [tokens.embeddings])

    # untied copies with the same values
    as_input = tf.Variable(tokens.embeddings.numpy())
    as_output = tf.Variable(tokens.embeddings.numpy())
    with tf.GradientTape() as tape:
        loss = _loss(as_input, as_output, mixer, ids, targets)
    grad_input, grad_output = tape.gradient(loss, [as_input, as_output])
    # a gather's gradient is sparse (IndexedSlices)
    grad_input = tf.convert_to_tensor(grad_input)
    assert (
        float(tf.reduce_max(tf.abs(grad_input))) > 0
        and float(tf.reduce_max(tf.abs(grad_output))) > 0
    )
    assert_close(
        tf.convert_to_tensor(tied_grad), grad_input + grad_output, name="tied gradient"
    )


def test_no_weight_decay_variables_lists_each_once():
    model = _built(_TinyTiedLM(use_bias=True))
    excluded = no_weight_decay_variables(model)
    assert len({id(v) for v in excluded}) == len(excluded)
    expected = [
        model.tokens.embeddings,
        model.mixer.bias,
        model.norm.gamma,
        model.norm.beta,
        model.head.bias,
    ]
    assert {id(v) for v in excluded} == {id(v) for v in expected}
    assert all(v is not model.mixer.kernel for v in excluded)


def test_adamw_with_exclusions_decays_only_the_kernel():
    """With zero gradients AdamW only decays: the kernel shrinks, the tied embedding
    does not."""
    model = _built(_TinyTiedLM())
    before = {id(v): v.numpy().copy() for v in model.trainable_weights}
    opt = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
    opt.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_weights])
    assert_close(
        model.tokens.embeddings,
        before[id(model.tokens.embeddings)],
        rtol=0,
        atol=0,
        name="tied embedding",
    )
    assert_close(
        model.mixer.kernel,
        before[id(model.mixer.kernel)] * (1 - 0.1 * 0.5),
        name="decayed kernel",
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
        *(as_backend(a, "tensorflow", dtype) for a in (x, weight, bias)),
        stride=stride,
        padding=padding,
    )
    assert out.dtype == getattr(tf, dtype)
    assert_close_to_oracle(
        out, baseline, oracle, name=f"tensorflow locally_connected2d {dtype}"
    )


def test_locally_connected2d_rejects_wrong_positions():

    with pytest.raises(ValueError, match="output positions"):
        locally_connected2d(tf.zeros((1, 3, 6, 5)), tf.zeros((3, 3, 4, 3, 3, 3)))


def test_convolve2d_flips_the_kernel(rng):

    x, kernel = rng.standard_normal((5, 7)), rng.standard_normal((2, 3))
    assert_close(
        convolve2d(tf.constant(x), tf.constant(kernel)),
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


def _encoder(num_layers=3, num_kv_heads=None, share_layers=True, dtype=None, length=5):
    keras.utils.set_random_seed(0)
    model = TransformerEncoder(
        VOCAB,
        E_EMB,
        HIDDEN,
        num_layers,
        HEADS,
        FFN,
        share_layers=share_layers,
        num_kv_heads=num_kv_heads,
        max_positions=POSITIONS,
        dtype=dtype,
    )
    model(tf.zeros((2, length), dtype="int32"))  # build
    return model


COUNT_CASES = [
    (1, None, True),
    (3, None, True),
    (3, None, False),
    (3, 2, True),
    (3, 1, False),
    (1, 1, False),
]


@pytest.mark.parametrize(
    "num_layers,num_kv_heads,share_layers",
    COUNT_CASES,
    ids=[
        f"layers={n}-H_kv={k or 'H'}-{'shared' if s else 'unshared'}"
        for n, k, s in COUNT_CASES
    ],
)
def test_albert_parameter_count(num_layers, num_kv_heads, share_layers):
    model = _encoder(num_layers, num_kv_heads, share_layers)
    expected = _hand_count(num_layers, num_kv_heads, share_layers)
    assert count_parameters(model) == model.count_params() == expected
    if share_layers:
        assert all(layer is model.encoder_layers[0] for layer in model.encoder_layers)
    else:
        assert len({id(layer) for layer in model.encoder_layers}) == num_layers


def test_albert_shared_gradient_is_the_sum_over_positions(rng):
    """The shared layer's gradient equals the sum of the gradients of untied copies, one
    per position."""
    shared = _encoder(num_layers=3, dtype="float64")
    untied = _encoder(num_layers=3, share_layers=False, dtype="float64")
    pairs = [
        (untied.token_embedding, shared.token_embedding),
        (untied.position_embedding, shared.position_embedding),
        (untied.embedding_norm, shared.embedding_norm),
        (untied.embedding_projection, shared.embedding_projection),
    ]
    # same values, 3 sets of variables
    pairs += [(layer, shared.encoder_layers[0]) for layer in untied.encoder_layers]
    for copy_to, copy_from in pairs:
        for variable, value in zip(copy_to.weights, copy_from.weights, strict=True):
            variable.assign(value)
    ids = tf.constant(rng.integers(0, VOCAB, (2, 5)), dtype="int32")
    target = tf.constant(rng.standard_normal((2, 5, HIDDEN)))

    def gradients(model, layers):
        with tf.GradientTape() as tape:
            out = model(ids)
            loss = tf.reduce_sum((out - target) ** 2)
        return out, tape.gradient(loss, [layer.trainable_weights for layer in layers])

    out_shared, (grad_shared,) = gradients(shared, [shared.encoder_layers[0]])
    out_untied, grads_untied = gradients(untied, untied.encoder_layers)
    assert_close(out_shared, out_untied, name="same function")
    for i, g in enumerate(grad_shared):
        per_position = [tf.convert_to_tensor(grads[i]) for grads in grads_untied]
        assert all(float(tf.reduce_max(tf.abs(p))) > 0 for p in per_position)
        assert_close(
            tf.convert_to_tensor(g),
            tf.add_n(per_position),
            name=(
                f"shared {shared.encoder_layers[0].trainable_weights[i].path} gradient"
            ),
        )


def test_albert_padding_mask_is_honoured(rng):
    """With a padding mask, tokens after a row's length do not change the outputs before
    it."""
    model = _encoder(dtype="float64", length=6)
    ids = rng.integers(0, VOCAB, (2, 6))
    changed = ids.copy()
    changed[0, 4:] = (changed[0, 4:] + 1) % VOCAB
    ids, changed = tf.constant(ids, dtype="int32"), tf.constant(changed, dtype="int32")
    mask = padding_mask(tf.constant([4, 6]), 6)  # (B, 1, 1, S)
    out, out_changed = (
        model(ids, attention_mask=mask),
        model(changed, attention_mask=mask),
    )
    assert_close(out_changed[0, :4], out[0, :4], name="unpadded positions")
    # unmasked: differ
    assert (
        float(tf.reduce_max(tf.abs(model(changed)[0, :4] - model(ids)[0, :4]))) > 1e-6
    )


@pytest.mark.parametrize("bad", ["too-long", "float-ids", "zero-layers"])
def test_albert_rejects_bad_input(bad):
    if bad == "zero-layers":
        with pytest.raises(ValueError, match="num_layers"):
            TransformerEncoder(VOCAB, E_EMB, HIDDEN, 0, HEADS, FFN)
        return
    model = _encoder()
    ids = (
        tf.zeros((1, POSITIONS + 1), dtype="int32")
        if bad == "too-long"
        else tf.zeros((1, 3))
    )
    with pytest.raises(
        ValueError, match="max_positions" if bad == "too-long" else "integer"
    ):
        model(ids)


# --- hand formulas equal the framework's counts ---------------------------------------


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_dense_count(use_bias):
    layer = keras.layers.Dense(5, use_bias=use_bias)
    layer.build((None, 7))
    assert (
        count_parameters(layer)
        == layer.count_params()
        == 7 * 5 + (5 if use_bias else 0)
    )
    assert dense_parameter_count(7, 5, bias=use_bias) == layer.count_params()


@pytest.mark.parametrize("size", [8, 17])
@pytest.mark.parametrize("groups", [1, 2, 6], ids=["groups=1", "groups=2", "depthwise"])
def test_conv_count_does_not_depend_on_the_image(groups, size):
    layer = keras.layers.Conv2D(12, (3, 2), groups=groups)
    layer.build((None, size, size, 6))
    hand = 12 * (6 // groups) * 3 * 2 + 12
    assert count_parameters(layer) == layer.count_params() == hand
    assert conv2d_parameter_count(6, 12, (3, 2), groups=groups) == hand


@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
def test_tied_count_is_one_matrix(use_bias):
    tied = _built(_TinyTiedLM(use_bias))
    # the head has its own (E, V) kernel
    untied = _built(_TinyTiedLM(use_bias, tied=False))
    assert (
        count_parameters(tied)
        == tied.count_params()
        == V * E + (E * E + E) + 2 * E + (V if use_bias else 0)
    )
    assert (
        count_parameters(untied) == untied.count_params() == tied.count_params() + V * E
    )


@pytest.mark.parametrize("num_kv_heads", [None, 1], ids=["H_kv=H", "H_kv=1"])
def test_albert_keras_equals_torch_with_the_same_weights(num_kv_heads, rng):
    """The Keras and torch encoders are one function: copy torch's weights, compare
    outputs."""
    torch = pytest.importorskip("torch")
    from companion.torch.sharing import TransformerEncoder as TorchEncoder

    torch.manual_seed(0)
    reference = TorchEncoder(
        VOCAB,
        E_EMB,
        HIDDEN,
        2,
        HEADS,
        FFN,
        num_kv_heads=num_kv_heads,
        max_positions=POSITIONS,
    ).double()
    model = _encoder(num_layers=2, num_kv_heads=num_kv_heads, dtype="float64", length=7)

    def copy_dense(dense, linear):
        dense.kernel.assign(to_numpy(linear.weight).T)  # torch stores (out, in)
        dense.bias.assign(to_numpy(linear.bias))

    def copy_norm(norm, layer_norm):
        norm.gamma.assign(to_numpy(layer_norm.weight))
        norm.beta.assign(to_numpy(layer_norm.bias))

    model.token_embedding.embeddings.assign(to_numpy(reference.token_embedding.weight))
    model.position_embedding.embeddings.assign(
        to_numpy(reference.position_embedding.weight)
    )
    copy_norm(model.embedding_norm, reference.embedding_norm)
    copy_dense(model.embedding_projection, reference.embedding_projection)
    # shared: one layer each
    layer, ref_layer = model.encoder_layers[0], reference.layers[0]
    layer.attention.set_params(ref_layer.attention.to_params())
    copy_norm(layer.attention_norm, ref_layer.attention_norm)
    copy_dense(layer.ffn_in, ref_layer.ffn_in)
    copy_dense(layer.ffn_out, ref_layer.ffn_out)
    copy_norm(layer.ffn_norm, ref_layer.ffn_norm)

    ids = rng.integers(0, VOCAB, (2, 7))
    lengths = np.array([5, 7])
    expected = reference(
        torch.from_numpy(ids),
        mask=torch.from_numpy(np.arange(7) < lengths[:, None])[:, None, None],
    )
    actual = model(
        tf.constant(ids, dtype="int32"),
        attention_mask=padding_mask(tf.constant(lengths), 7),
    )
    assert_close(actual, expected, name="keras encoder vs torch encoder")


# --- conv in half precision: computed in float32, returned in the input dtype ---------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["conv2d_reference", "conv2d_im2col"])
def test_conv2d_half_precision_accumulates_in_float32(name, dtype, rng):
    import companion.tensorflow as ctf

    x = as_backend(rng.standard_normal((2, 4, 7, 6)), "tensorflow", dtype)
    weight = as_backend(rng.standard_normal((6, 2, 3, 3)), "tensorflow", dtype)
    bias = as_backend(rng.standard_normal(6), "tensorflow", dtype)
    out = getattr(ctf, name)(x, weight, bias, stride=(2, 1), padding="valid", groups=2)
    assert out.dtype == getattr(tf, dtype)
    # the oracle sees the same rounded inputs, so only the output's rounding is left
    oracle = npconv.conv2d_reference(
        *(to_numpy(t).astype("float64") for t in (x, weight, bias)),
        stride=(2, 1),
        padding="valid",
        groups=2,
    )
    # bfloat16 reaches numpy as float32: name the dtype's own tolerance
    rtol, atol = default_tolerance(dtype)
    assert_close(out, oracle, rtol=rtol, atol=atol, name=f"tensorflow {name} {dtype}")
