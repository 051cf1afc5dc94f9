"""Encoder-decoders refuse what they cannot translate, alike in torch and Keras.

Issue 23: token ids outside the vocabulary (TensorFlow read -1 as V - 1), ``bos_id``,
``eos_id`` and ``pad_id`` outside it, empty sources, batches of 0, ``max_length <= 0``,
a source batch that does not match the target batch (Keras broadcast a batch of 1
where torch refused: both refuse now), and Keras decoding before the first call.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from companion.testing import assert_close  # noqa: E402
from companion.torch.seq2seq import BahdanauSeq2Seq, Seq2SeqTransformer  # noqa: E402

VS, VT, E, H, FF = 10, 12, 16, 2, 24
SRC = [[1, 2, 3], [4, 5, 6]]
TGT = [[1, 2], [3, 4]]


def _torch_transformer(**kwargs):
    torch.manual_seed(0)
    return Seq2SeqTransformer(VS, VT, E, H, 1, 1, FF, **kwargs).eval()


def _bahdanau(**kwargs):
    torch.manual_seed(0)
    return BahdanauSeq2Seq(VS, VT, 8, 8, 8, **kwargs).eval()


def _t(ids):
    return torch.tensor(ids, dtype=torch.long).reshape(np.shape(ids))


BAD_IDS = [
    ("src", [[1, 2, -1]], [[1, 2]]),  # -1 is not V - 1
    ("src", [[1, 2, VS]], [[1, 2]]),
    ("tgt", [[1, 2, 3]], [[1, -1]]),
    ("tgt", [[1, 2, 3]], [[1, VT]]),
]


@pytest.mark.parametrize("name, src, tgt", BAD_IDS)
@pytest.mark.parametrize("make", [_torch_transformer, _bahdanau])
def test_torch_ids_outside_the_vocabulary(make, name, src, tgt):
    model = make()
    with pytest.raises(ValueError, match=rf"{name} holds token ids outside"):
        model(_t(src), _t(tgt))


@pytest.mark.parametrize("make", [_torch_transformer, _bahdanau])
def test_torch_token_arguments_outside_the_vocabulary(make):
    model = make()
    src = _t(SRC)
    with pytest.raises(ValueError, match="bos_id"):
        model.greedy_decode(src, bos_id=VT, eos_id=2, max_length=3)
    with pytest.raises(ValueError, match="eos_id"):
        model.greedy_decode(src, bos_id=1, eos_id=-1, max_length=3)
    with pytest.raises(ValueError, match="src holds"):
        model.greedy_decode(_t([[1, VS]]), bos_id=1, eos_id=2, max_length=3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_length"):
            model.greedy_decode(src, bos_id=1, eos_id=2, max_length=bad)
    with pytest.raises(ValueError, match="pad_id"):
        make(pad_id=VS)  # inside the target vocabulary, outside the source one
    with pytest.raises(ValueError, match="pad_id"):
        make(pad_id=-1)


@pytest.mark.parametrize("make", [_torch_transformer, _bahdanau])
def test_torch_empty_and_mismatched_batches(make):
    model = make()
    empty = torch.zeros((2, 0), dtype=torch.long)
    with pytest.raises(ValueError, match=r"src must have shape .* got \(2, 0\)"):
        model(empty, _t(TGT))
    none = torch.zeros((0, 3), dtype=torch.long)
    with pytest.raises(ValueError, match=r"src must have shape .* got \(0, 3\)"):
        model(none, torch.zeros((0, 2), dtype=torch.long))
    with pytest.raises(ValueError, match=r"src must have shape .* got \(0, 3\)"):
        model.greedy_decode(none, bos_id=1, eos_id=2, max_length=2)
    for src, tgt in ((SRC[:1], TGT), (SRC, TGT[:1])):
        with pytest.raises(ValueError, match="src and tgt must have the same batch"):
            model(_t(src), _t(tgt))


def test_torch_transformer_decode_refuses_a_memory_of_another_batch():
    model = _torch_transformer()
    memory = model.encode(_t(SRC[:1]))
    with pytest.raises(ValueError, match="tgt and memory"):
        model.decode(_t(TGT), memory)
    with pytest.raises(ValueError, match="src and tgt"):
        model.cross_attention_weights(_t(SRC[:1]), _t(TGT))


def test_bahdanau_all_padding_source_names_src():
    with pytest.raises(ValueError, match="src: every source sentence"):
        _bahdanau()(_t([[0, 0], [1, 2]]), _t(TGT))


def test_valid_inputs_still_translate():
    # the checks refuse only what is wrong: ids 0 and V - 1 are accepted
    model = _torch_transformer()
    logits = model(_t([[0, VS - 1, 3]]), _t([[VT - 1, 0]]))
    assert tuple(logits.shape) == (1, 2, VT)
    tokens, _ = _bahdanau().greedy_decode(_t(SRC), bos_id=1, eos_id=2, max_length=1)
    assert tuple(tokens.shape) == (2, 2)


# --- Keras ------------------------------------------------------------------------


@pytest.fixture
def tf_model():
    pytest.importorskip("tensorflow")
    import keras

    from companion.tensorflow.seq2seq import Seq2SeqTransformer as KerasSeq2Seq

    def make(**kwargs):
        keras.utils.set_random_seed(0)
        return KerasSeq2Seq(VS, VT, E, H, 1, 1, FF, dtype="float64", **kwargs)

    return make


@pytest.mark.parametrize("name, src, tgt", BAD_IDS)
def test_keras_ids_outside_the_vocabulary(tf_model, name, src, tgt):
    # before the fix, -1 gathered row V - 1 of the embedding silently
    model = tf_model()
    with pytest.raises(ValueError, match=rf"{name} holds token ids outside"):
        model(np.array(src), np.array(tgt))


def test_keras_refuses_what_torch_refuses(tf_model):
    model = tf_model()
    src = np.array(SRC)
    with pytest.raises(ValueError, match="bos_id"):
        model.greedy_decode(src, bos_id=VT, eos_id=2, max_length=3)
    with pytest.raises(ValueError, match="pad_id"):
        tf_model(pad_id=VS)
    with pytest.raises(ValueError, match=r"src must have shape .* got \(2, 0\)"):
        model(np.zeros((2, 0), np.int64), np.array(TGT))
    with pytest.raises(ValueError, match=r"src must have shape .* got \(0, 3\)"):
        model(np.zeros((0, 3), np.int64), np.zeros((0, 2), np.int64))
    # src_mask as torch checks it (it was cast to bool, any shape)
    for mask in (np.ones((2, 3), np.float32), np.ones((1, 3), bool)):
        with pytest.raises(ValueError, match="src_mask must be boolean"):
            model(src, np.array(TGT), src_mask=mask)
    # a batch of 1 is not broadcast against a batch of 2 (torch refuses too)
    for s, t in ((SRC[:1], TGT), (SRC, TGT[:1])):
        with pytest.raises(ValueError, match="src and tgt must have the same batch"):
            model(np.array(s), np.array(t))


def test_keras_greedy_decode_before_the_first_call(tf_model):
    # the cross-attention weights did not exist yet: AttributeError key_kernel
    fresh = tf_model()
    kwargs = dict(bos_id=1, eos_id=2, max_length=4)
    tokens, scores = fresh.greedy_decode(np.array(SRC), **kwargs)
    assert tokens.shape[0] == 2 and 2 <= tokens.shape[1] <= 5
    # the same weights without the cache (which needed them built) decode alike
    again, again_scores = fresh.greedy_decode(np.array(SRC), use_cache=False, **kwargs)
    np.testing.assert_array_equal(tokens.numpy(), again.numpy())
    assert_close(scores.numpy(), again_scores.numpy(), atol=1e-12, rtol=1e-12)
