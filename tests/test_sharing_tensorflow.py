"""Parameter sharing in Keras/TensorFlow: shared by identity, gradients accumulate, counted once."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from companion.tensorflow.sharing import TiedOutput, no_weight_decay_variables  # noqa: E402
from companion.numpy import conv as npconv  # noqa: E402
from companion.testing import as_backend, assert_close, assert_close_to_oracle, to_numpy  # noqa: E402
from companion.tensorflow.conv import convolve2d, locally_connected2d  # noqa: E402

V, E, B, L = 13, 6, 2, 5  # a prime vocabulary, small widths


class _TinyTiedLM(keras.Model):
    """Embed, mix, normalise, project back to the vocabulary with the embedding matrix."""

    def __init__(self, use_bias=False):
        super().__init__()
        self.tokens = keras.layers.Embedding(V, E)
        self.mixer = keras.layers.Dense(E, activation="tanh")
        self.norm = keras.layers.LayerNormalization()
        self.head = TiedOutput(self.tokens, use_bias=use_bias)

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
    expected = V * E + (E * E + E) + 2 * E + (V if use_bias else 0)  # embedding once, Dense, LayerNorm, bias
    assert model.count_params() == expected


def test_tied_output_is_h_times_embedding_transposed(rng):
    tokens = keras.layers.Embedding(V, E, dtype="float64")
    tokens.build((None,))
    hidden = tf.constant(rng.standard_normal((B, L, E)))
    logits = TiedOutput(tokens, dtype="float64")(hidden)
    assert_close(logits, to_numpy(hidden) @ to_numpy(tokens.embeddings).T, name="logits")


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
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_of_both_uses_accumulate_in_the_one_variable(rng, dtype):
    tokens = keras.layers.Embedding(V, E, dtype=dtype)
    head = TiedOutput(tokens, dtype=dtype)
    ids = tf.constant(rng.integers(0, V, (B, L)), dtype="int32")
    targets = tf.constant(rng.integers(0, V, (B, L)), dtype="int32")
    mixer = tf.constant(rng.standard_normal((E, E)), dtype=dtype)
    with tf.GradientTape() as tape:
        logits = head(tf.tanh(tokens(ids) @ mixer))  # (B, L, V)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits))
    (tied_grad,) = tape.gradient(loss, [tokens.embeddings])

    as_input = tf.Variable(tokens.embeddings.numpy())  # untied copies with the same values
    as_output = tf.Variable(tokens.embeddings.numpy())
    with tf.GradientTape() as tape:
        loss = _loss(as_input, as_output, mixer, ids, targets)
    grad_input, grad_output = tape.gradient(loss, [as_input, as_output])
    grad_input = tf.convert_to_tensor(grad_input)  # a gather's gradient is sparse (IndexedSlices)
    assert float(tf.reduce_max(tf.abs(grad_input))) > 0 and float(tf.reduce_max(tf.abs(grad_output))) > 0
    assert_close(tf.convert_to_tensor(tied_grad), grad_input + grad_output, name="tied gradient")


def test_no_weight_decay_variables_lists_each_once():
    model = _built(_TinyTiedLM(use_bias=True))
    excluded = no_weight_decay_variables(model)
    assert len({id(v) for v in excluded}) == len(excluded)
    expected = [model.tokens.embeddings, model.mixer.bias, model.norm.gamma, model.norm.beta, model.head.bias]
    assert {id(v) for v in excluded} == {id(v) for v in expected}
    assert all(v is not model.mixer.kernel for v in excluded)


def test_adamw_with_exclusions_decays_only_the_kernel():
    """With zero gradients AdamW only decays: the kernel shrinks, the tied embedding does not."""
    model = _built(_TinyTiedLM())
    before = {id(v): v.numpy().copy() for v in model.trainable_weights}
    opt = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
    opt.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_weights])
    assert_close(model.tokens.embeddings, before[id(model.tokens.embeddings)], rtol=0, atol=0,
                 name="tied embedding")
    assert_close(model.mixer.kernel, before[id(model.mixer.kernel)] * (1 - 0.1 * 0.5), name="decayed kernel")


# --- sharing across positions: conv vs the same layer without sharing ------------------------

LOCAL_CASES = {"3x3": (1, 0, (3, 3)), "stride2-pad1": (2, 1, (2, 3)), "same-even": (1, "same", (2, 2)),
               "1x1-stride3": (3, (0, 2), (1, 1))}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", LOCAL_CASES, ids=list(LOCAL_CASES))
def test_locally_connected2d_matches_numpy_oracle(case, dtype, rng):

    stride, padding, kernel = LOCAL_CASES[case]
    x = rng.standard_normal((2, 3, 7, 8))
    H_out, W_out = npconv.conv2d_output_size((7, 8), kernel, stride=stride, padding=padding)
    weight = rng.standard_normal((H_out, W_out, 4, 3, *kernel))
    bias = rng.standard_normal((H_out, W_out, 4))
    oracle = npconv.locally_connected2d(x, weight, bias, stride=stride, padding=padding)
    baseline = npconv.locally_connected2d(*(a.astype(dtype) for a in (x, weight, bias)), stride=stride,
                                          padding=padding)
    out = locally_connected2d(*(as_backend(a, "tensorflow", dtype) for a in (x, weight, bias)), stride=stride,
                              padding=padding)
    assert out.dtype == getattr(tf, dtype)
    assert_close_to_oracle(out, baseline, oracle, name=f"tensorflow locally_connected2d {dtype}")


def test_locally_connected2d_rejects_wrong_positions():

    with pytest.raises(ValueError, match="output positions"):
        locally_connected2d(tf.zeros((1, 3, 6, 5)), tf.zeros((3, 3, 4, 3, 3, 3)))


def test_convolve2d_flips_the_kernel(rng):

    x, kernel = rng.standard_normal((5, 7)), rng.standard_normal((2, 3))
    assert_close(convolve2d(tf.constant(x), tf.constant(kernel)), npconv.convolve2d(x, kernel), name="convolve2d")
