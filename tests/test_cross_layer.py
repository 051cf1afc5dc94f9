"""Sharing across layers (issue 25): ALBERT's factorised embedding counted against one
table and against Hugging Face ``AlbertModel``; cross-layer attention (adjacent layers
share one KV cache) equal to the ordinary model when nothing is shared, equal to
attention on the first layer's keys when it is, decoding with the cache equal to the
full pass, and the cache halved; the Universal Transformer's one block with step
embeddings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")

from companion.params import (  # noqa: E402
    PRESETS,
    count_parameters,
    factorized_embedding_parameter_count,
    kv_cache_bytes,
    parameter_breakdown,
)
from companion.testing import assert_close  # noqa: E402
from companion.torch.cross_layer import (  # noqa: E402
    CrossLayerGPT,
    CrossLayerTransformerLM,
    FactorizedEmbedding,
    UniversalTransformer,
)
from companion.torch.gpt import GPT, generate  # noqa: E402
from companion.torch.models import TinyTransformerLM, TransformerBlock  # noqa: E402
from companion.torch.multihead import MultiHeadAttention  # noqa: E402
from companion.torch.vit import EncoderBlock  # noqa: E402

F64 = {"rtol": 1e-12, "atol": 1e-12}
V, L, E = 23, 12, 16


def _ids(B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


# --- ALBERT's factorised embedding ----------------------------------------------------


def test_factorized_embedding_count_against_one_table():
    # ALBERT-base: V = 30000, E = 128, H = 768
    assert factorized_embedding_parameter_count(30000, 128, 768) == (
        30000 * 128 + 128 * 768 + 768
    )
    assert factorized_embedding_parameter_count(30000, 128, 768) == 3_939_072
    assert 30000 * 768 == 23_040_000
    # the presets' ALBERT embeddings: this, plus positions, segments and their norm
    albert = PRESETS["albert-base"]
    assert parameter_breakdown(albert)["embeddings"] == (
        factorized_embedding_parameter_count(30000, 128, 768)
        + (512 + 2) * 128
        + 2 * 128
    )
    assert factorized_embedding_parameter_count(30000, 128, 768, bias=False) == (
        3_939_072 - 768
    )
    module = FactorizedEmbedding(V, 6, E)
    assert count_parameters(module) == factorized_embedding_parameter_count(V, 6, E)
    ids = _ids()
    assert module(ids).shape == (2, 9, E)
    with pytest.raises(ValueError, match="embedding_size"):
        FactorizedEmbedding(V, 0, E)


def test_factorized_embedding_matches_hugging_face_albert():
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(
        vocab_size=V,
        embedding_size=6,
        hidden_size=E,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=L,
    )
    torch.manual_seed(1)
    hf = transformers.AlbertModel(config).double().eval()
    word = hf.embeddings.word_embeddings
    mapping = hf.encoder.embedding_hidden_mapping_in
    hf_count = sum(p.numel() for m in (word, mapping) for p in m.parameters())
    assert hf_count == factorized_embedding_parameter_count(V, 6, E)
    ours = FactorizedEmbedding(V, 6, E).double()
    with torch.no_grad():
        ours.embedding.weight.copy_(word.weight)
        ours.projection.weight.copy_(mapping.weight)
        ours.projection.bias.copy_(mapping.bias)
    ids = _ids(seed=1)
    assert_close(ours(ids), mapping(word(ids)), **F64)


# --- cross-layer attention ----------------------------------------------------------


def _cla(num_layers=4, kv_sharing=2, num_kv_heads=None, seed=2):
    torch.manual_seed(seed)
    return CrossLayerTransformerLM(
        V,
        L,
        embed_dim=E,
        num_heads=4,
        num_layers=num_layers,
        kv_sharing=kv_sharing,
        num_kv_heads=num_kv_heads,
    ).double()


def test_no_sharing_is_the_tiny_transformer():
    ours = _cla(num_layers=2, kv_sharing=1)
    torch.manual_seed(3)
    tiny = TinyTransformerLM(V, L, embed_dim=E, num_heads=4, num_layers=2).double()
    tiny.load_state_dict(ours.state_dict())
    assert count_parameters(ours) == count_parameters(tiny)
    ids = _ids(seed=3)
    with torch.no_grad():
        assert_close(ours(ids), tiny(ids), **F64)


def test_shared_layers_attend_to_the_first_layers_keys_and_values():
    model = _cla(num_layers=2, kv_sharing=2)
    first, second = model.blocks
    assert second.attention.k_proj is None and second.attention.v_proj is None
    ids = _ids(seed=4)
    positions = torch.arange(ids.shape[1])
    x0 = model.embedding(ids) + model.position_embedding(positions)
    with torch.no_grad():
        h0 = first.norm1(x0)
        x1 = x0 + first.attention(h0, causal=True)
        x1 = x1 + first.mlp(first.norm2(x1))
        # the second layer's queries and output, the first layer's keys and values,
        # read from the first layer's input: the package's attention, cross-attending
        mixed = MultiHeadAttention(E, 4).double()
        mixed.q_proj, mixed.out_proj = (
            second.attention.q_proj,
            second.attention.out_proj,
        )
        mixed.k_proj, mixed.v_proj = first.attention.k_proj, first.attention.v_proj
        x2 = x1 + mixed(second.norm1(x1), h0, causal=True)
        x2 = x2 + second.mlp(second.norm2(x2))
        expected = model.head(model.norm(x2))
        assert_close(model(ids), expected, **F64)


def test_sharing_removes_the_key_value_projections():
    shared = _cla(num_layers=4, kv_sharing=2)
    torch.manual_seed(5)
    plain = TinyTransformerLM(V, L, embed_dim=E, num_heads=4, num_layers=4)
    kv_projections = 2 * (E * E + E)  # k_proj and v_proj of one layer
    assert count_parameters(shared) == count_parameters(plain) - 2 * kv_projections
    assert count_parameters(_cla(num_layers=4, kv_sharing=4)) == (
        count_parameters(plain) - 3 * kv_projections
    )


@pytest.mark.parametrize(
    "num_layers, kv_sharing, num_kv_heads", [(4, 2, None), (4, 2, 2), (3, 3, None)]
)
def test_decoding_with_the_shared_cache_equals_the_full_pass(
    num_layers, kv_sharing, num_kv_heads
):
    model = _cla(num_layers, kv_sharing, num_kv_heads)
    ids = _ids(T=L, seed=6)
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches()
        assert len(caches) == num_layers // kv_sharing
        steps = [model(ids[:, :3], caches=caches)]  # a prompt, then one at a time
        for t in range(3, L):
            steps.append(model(ids[:, t : t + 1], caches=caches))
    assert_close(torch.cat(steps, dim=1), full, **F64)
    # causal: the first logits do not see later tokens
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    with torch.no_grad():
        assert_close(model(changed)[:, :-1], full[:, :-1], **F64)


def test_the_kv_cache_is_divided_by_the_sharing_factor():
    B, H, D = 2, 4, E // 4
    ids = _ids(B=B, T=L, seed=7)
    counted = {}
    for kv_sharing in (1, 2, 4):
        model = _cla(num_layers=4, kv_sharing=kv_sharing)
        caches = model.new_caches()
        with torch.no_grad():
            model(ids, caches=caches)
        counted[kv_sharing] = model.cache_bytes(caches)
        # float64: 8 bytes
        assert counted[kv_sharing] == kv_cache_bytes(
            4 // kv_sharing, H, D, L, batch=B, dtype_bytes=8
        )
    assert counted[1] == 2 * counted[2] == 4 * counted[4]
    # the unshared model's own caches hold the same bytes as kv_sharing=1
    torch.manual_seed(8)
    tiny = TinyTransformerLM(V, L, embed_dim=E, num_heads=4, num_layers=4).double()
    caches = tiny.new_caches()
    with torch.no_grad():
        tiny(ids, caches=caches)
    assert CrossLayerTransformerLM.cache_bytes(caches) == counted[1]


def test_cross_layer_bad_input():
    with pytest.raises(ValueError, match="kv_sharing"):
        CrossLayerTransformerLM(V, L, num_layers=4, kv_sharing=3)
    with pytest.raises(ValueError, match="kv_sharing"):
        CrossLayerTransformerLM(V, L, num_layers=4, kv_sharing=0)
    model = _cla()
    with pytest.raises(ValueError, match="caches"):
        model(_ids(), caches=[])
    with pytest.raises(ValueError, match="max_length"):
        model(_ids(T=L + 1))
    with pytest.raises(ValueError, match="ids"):
        model(torch.zeros(2, 3))


# --- the Universal Transformer ------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_universal_transformer_is_one_block_applied_with_step_embeddings(causal):
    torch.manual_seed(9)
    steps = 3
    model = UniversalTransformer(E, 2, steps, causal=causal).double()
    kind = TransformerBlock if causal else EncoderBlock
    block = kind(E, 2).double()
    assert isinstance(model.block, kind)
    assert count_parameters(model) == count_parameters(block) + steps * E
    block.load_state_dict(model.block.state_dict())
    with torch.no_grad():
        model.step_embedding.normal_()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    expected = x
    for t in range(steps):
        expected, _ = block(expected + model.step_embedding[t])
    assert_close(model(x), expected, **F64)
    # the step embedding is used: without it the result differs
    with torch.no_grad():
        plain = x
        for _ in range(steps):
            plain, _ = block(plain)
    assert not torch.allclose(model(x), plain)
    # one block's weights get the gradient of every step; each step row its own
    model(x).sum().backward()
    assert model.step_embedding.grad.abs().sum(dim=1).min() > 0
    with pytest.raises(ValueError, match="num_steps"):
        UniversalTransformer(E, 2, 0)


# --- the three in the book's GPT ----------------------------------------------------

GPT_KW = dict(embed_dim=E, num_heads=4, num_layers=4, implementation="reference")


def _gpt(seed=10, **kwargs):
    torch.manual_seed(seed)
    return CrossLayerGPT(V, L, **{**GPT_KW, **kwargs}).double().eval()


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_cross_layer_gpt_without_sharing_is_the_gpt(positions):
    ours = _gpt(positions=positions)
    torch.manual_seed(11)
    gpt = GPT(V, L, **GPT_KW, positions=positions).double().eval()
    gpt.load_state_dict(ours.state_dict())
    assert ours.num_parameters() == gpt.num_parameters()
    ids = _ids(T=L, seed=11)
    with torch.no_grad():
        assert_close(ours(ids), gpt(ids), **F64)


@pytest.mark.parametrize("implementation", ["reference", "sdpa", "tiled"])
@pytest.mark.parametrize(
    "sharing",
    [
        dict(kv_sharing=2),
        dict(kv_sharing=2, num_kv_heads=2),
        dict(kv_sharing=4, positions="alibi"),
        dict(kv_sharing=2, positions="learned"),
        dict(embedding_size=6),
        dict(shared_blocks=True, step_embeddings=True),
    ],
    ids=["cla", "cla-gqa", "cla4-alibi", "cla-learned", "factorized", "universal"],
)
def test_cross_layer_gpt_decodes_with_its_caches_as_the_full_pass(
    sharing, implementation
):
    model = _gpt(**sharing, implementation=implementation)
    if model.step_embedding is not None:
        with torch.no_grad():
            model.step_embedding.normal_()  # from zero: make the steps differ
    ids = _ids(T=L, seed=12)
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches()
        assert len(caches) == 4 // sharing.get("kv_sharing", 1)
        steps = [model(ids[:, :3], caches=caches)]  # a prompt, then one at a time
        for t in range(3, L):
            steps.append(model(ids[:, t : t + 1], caches=caches))
    assert_close(torch.cat(steps, dim=1), full, **F64)
    # generate() reads the model's own caches: the same tokens with and without
    prompt = ids[:, :2]
    drawn = [
        generate(
            model,
            prompt,
            L - 2,
            top_k=5,
            generator=torch.Generator().manual_seed(1),
            use_cache=use,
        )
        for use in (True, False)
    ]
    assert torch.equal(*drawn)


def test_cross_layer_gpt_shares_keys_values_and_halves_the_cache():
    plain, cla = _gpt(), _gpt(kv_sharing=2)
    kv = 2 * E * E  # k_proj and v_proj of one layer, no biases
    assert cla.num_parameters() == plain.num_parameters() - 2 * kv
    assert [b.attention.k_proj is None for b in cla.blocks] == [False, True] * 2
    ids = _ids(T=L, seed=13)
    held = {}
    for name, model in (("plain", plain), ("cla", cla)):
        caches = model.new_caches()
        with torch.no_grad():
            model(ids, caches=caches)
        held[name] = model.cache_bytes(caches)
    assert (
        held["plain"]
        == 2 * held["cla"]
        == kv_cache_bytes(4, 4, E // 4, L, batch=2, dtype_bytes=8)
    )
    # the second layer of a group uses the first layer's (rotated) keys: changing
    # the first layer's key projection changes the second layer's attention
    with torch.no_grad():
        before = cla(ids)
        cla.blocks[0].attention.k_proj.weight.mul_(2.0)
        assert not torch.allclose(cla(ids), before)


def test_cross_layer_gpt_factorised_embedding_and_tied_head():
    model = _gpt(embedding_size=6)
    table = model.embedding.embedding.weight  # (V, 6)
    projection = model.embedding.projection.weight  # (E, 6)
    plain = _gpt()
    assert model.num_parameters() == plain.num_parameters() - V * E + V * 6 + 6 * E
    h = torch.randn(2, 3, E, dtype=torch.float64)
    # the head is the transpose of the lookup's V x H map W_E W_P^T
    assert_close(model.head(h), h @ (table @ projection.T).T, **F64)
    untied = _gpt(embedding_size=6, tied=False)
    assert untied.num_parameters() == model.num_parameters() + V * E
    # ALBERT's gradient reaches both factors through both uses
    model(_ids(T=L)).sum().backward()
    assert table.grad.abs().sum() > 0 and projection.grad.abs().sum() > 0


def test_cross_layer_gpt_universal_is_one_block_with_step_embeddings():
    model = _gpt(shared_blocks=True, step_embeddings=True)
    shared = _gpt(shared_blocks=True)
    assert model.num_parameters() == shared.num_parameters() + 4 * E
    assert len(model.blocks) == 1 and len(model.layers) == 4
    shared.load_state_dict(model.state_dict(), strict=False)
    ids = _ids(T=L, seed=14)
    with torch.no_grad():  # from zero the steps add nothing: the shared model
        assert_close(model(ids), shared(ids), **F64)
        model.step_embedding.normal_()
        assert not torch.allclose(model(ids), shared(ids))
    model(ids).sum().backward()
    assert model.step_embedding.grad.abs().sum(dim=1).min() > 0  # each step's row


def test_cross_layer_gpt_checkpoint_round_trip():
    model = _gpt(kv_sharing=2, embedding_size=6)
    again = CrossLayerGPT.from_checkpoint(model.checkpoint()).double()
    ids = _ids(T=L, seed=15)
    with torch.no_grad():
        assert_close(again.eval()(ids), model(ids), **F64)
    with pytest.raises(ValueError, match="kv_sharing"):
        _gpt().load_checkpoint(model.checkpoint())


def test_cross_layer_gpt_bad_input():
    with pytest.raises(ValueError, match="kv_sharing"):
        _gpt(kv_sharing=3)
    with pytest.raises(ValueError, match="kv_sharing"):
        _gpt(kv_sharing=2, shared_blocks=True)
    with pytest.raises(ValueError, match="embedding_size"):
        _gpt(embedding_size=E)
    with pytest.raises(TypeError, match="step_embeddings"):
        _gpt(step_embeddings=1)
    model = _gpt(kv_sharing=2)
    with pytest.raises(ValueError, match="caches"):
        model(_ids(), caches=GPT(V, L, **GPT_KW).new_caches())
    with pytest.raises(ValueError, match="context"):
        model(_ids(T=L + 1))
