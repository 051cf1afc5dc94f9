"""Today's block options (issue 26), one keyword at a time: QK-norm, soft-capping of
scores and logits, sliding-window layers in a local:global pattern, sandwich norms,
``head_dim``, a query scale, an embedding scale and GeGLU; each against the formula
written out here in float64, and each bad input a ``ValueError`` or ``TypeError``
naming the argument. The defaults build what was built before (same modules, same
random draws, same configuration keys).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from companion.testing import assert_close  # noqa: E402
from companion.torch.gpt import GPT, generate  # noqa: E402
from companion.torch.models import GeGLU, TransformerBlock, make_mlp  # noqa: E402
from companion.torch.multihead import MultiHeadAttention  # noqa: E402

F64 = {"rtol": 1e-12, "atol": 1e-12}
E, H, H_KV, V = 32, 4, 2, 41


def _x(B=2, T=9, width=E, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, width, generator=g, dtype=torch.float64)


def _ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _attention(H_kv=H_KV, **kwargs):
    torch.manual_seed(0)
    module = MultiHeadAttention(E, H, H_kv, implementation="reference", **kwargs)
    return module.double()


def _heads(module, x):
    """Queries ``(B, H, T, D)`` and keys, values ``(B, H_kv, T, D)`` of ``x``."""
    B, T, _ = x.shape
    D, H_kv = module.head_dim, module.num_kv_heads
    q = module.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = module.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
    v = module.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
    return q, k, v


def _attend(module, q, k, v, scores_of=lambda s: s):
    """Causal attention written out: grouped heads repeated, ``scores_of`` applied
    to the scaled scores before the mask."""
    group = H // module.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = module.scale or 1 / math.sqrt(module.head_dim)
    scores = scores_of(scale * q @ k.transpose(-1, -2))  # (B, H, T, T)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    B = q.shape[0]
    merged = (weights @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
    return module.out_proj(merged), weights


# --- QK-norm ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_qk_norm_shapes_and_formula(kind):
    module = _attention(qk_norm=kind, qk_norm_eps=1e-6)
    D = E // H
    norm_class = torch.nn.RMSNorm if kind == "rms" else torch.nn.LayerNorm
    for norm in (module.q_norm, module.k_norm):
        assert isinstance(norm, norm_class) and norm.weight.shape == (D,)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=torch.float64))
    x = _x()
    with torch.no_grad():
        q, k, v = _heads(module, x)
        expected, _ = _attend(module, module.q_norm(q), module.k_norm(k), v)
        actual = module(x, causal=True)
    assert_close(actual, expected, **F64)


def test_qk_norm_makes_attention_blind_to_the_size_of_w_q_and_w_k():
    """RMS-normalised queries and keys do not grow with ``W_q`` and ``W_k``: the
    scores, and so the output, stay (up to eps) the same when both are scaled by 10;
    without QK-norm the scores grow 100-fold."""
    x = _x()
    outputs = {}
    for qk_norm in ("rms", None):
        module = _attention(qk_norm=qk_norm, qk_norm_eps=1e-12)
        before = module(x, causal=True)
        with torch.no_grad():
            module.q_proj.weight.mul_(10.0)
            module.k_proj.weight.mul_(10.0)
        outputs[qk_norm] = (before, module(x, causal=True))
    assert_close(*outputs["rms"], rtol=1e-9, atol=1e-9)
    assert (outputs[None][0] - outputs[None][1]).abs().max() > 1e-2


def test_qk_norm_in_the_gpt_adds_two_norms_per_layer():
    plain = GPT(V, 16, embed_dim=E, num_heads=H, num_layers=3)
    normed = GPT(V, 16, embed_dim=E, num_heads=H, num_layers=3, qk_norm=True)
    D = E // H
    assert normed.num_parameters() - plain.num_parameters() == 3 * 2 * D
    assert normed.config["qk_norm"] is True and "qk_norm" not in plain.config
    assert "blocks.0.attention.q_norm.weight" in normed.state_dict()


# --- soft-capping -----------------------------------------------------------------


@pytest.mark.parametrize("H_kv", [1, 2, 4])
def test_softcap_scores_equal_the_tanh_formula(H_kv):
    cap = 2.0
    module = _attention(H_kv, softcap=cap)
    x = _x(scale=3.0)
    with torch.no_grad():
        q, k, v = _heads(module, x)
        expected, weights = _attend(
            module, q, k, v, lambda s: cap * torch.tanh(s / cap)
        )
        actual, actual_weights = module(x, causal=True, return_weights=True)
    assert_close(actual, expected, **F64)
    assert_close(actual_weights, weights, **F64)


def test_softcap_bounds_the_scores():
    """Within a row, ``log(p_i / p_j) = s_i - s_j``: capped scores ``|s| < c`` keep
    every ratio below ``e^(2c)``, however large the queries and keys (reached here:
    far out, tanh rounds to exactly 1)."""
    cap = 1.5
    module = _attention(softcap=cap)
    x = _x(scale=100.0)  # raw scores in the thousands
    with torch.no_grad():
        _, weights = module(x, causal=True, return_weights=True)
        _, raw = _attention()(x, causal=True, return_weights=True)
    T = x.shape[1]
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    log_w = weights.log().masked_fill(~visible, float("nan"))
    spread = log_w.nan_to_num(nan=-math.inf).amax(-1) - log_w.nan_to_num(
        nan=math.inf
    ).amin(-1)
    assert spread.max() <= 2 * cap * (1 + 1e-12)
    assert spread.max() > 2 * cap * (1 - 1e-6)
    assert (raw == 0).logical_and(visible).any()  # uncapped: some weights underflow


def test_softcap_routes_to_the_reference_or_refuses():
    cap = 2.0
    x = _x()
    auto = _attention(softcap=cap)
    auto.implementation = "auto"
    reference = _attention(softcap=cap)
    assert_close(auto(x, causal=True), reference(x, causal=True), **F64)
    for implementation in ("sdpa", "tiled"):
        with pytest.raises(ValueError, match="softcap"):
            MultiHeadAttention(E, H, softcap=cap, implementation=implementation)
        with pytest.raises(ValueError, match="softcap"):
            reference(x, causal=True, implementation=implementation)
        with pytest.raises(ValueError, match="attn_softcap"):
            GPT(V, 16, attn_softcap=cap, implementation=implementation)


def test_gpt_attention_softcap_runs_every_implementation_that_forms_scores():
    kwargs = dict(embed_dim=E, num_heads=H, num_layers=2, attn_softcap=1.0)
    torch.manual_seed(0)
    model = GPT(V, 16, implementation="reference", **kwargs).double().eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
        model.set_implementation("auto")
        assert_close(model(ids), expected, **F64)
        with pytest.raises(ValueError, match="attn_softcap"):
            model.set_implementation("sdpa")
        assert model.implementation == "auto"
        model.blocks[0].attention.implementation = "tiled"  # by hand: refused in use
        with pytest.raises(ValueError, match="softcap"):
            model(ids)


def test_logit_softcap_bounds_and_formula():
    cap = 0.05
    torch.manual_seed(0)
    capped = GPT(V, 16, embed_dim=E, num_heads=H, num_layers=2, logit_softcap=cap)
    torch.manual_seed(0)
    plain = GPT(V, 16, embed_dim=E, num_heads=H, num_layers=2)
    capped, plain = capped.double().eval(), plain.double().eval()
    assert all(
        torch.equal(a, b)
        for a, b in zip(capped.state_dict().values(), plain.state_dict().values())
    )
    ids = _ids()
    with torch.no_grad():
        z, raw = capped(ids), plain(ids)
    assert z.abs().max() < cap < raw.abs().max()
    assert_close(z, cap * torch.tanh(raw / cap), **F64)


# --- sliding windows and the local:global pattern ---------------------------------


def _gpt(**kwargs):
    torch.manual_seed(0)
    kwargs = {"embed_dim": E, "num_heads": H, "num_kv_heads": H_KV, **kwargs}
    return GPT(V, 40, **kwargs).double().eval()


def test_local_global_assigns_windows():
    model = _gpt(num_layers=7, window=4, local_global=(5, 1))
    expected = ["local"] * 5 + ["global", "local"]
    assert model.config["layer_types"] == expected
    assert [b.window for b in model.blocks] == [4, 4, 4, 4, 4, None, 4]
    assert [c.max_length for c in model.new_caches()] == [4] * 5 + [None, 4]
    assert [c.max_length for c in model.new_caches(rolling=False)] == [None] * 7
    assert _gpt(num_layers=4, window=3, local_global=(1, 2)).config["layer_types"] == [
        "local",
        "global",
        "global",
        "local",
    ]
    explicit = _gpt(num_layers=3, window=3, layer_types=["global", "local", "local"])
    assert [b.window for b in explicit.blocks] == [None, 3, 3]
    every = _gpt(num_layers=2, window=3)  # no pattern: every layer slides (Mistral)
    assert every.config["layer_types"] == ["local", "local"]


def test_local_rope_base_goes_to_the_local_layers():
    model = _gpt(
        num_layers=3, window=3, local_global=(2, 1), rope_base=1e6, local_rope_base=1e4
    )
    assert [b.attention.rope.base for b in model.blocks] == [1e4, 1e4, 1e6]
    scaled = _gpt(
        num_layers=3,
        window=3,
        local_global=(2, 1),
        local_rope_base=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    assert [b.attention.rope.scaling is None for b in scaled.blocks] == [
        True,
        True,
        False,
    ]
    assert scaled.blocks[2].attention.rope.scaling.factor == 8.0


def test_windows_limit_what_a_position_sees():
    """Two sliding layers of window 3: position t sees tokens t - 4 .. t only. A
    change of token 0 moves the logits of positions 0 .. 4 and no later one."""
    model = _gpt(num_layers=2, window=3)
    ids = _ids(B=1, T=10)
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % V
    with torch.no_grad():
        moved = (model(ids) - model(other)).abs().amax(-1)[0]  # (T,)
    assert (moved[:5] > 1e-6).all()
    assert (moved[5:] == 0).all()


@pytest.mark.parametrize("implementation", ["sdpa", "reference", "tiled"])
def test_rolling_caches_give_the_full_pass(implementation):
    model = _gpt(
        num_layers=4, window=3, local_global=(2, 1), implementation=implementation
    )
    prompt = _ids(T=7)  # longer than the window
    cached = generate(model, prompt, 12, temperature=0)
    uncached = generate(model, prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    caches = model.new_caches()
    with torch.no_grad():
        steps = [model(t, caches=caches) for t in cached.split(2, dim=1)]
        assert_close(torch.cat(steps, 1), model(cached), rtol=1e-10, atol=1e-10)
    assert [c.length for c in caches] == [3, 3, 19, 3]


# --- sandwich norms, scales, head_dim, GeGLU --------------------------------------


def test_post_norms_formula():
    torch.manual_seed(0)
    block = TransformerBlock(E, H, norm="rms", post_norms=True).double()
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, dtype=p.dtype))
    x = _x()
    with torch.no_grad():
        attended = block.attention(block.norm1(x), causal=True)
        y = x + block.post_attention_norm(attended)
        expected = y + block.post_mlp_norm(block.mlp(block.norm2(y)))
        actual, _ = block(x)
    assert_close(actual, expected, **F64)
    plain = TransformerBlock(E, H, norm="rms")
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in block.parameters()) - n_plain == 2 * E


def test_attention_scale_and_head_dim():
    module = _attention(head_dim=12, scale=0.3)
    assert module.q_proj.weight.shape == (H * 12, E)
    assert module.k_proj.weight.shape == (H_KV * 12, E)
    assert module.out_proj.weight.shape == (E, H * 12)
    x = _x()
    with torch.no_grad():
        q, k, v = _heads(module, x)
        expected, _ = _attend(module, q, k, v)
        actual = module(x, causal=True)
        sdpa = module(x, causal=True, implementation="sdpa")
        tiled = module(x, causal=True, implementation="tiled")
    for name, got in (("reference", actual), ("sdpa", sdpa), ("tiled", tiled)):
        assert_close(got, expected, name=name, **F64)


def test_embedding_scale_multiplies_the_block_input():
    model = _gpt(num_layers=1, embedding_scale=3.0)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    ids = _ids()
    with torch.no_grad():
        model(ids)
    assert_close(seen["x"], 3.0 * model.embedding(ids), **F64)


@pytest.mark.parametrize("kind", ["geglu", "geglu_tanh"])
def test_geglu(kind):
    torch.manual_seed(0)
    mlp = make_mlp(kind, E).double()
    assert isinstance(mlp, GeGLU) and mlp.up.weight.shape == (8 * E // 3, E)
    x = _x()
    approximate = "tanh" if kind == "geglu_tanh" else "none"
    gelu = torch.nn.functional.gelu(mlp.gate(x), approximate=approximate)
    assert_close(mlp(x), mlp.down(gelu * mlp.up(x)), **F64)


# --- defaults, checkpoints --------------------------------------------------------


def test_defaults_build_what_they_built():
    """Explicit defaults and no keywords: the same configuration keys, the same
    modules and the same random draws."""
    torch.manual_seed(0)
    plain = GPT(V, 16, embed_dim=E, num_heads=H, num_layers=2)
    torch.manual_seed(0)
    explicit = GPT(
        V,
        16,
        embed_dim=E,
        num_heads=H,
        num_layers=2,
        head_dim=None,
        qk_norm=False,
        attention_scale=None,
        attn_softcap=None,
        post_norms=False,
        window=None,
        local_global=None,
        layer_types=None,
        local_rope_base=None,
        rope_scaling=None,
        embedding_scale=None,
        logit_softcap=None,
    )
    assert list(plain.config) == [
        "vocab_size",
        "context",
        "embed_dim",
        "num_heads",
        "num_kv_heads",
        "num_layers",
        "positions",
        "rope_base",
        "norm",
        "norm_eps",
        "mlp",
        "mlp_hidden",
        "attention_bias",
        "tied",
        "shared_blocks",
    ]
    assert explicit.config == plain.config
    a, b = plain.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_with_options():
    model = _gpt(
        num_layers=3,
        window=3,
        local_global=(2, 1),
        qk_norm=True,
        post_norms=True,
        attention_scale=0.2,
        attn_softcap=5.0,
        implementation="reference",
        embedding_scale=2.0,
        logit_softcap=10.0,
        local_rope_base=100.0,
        head_dim=6,
        mlp="geglu_tanh",
    )
    again = GPT.from_checkpoint(model.checkpoint(), implementation="reference")
    ids = _ids()
    with torch.no_grad():
        assert_close(again.double().eval()(ids), model(ids), **F64)
    assert again.config == model.config


# --- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(qk_norm=1), TypeError, "qk_norm"),
        (dict(post_norms="yes"), TypeError, "post_norms"),
        (dict(attn_softcap=-1.0, implementation="reference"), ValueError, "softcap"),
        (dict(attn_softcap="2", implementation="reference"), TypeError, "softcap"),
        (dict(logit_softcap=math.inf), ValueError, "logit_softcap"),
        (dict(embedding_scale=0.0), ValueError, "embedding_scale"),
        (dict(attention_scale=-0.1), ValueError, "attention_scale"),
        (dict(head_dim=0), ValueError, "head_dim"),
        (dict(window=0), ValueError, "window"),
        (dict(local_global=(5, 1)), ValueError, "local_global"),
        (dict(layer_types=["local"] * 4), ValueError, "layer_types"),
        (dict(window=3, local_global=(1, 1), layer_types=["local"] * 4), ValueError,
         "local_global"),
        (dict(window=3, local_global=(0, 0)), ValueError, "local_global"),
        (dict(window=3, local_global=5), ValueError, "local_global"),
        (dict(window=3, layer_types=["local"] * 3), ValueError, "layer_types"),
        (dict(window=3, layer_types=["local", "full", "local", "local"]), ValueError,
         "layer_types"),
        (dict(local_rope_base=1e4), ValueError, "local_rope_base"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
              positions="learned"), ValueError, "rope_scaling"),
        (dict(rope_scaling="linear"), TypeError, "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), ValueError,
         "factor"),
        (dict(window=3, positions="alibi"), ValueError, "window"),
        (dict(window=3, local_global=(1, 1), shared_blocks=True), ValueError,
         "shared_blocks"),
    ],
)  # fmt: skip
def test_bad_keywords_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        GPT(V, 16, embed_dim=E, num_heads=H, num_layers=4, **kwargs)


def test_bad_attention_keywords():
    with pytest.raises(ValueError, match="qk_norm"):
        MultiHeadAttention(E, H, qk_norm="batch")
    with pytest.raises(ValueError, match="post_norms"):
        TransformerBlock(E, H, post_norms=True, norm_first=False)
    with pytest.raises(TypeError, match="rolling"):
        GPT(V, 16, embed_dim=E, num_heads=H, num_layers=1).new_caches(rolling=1)
