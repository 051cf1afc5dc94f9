"""Encoder-decoders in torch: nn.Transformer equivalence, tying, cached decoding."""

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from companion import params  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch import additive_scores, sinusoidal_positions, softmax  # noqa: E402
from companion.torch.seq2seq import BahdanauSeq2Seq, Seq2SeqTransformer  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
E, H, FF = 16, 4, 24


def _model(share="none", norm_first=False, vs=11, vt=11, layers=(2, 2), seed=0):
    torch.manual_seed(seed)
    return Seq2SeqTransformer(
        vs,
        vt,
        E,
        H,
        *layers,
        FF,
        norm_first=norm_first,
        share_embeddings=share,
        dtype=torch.float64,
    ).eval()


def _batch(rng, vs=11, vt=11):
    """Right-padded source (lengths 7 and 4) and target (lengths 5 and 3)."""
    src = torch.from_numpy(rng.integers(3, vs, (2, 7)))
    tgt = torch.from_numpy(rng.integers(3, vt, (2, 5)))
    src[1, 4:] = PAD
    tgt[:, 0] = BOS
    tgt[1, 3:] = PAD
    return src, tgt


def _reference(transformer, src_emb, tgt_emb, output, src, tgt):
    """nn.Transformer between scaled embeddings + PE and a Linear."""

    def embed(emb, ids):
        pe = sinusoidal_positions(ids.shape[1], E, dtype=torch.float64)
        return emb(ids) * math.sqrt(E) + pe

    L = tgt.shape[1]
    hidden = transformer(
        embed(src_emb, src),
        embed(tgt_emb, tgt),
        # bool masks throughout, True = ignore
        tgt_mask=torch.ones(L, L, dtype=torch.bool).triu(1),
        src_key_padding_mask=src == PAD,  # True = ignore
        tgt_key_padding_mask=tgt == PAD,
        memory_key_padding_mask=src == PAD,
        tgt_is_causal=True,
    )
    return output(hidden)


# nn.Transformer warns that a pre-norm encoder cannot use nested tensors: not ours
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("share", ["none", "decoder-output", "all"])
def test_loads_torch_transformer_and_matches_it(rng, norm_first, share):
    torch.manual_seed(1)
    transformer = nn.Transformer(
        E,
        H,
        2,
        3,
        FF,
        dropout=0.0,
        batch_first=True,
        norm_first=norm_first,
        dtype=torch.float64,
    ).eval()
    V = 11
    src_emb = nn.Embedding(V, E, dtype=torch.float64)
    tgt_emb = src_emb if share == "all" else nn.Embedding(V, E, dtype=torch.float64)
    output = nn.Linear(E, V, bias=False, dtype=torch.float64)
    if share != "none":
        output.weight = tgt_emb.weight
    model = Seq2SeqTransformer.from_torch(transformer, src_emb, tgt_emb, output).eval()
    assert model.share_embeddings == share
    src, tgt = _batch(rng)
    expected = _reference(transformer, src_emb, tgt_emb, output, src, tgt)
    assert_close(model(src, tgt), expected, rtol=0, atol=1e-10, name="logits")
    assert params.count_parameters(model) == params.count_parameters(
        nn.ModuleList([transformer, src_emb, tgt_emb, output])
    )


@pytest.mark.parametrize("share", ["none", "decoder-output", "all"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_parameter_count_matches_params(share, norm_first):
    vs, vt = (11, 11) if share == "all" else (11, 13)
    model = _model(share, norm_first, vs=vs, vt=vt, layers=(2, 3))
    config = params.EncoderDecoderConfig(
        vocab_size=vs,
        tgt_vocab_size=vt,
        hidden_size=E,
        num_heads=H,
        num_encoder_layers=2,
        num_decoder_layers=3,
        intermediate_size=FF,
        share_embeddings=share,
        final_norm=norm_first,
    )
    assert params.count_parameters(model) == params.encoder_decoder_parameter_count(
        config
    )
    embeddings = params.encoder_decoder_parameter_breakdown(config)["embeddings"]
    assert (
        embeddings
        == {"none": 11 + 2 * vt, "decoder-output": 11 + vt, "all": 11}[share] * E
    )


def test_three_way_tying_is_one_parameter(rng):
    model = _model("all")
    assert model.src_embedding.weight is model.tgt_embedding.weight
    assert model.output.weight is model.src_embedding.weight
    src, tgt = _batch(rng)
    model(src, tgt).square().sum().backward()
    # the one tensor collects the gradients of all three uses
    grad = model.src_embedding.weight.grad
    assert grad is not None and model.output.weight.grad is grad
    untied = _model("decoder-output")
    assert untied.src_embedding.weight is not untied.tgt_embedding.weight
    assert untied.output.weight is untied.tgt_embedding.weight


def test_share_all_needs_one_vocabulary():
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqTransformer(11, 13, E, H, 1, 1, FF, share_embeddings="all")
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqTransformer(11, 11, E, H, 1, 1, FF, share_embeddings="encoder")


def test_rejects_float_token_ids():
    model = _model()
    with pytest.raises(TypeError, match="src"):
        model(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("norm_first", [False, True])
def test_source_padding_is_not_read(rng, norm_first):
    """Tokens behind the source padding mask change nothing; their weights are 0."""
    model = _model(norm_first=norm_first)
    src, tgt = _batch(rng)
    keep = src != PAD
    other = src.clone()
    other[1, 4:] = 5  # the same sentence, different tokens under the mask
    before = model(src, tgt, src_mask=keep)
    after = model(other, tgt, src_mask=keep)
    assert_close(after, before, rtol=0, atol=1e-12)
    weights = model.cross_attention_weights(src, tgt)
    assert len(weights) == 2 and weights[0].shape == (2, H, 5, 7)
    for w in weights:
        assert torch.all(w[1, :, :, 4:] == 0)
        assert_close(w.sum(-1), torch.ones(2, H, 5, dtype=torch.float64))
    # and the mask matters: without it the padded positions are read
    unmasked = torch.ones_like(keep)
    assert not torch.allclose(model(other, tgt, src_mask=unmasked), before)


def test_cross_attention_reads_the_encoder_output(rng):
    """Queries from the decoder, keys and values from the memory: (B, H, L, S)."""
    model = _model(layers=(1, 1))
    src, tgt = _batch(rng)
    memory = model.encode(src)
    layer = model.decoder_layers[0]
    x = model.embed(model.tgt_embedding, tgt)
    x = layer.norm1(
        x + layer.self_attn(x, causal=True, mask=(tgt != PAD)[:, None, None])
    )
    mask = (src != PAD)[:, None, None, :]
    _, weights = layer.cross_attn(x, memory, mask=mask, return_weights=True)
    q = layer.cross_attn.q_proj(x).view(2, 5, H, E // H).transpose(1, 2)
    k = layer.cross_attn.k_proj(memory).view(2, 7, H, E // H).transpose(1, 2)
    expected = softmax(q @ k.transpose(-1, -2) / math.sqrt(E // H), mask=mask)
    assert_close(weights, expected, rtol=0, atol=1e-12)
    assert_close(
        model.cross_attention_weights(src, tgt)[0], weights, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_uncached(rng, norm_first, beam_size):
    model = _model(norm_first=norm_first, seed=3)
    src, _ = _batch(rng)
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_length": 6, "beam_size": beam_size}
    cached = model.beam_search(src, use_cache=True, **kwargs)
    uncached = model.beam_search(src, use_cache=False, **kwargs)
    assert torch.equal(cached[0], uncached[0])
    assert_close(cached[1], uncached[1], rtol=0, atol=1e-10, name="scores")


def test_greedy_is_argmax_of_teacher_forcing(rng):
    model = _model(seed=4)
    src, _ = _batch(rng)
    tokens, scores = model.greedy_decode(src, bos_id=BOS, eos_id=EOS, max_length=5)
    assert tokens.shape[0] == 2 and torch.all(tokens[:, 0] == BOS)
    with torch.no_grad():
        log_probs = torch.log_softmax(
            model.decode(tokens, model.encode(src), src_mask=src != PAD), -1
        )
    for b in range(2):
        total = 0.0
        for i in range(1, tokens.shape[1]):
            assert tokens[b, i] == log_probs[b, i - 1].argmax()
            total += log_probs[b, i - 1, tokens[b, i]].item()
            if tokens[b, i] == EOS:
                assert torch.all(tokens[b, i + 1 :] == PAD)
                break
        assert scores[b].item() == pytest.approx(total, abs=1e-10)


def test_beam_search_wide_enough_is_exhaustive(rng):
    """A beam as wide as every prefix finds the most likely sequence (brute force)."""
    V, T = 5, 3
    model = _model(vs=V, vt=V, seed=5)
    src = torch.tensor([[3, 4, 3, 4]])
    memory = model.encode(src)
    best, best_score = None, -math.inf
    for length in range(1, T + 1):
        for tail in itertools.product(range(V), repeat=length):
            if EOS in tail[:-1] or (length < T and tail[-1] != EOS):
                continue
            seq = torch.tensor([[BOS, *tail]])
            with torch.no_grad():
                lp = torch.log_softmax(model.decode(seq, memory), -1)[0]
            score = sum(lp[i, t].item() for i, t in enumerate(tail))
            if score > best_score:
                best, best_score = tail, score
    tokens, score = model.beam_search(
        src, bos_id=BOS, eos_id=EOS, max_length=T, beam_size=V**T
    )
    found = [t for t in tokens[0, 1:].tolist()]
    assert found[: len(best)] == list(best)
    assert score.item() == pytest.approx(best_score, abs=1e-10)
    greedy = model.greedy_decode(src, bos_id=BOS, eos_id=EOS, max_length=T)[1]
    assert greedy.item() <= score.item() + 1e-12


# --- Bahdanau -------------------------------------------------------------------------


def _bahdanau(seed=0):
    torch.manual_seed(seed)
    return BahdanauSeq2Seq(9, 10, 8, 12, 10, dtype=torch.float64).eval()


def test_bahdanau_weights_are_additive_attention(rng):
    model = _bahdanau()
    src, tgt = _batch(rng, 9, 10)
    logits, weights = model(src, tgt, return_weights=True)
    assert logits.shape == (2, 5, 10) and weights.shape == (2, 5, 7)
    assert torch.all(weights[1, :, 4:] == 0)
    assert_close(weights.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    # the first step by hand: s_0 from the backward GRU, scores by additive_scores
    annotations, mask, state = model.encode(src)
    scores = additive_scores(state[:, None], annotations, model.w_q, model.w_k, model.v)
    assert_close(weights[:, 0], softmax(scores[:, 0], mask=mask), rtol=0, atol=1e-12)


def test_bahdanau_padding_does_not_change_the_sentence(rng):
    """Packing: a sentence padded further gives the same logits."""
    model = _bahdanau(1)
    src, tgt = _batch(rng, 9, 10)
    longer = torch.cat([src, torch.zeros(2, 3, dtype=src.dtype)], 1)
    assert_close(model(longer, tgt), model(src, tgt), rtol=0, atol=1e-12)


def test_bahdanau_greedy_is_argmax_of_teacher_forcing(rng):
    model = _bahdanau(2)
    src, _ = _batch(rng, 9, 10)
    tokens, weights = model.greedy_decode(src, bos_id=BOS, eos_id=EOS, max_length=6)
    logits, forced = model(src, tokens[:, :-1], return_weights=True)
    assert_close(weights, forced, rtol=0, atol=1e-12)
    for b in range(2):
        for i in range(1, tokens.shape[1]):
            assert tokens[b, i] == logits[b, i - 1].argmax()
            if tokens[b, i] == EOS:
                break


def test_bahdanau_learns_to_reverse():
    """60 steps on reversing 4 tokens: the loss falls by more than half."""
    torch.manual_seed(0)
    model = BahdanauSeq2Seq(8, 8, 8, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        body = torch.randint(3, 8, (16, 4))
        src = body
        tgt = torch.cat(
            [torch.full((16, 1), BOS), body.flip(1), torch.full((16, 1), EOS)], 1
        )
        logits = model(src, tgt[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, 8), tgt[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_decoding_rejects_bad_arguments(rng):
    model = _model()
    src, _ = _batch(rng)
    with pytest.raises(ValueError, match="beam_size"):
        model.beam_search(src, bos_id=BOS, eos_id=EOS, max_length=3, beam_size=0)
    with pytest.raises(ValueError, match="src_mask"):
        model.encode(src, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one token"):
        _bahdanau().encode(torch.zeros(2, 4, dtype=torch.long))


def test_inputs_are_not_modified(rng):
    model = _model()
    src, tgt = _batch(rng)
    src_copy, tgt_copy = src.clone(), tgt.clone()
    model(src, tgt)
    model.beam_search(src, bos_id=BOS, eos_id=EOS, max_length=3, beam_size=2)
    assert torch.equal(src, src_copy) and torch.equal(tgt, tgt_copy)
