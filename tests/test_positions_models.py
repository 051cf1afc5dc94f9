"""The transformer block's swappable parts and the language model's position schemes.

Norms, GELUs and SwiGLU against their formulas; pre- and post-norm blocks against their
composition; parameter counts (the MLP holds ``8E^2`` of the block's ``12E^2``);
KV-cache decoding equal to the full pass for every position scheme.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from companion.numpy import sinusoidal_positions as sinusoidal_numpy
from companion.params import count_parameters
from companion.testing import assert_close
from companion.torch import KVCache, alibi_bias, sinusoidal_positions
from companion.torch.models import (
    SwiGLU,
    TinyTransformerLM,
    TransformerBlock,
    generate,
    make_mlp,
    make_norm,
)

E = 16
SCHEMES = ["learned", "sinusoidal", "rope", "alibi", None]


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).double()


def test_rms_norm_is_the_formula():
    norm = make_norm("rms", E, eps=1e-3).double()
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-3
    with torch.no_grad():
        norm.weight.copy_(_x(E, seed=1))
    x = _x(2, 5, E)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-3) * norm.weight
    assert_close(norm(x), expected)
    assert count_parameters(norm) == E


def test_layer_norm_eps_is_honoured():
    norm = make_norm("layer", E, eps=1e-2).double()
    x = _x(3, E) * 0.1  # small variance: eps matters
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-2))
    assert count_parameters(norm) == 2 * E


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
def test_gelu_mlps_use_the_named_gelu(kind):
    mlp = make_mlp(kind, E).double()
    x = _x(4, E)
    h = mlp[0](x)
    if kind == "gelu":
        act = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert_close(mlp(x), mlp[2](act))
    # E -> 4E -> E: 8E^2 weights and 5E biases
    assert count_parameters(mlp) == 8 * E * E + 5 * E


def test_swiglu_is_the_formula_and_about_as_large():
    mlp = make_mlp("swiglu", E).double()
    assert isinstance(mlp, SwiGLU)
    hidden = 8 * E // 3
    assert mlp.gate.weight.shape == (hidden, E)
    x = _x(3, E)
    gate = x @ mlp.gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    assert_close(mlp(x), expected)
    assert count_parameters(mlp) == 3 * E * hidden
    assert abs(count_parameters(mlp) - 8 * E * E) <= 3 * E


def test_block_parameters_are_twelve_e_squared_plus_biases():
    block = TransformerBlock(E, 4)
    # attention 4E^2 + 4E, MLP 8E^2 + 5E, two LayerNorms 4E
    assert count_parameters(block) == 12 * E * E + 13 * E
    assert count_parameters(block.mlp) == 8 * E * E + 5 * E


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("mlp", ["gelu", "gelu_tanh", "swiglu"])
def test_block_is_its_composition(norm_first, norm, mlp):
    torch.manual_seed(0)
    block = TransformerBlock(
        E, 4, norm=norm, norm_first=norm_first, mlp=mlp, norm_eps=1e-4
    ).double()
    x = _x(2, 6, E)

    def attend(h):
        return block.attention(h, causal=True)

    if norm_first:
        h = x + attend(block.norm1(x))
        expected = h + block.mlp(block.norm2(h))
    else:
        h = block.norm1(x + attend(x))
        expected = block.norm2(h + block.mlp(h))
    assert_close(block(x)[0], expected)
    assert block.norm1.eps == 1e-4


def _lm(positions, seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyTransformerLM(
        13, 20, embed_dim=E, num_heads=4, num_layers=2, positions=positions, **kwargs
    ).double()


VARIANTS = {
    "default": {},
    "gqa": {"num_kv_heads": 2},
    "rms-swiglu": {"norm": "rms", "mlp": "swiglu"},
    "post-tanh": {"norm_first": False, "mlp": "gelu_tanh"},
}


@pytest.mark.parametrize("positions", SCHEMES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_cached_decoding_equals_the_full_pass(positions, variant):
    model = _lm(positions, **variant)
    ids = torch.randint(13, (2, 11), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    caches = model.new_caches()
    prefix = model(ids[:, :4], caches=caches)
    steps = [model(ids[:, t : t + 1], caches=caches) for t in range(4, 11)]
    assert_close(torch.cat([prefix, *steps], dim=1), full)


@pytest.mark.parametrize("positions", SCHEMES, ids=str)
def test_greedy_generation_with_and_without_cache_agree(positions):
    model = _lm(positions).float()
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 8, use_cache=True)
    b = generate(model, prompt, 8, use_cache=False)
    assert torch.equal(a, b)


def test_position_parameters_per_scheme():
    learned, others = _lm("learned"), {p: _lm(p) for p in SCHEMES[1:]}
    for scheme, model in others.items():
        # only the learned table (max_length x E) has parameters
        assert count_parameters(learned) - count_parameters(model) == 20 * E, scheme
        assert model.position_embedding is None
        assert not any("position" in k for k in model.state_dict())
    assert_close(
        others["sinusoidal"].position_table,
        sinusoidal_positions(20, E, dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    assert all(others[p].position_table is None for p in SCHEMES[2:])


def _first_block_input(model, ids, **kwargs):
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    try:
        model(ids, **kwargs)
    finally:
        hook.remove()
    return seen[0]  # (B, T, E)


@pytest.mark.parametrize("start", [0, 5])
def test_sinusoidal_table_is_float64_after_double(start):
    # Built in float64 and rounded once to the model's dtype: a float32 model adds the
    # float32-rounded table (as before), a ``.double()`` model the exact float64 table
    # of the numpy reference, not a float32 table widened (3e-8 off).
    torch.manual_seed(0)
    model = TinyTransformerLM(11, 20, embed_dim=E, positions="sinusoidal")
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    caches = None
    if start:
        caches = model.new_caches()
        model(torch.zeros(2, start, dtype=torch.long), caches=caches)
    table32 = sinusoidal_positions(start + 4, E, dtype=torch.float32)[start:]
    x32 = _first_block_input(model, ids, caches=caches)
    assert torch.equal(x32, model.embedding(ids).detach() + table32)

    model = model.double()
    if start:
        caches = model.new_caches()
        model(torch.zeros(2, start, dtype=torch.long), caches=caches)
    x64 = _first_block_input(model, ids, caches=caches)
    expected = torch.from_numpy(sinusoidal_numpy(start + 4, E)[start:])  # float64
    assert x64.dtype == torch.float64
    added = x64 - model.embedding(ids).detach()
    assert_close(added, np.broadcast_to(expected, added.shape), rtol=1e-15, atol=1e-15)
    assert (added.float().double() - expected).abs().max() > 0  # float32 would differ


def test_schemes_differ_and_rope_blocks_rotate():
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    outs = {str(p): _lm(p)(ids) for p in SCHEMES}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)
    assert all(b.attention.rope is not None for b in _lm("rope").blocks)
    assert all(b.attention.rope is None for b in _lm("alibi").blocks)


def test_alibi_model_passes_the_bias_to_every_block():
    """The model's forward spelled out: no position added, the bias in every block."""
    model = _lm("alibi")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    x = model.embedding(ids)
    bias = alibi_bias(4, 6, 6, dtype=torch.float64)
    for block in model.blocks:
        x, _ = block(x, mask=bias)
    assert_close(model(ids), model.head(model.norm(x)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"positions": "absolute"}, ValueError, "positions"),
        ({"norm": "batch"}, ValueError, "norm"),
        ({"mlp": "relu"}, ValueError, "mlp"),
        ({"norm_first": 1}, TypeError, "norm_first"),
    ],
    ids=["positions", "norm", "mlp", "norm_first"],
)
def test_bad_choices_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        TinyTransformerLM(10, 8, embed_dim=8, num_heads=2, **kwargs)


@pytest.mark.parametrize("positions", SCHEMES, ids=str)
def test_every_scheme_refuses_positions_past_max_length(positions):
    model = _lm(positions)
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, 21, dtype=torch.long))


@pytest.mark.parametrize("positions", SCHEMES, ids=str)
def test_rolling_caches_see_a_window(positions):
    """With rolling caches (``max_length=W``) every scheme decodes; the first ``W``
    positions see everything and equal the full pass, later ones see a window only."""
    model, W = _lm(positions), 5
    ids = torch.randint(13, (2, 11), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    caches = [KVCache(max_length=W) for _ in model.blocks]
    steps = torch.cat([model(ids[:, t : t + 1], caches=caches) for t in range(11)], 1)
    assert caches[0].seen == 11 and caches[0].length == W
    assert_close(steps[:, :W], full[:, :W])
    assert not torch.allclose(steps[:, W:], full[:, W:])
