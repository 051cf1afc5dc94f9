"""Keras encoder-decoder: equal to the torch model, counted alike, cached decoding."""

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")

from companion import params  # noqa: E402
from companion.tensorflow.seq2seq import Seq2SeqTransformer  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch.seq2seq import Seq2SeqTransformer as TorchSeq2Seq  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
E, H, FF, V = 16, 4, 24, 11


def _pair(share, norm_first, seed=0):
    torch.manual_seed(seed)
    theirs = TorchSeq2Seq(
        V,
        V,
        E,
        H,
        2,
        2,
        FF,
        norm_first=norm_first,
        share_embeddings=share,
        dtype=torch.float64,
    ).eval()
    ours = Seq2SeqTransformer(
        V,
        V,
        E,
        H,
        2,
        2,
        FF,
        norm_first=norm_first,
        share_embeddings=share,
        dtype="float64",
    )
    return ours.load_from_torch(theirs), theirs


def _batch(rng):
    src = rng.integers(3, V, (2, 7))
    tgt = rng.integers(3, V, (2, 5))
    src[1, 4:] = PAD
    tgt[:, 0] = BOS
    tgt[1, 3:] = PAD
    return src, tgt


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("share", ["none", "decoder-output", "all"])
def test_keras_equals_torch(rng, share, norm_first):
    ours, theirs = _pair(share, norm_first)
    src, tgt = _batch(rng)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(src), torch.from_numpy(tgt))
    assert_close(ours(src, tgt), expected, rtol=0, atol=1e-10, name="logits")
    weights = ours.cross_attention_weights(src, tgt)
    with torch.no_grad():
        expected_w = theirs.cross_attention_weights(
            torch.from_numpy(src), torch.from_numpy(tgt)
        )
    for w, e in zip(weights, expected_w):
        assert_close(w, e, rtol=0, atol=1e-10, name="cross-attention weights")
    assert float(tf.reduce_max(tf.abs(weights[0][1, :, :, 4:]))) == 0.0


@pytest.mark.parametrize("share", ["none", "decoder-output", "all"])
def test_keras_parameter_count(share):
    ours, theirs = _pair(share, True)
    config = params.EncoderDecoderConfig(
        vocab_size=V,
        hidden_size=E,
        num_heads=H,
        num_encoder_layers=2,
        num_decoder_layers=2,
        intermediate_size=FF,
        share_embeddings=share,
        final_norm=True,
    )
    n = params.encoder_decoder_parameter_count(config)
    assert params.count_parameters(ours) == params.count_parameters(theirs) == n
    if share == "all":
        assert ours.tgt_embedding is ours.src_embedding
        assert ours.output_layer.tied_weight is ours.src_embedding.embeddings


@pytest.mark.parametrize("beam_size", [1, 3])
def test_keras_decoding_cached_equals_uncached_and_torch(rng, beam_size):
    ours, theirs = _pair("decoder-output", False, seed=3)
    src, _ = _batch(rng)
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_length": 6, "beam_size": beam_size}
    cached = ours.beam_search(src, use_cache=True, **kwargs)
    uncached = ours.beam_search(src, use_cache=False, **kwargs)
    assert (cached[0].numpy() == uncached[0].numpy()).all()
    assert_close(cached[1], uncached[1], rtol=0, atol=1e-10, name="scores")
    torch_tokens, torch_scores = theirs.beam_search(torch.from_numpy(src), **kwargs)
    assert (cached[0].numpy() == torch_tokens.numpy()).all()
    assert_close(cached[1], torch_scores, rtol=0, atol=1e-10, name="scores vs torch")


def test_keras_rejects_bad_arguments():
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqTransformer(V, V + 1, E, H, 1, 1, FF, share_embeddings="all")
    model = Seq2SeqTransformer(V, V, E, H, 1, 1, FF)
    with pytest.raises(TypeError, match="src"):
        model(tf.zeros((2, 3)), tf.zeros((2, 3), tf.int64))


def test_keras_three_way_tied_matrix_is_trained_once(rng):
    """One variable in trainable_weights, and its gradient collects all three uses."""
    ours, _ = _pair("all", False)
    src, tgt = _batch(rng)
    table = ours.src_embedding.embeddings
    assert sum(w is table for w in ours.trainable_weights) == 1
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(ours(src, tgt)))
    grad = tf.convert_to_tensor(tape.gradient(loss, table))
    # rows of words in neither sentence get a gradient from the output layer alone
    unused = sorted(set(range(V)) - set(src.ravel()) - set(tgt.ravel()))
    assert unused and float(tf.reduce_max(tf.abs(tf.gather(grad, unused)))) > 0
