"""The small GPT (issue 24): implementations agree, sdpa is fused and 4-D, the KV cache
gives the same tokens, checkpoints check their configuration."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from companion.testing import assert_close
from companion.torch.gpt import GPT, generate
from companion.torch.models import TransformerBlock

SMALL = dict(embed_dim=32, num_heads=4, num_layers=2)


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GPT(50, 24, **{**SMALL, **kwargs}).eval()


def ids(B=2, T=12, seed=1):
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def test_built_from_transformer_blocks_with_llama_defaults():
    m = model(num_kv_heads=2)
    assert all(isinstance(b, TransformerBlock) for b in m.blocks)
    block = m.blocks[0]
    assert isinstance(block.norm1, torch.nn.RMSNorm)
    assert type(block.mlp).__name__ == "SwiGLU"
    assert block.attention.num_kv_heads == 2
    assert block.attention.k_proj.weight.shape == (2 * 8, 32)  # H_kv * D rows
    assert block.attention.rope is not None
    assert m.head.weight is m.embedding.weight  # tied
    assert m(ids()).shape == (2, 12, 50)


def test_parameter_counts_of_tied_untied_and_shared():
    tied, untied = model(), model(tied=False)
    assert untied.num_parameters() - tied.num_parameters() == 50 * 32
    shared = model(shared_blocks=True, num_layers=3)
    per_block = sum(p.numel() for p in shared.blocks[0].parameters())
    assert model(num_layers=3).num_parameters() - shared.num_parameters() == (
        2 * per_block
    )
    assert len(shared.layers) == 3 and shared.layers[0] is shared.layers[2]


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi", None])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_implementations_compute_the_same_function(positions, num_kv_heads):
    m = model(positions=positions, num_kv_heads=num_kv_heads, attention_bias=True)
    x = ids()
    m.set_implementation("sdpa")
    want = m(x)
    for implementation in ("reference", "tiled"):
        m.set_implementation(implementation)
        assert_close(m(x), want, atol=2e-5, rtol=1e-4)


def test_causal():
    m = model()
    x = ids()
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50  # change the future
    assert_close(m(x)[:, :7], m(y)[:, :7], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(m(x)[:, 7:], m(y)[:, 7:])


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_sdpa_runs_on_the_flash_kernel(num_kv_heads):
    """Restricted to the flash kernel, a call with 3-D tensors finds no kernel; the
    model's training forward and backward run, so its call is 4-D and fused."""
    m = model(num_kv_heads=num_kv_heads)
    x = ids()
    want = m(x)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = m(x)
        loss = torch.nn.functional.cross_entropy(got.flatten(0, 1), x.flatten())
        loss.backward()
        q = torch.ones(4, 5, 8)
        with pytest.raises(RuntimeError, match="kernel"):
            with pytest.warns(UserWarning) as record:
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert any("4 dimensional" in str(w.message) for w in record)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert m.embedding.weight.grad is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_kv_heads=1, positions="alibi"),
        dict(positions="learned", shared_blocks=True, implementation="reference"),
    ],
)
def test_kv_cache_gives_the_same_tokens(kwargs):
    m = model(**kwargs)
    prompt = ids(B=3, T=5)
    greedy = generate(m, prompt, 10, temperature=0)
    assert torch.equal(greedy, generate(m, prompt, 10, temperature=0, use_cache=False))
    seeded = dict(top_k=20, generator=torch.Generator().manual_seed(3))
    a = generate(m, prompt, 10, **seeded)
    seeded = dict(top_k=20, generator=torch.Generator().manual_seed(3))
    b = generate(m, prompt, 10, use_cache=False, **seeded)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt) and a.shape == (3, 15)
    # cached logits equal the full run's
    caches = m.new_caches()
    first = m(prompt[:, :3], caches=caches)
    rest = m(prompt[:, 3:], caches=caches)
    assert_close(torch.cat([first, rest], 1), m(prompt), atol=1e-5, rtol=1e-4)


def test_checkpoints_round_trip_and_refuse_another_configuration():
    m = model(num_kv_heads=2)
    ckpt = m.checkpoint()
    other = GPT.from_checkpoint(ckpt)
    assert_close(other.eval()(ids()), m(ids()))
    with pytest.raises(ValueError, match="num_kv_heads: checkpoint 2, model 4"):
        model().load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="tied"):
        model(num_kv_heads=2, tied=False).load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="checkpoint must be"):
        m.load_checkpoint(m.state_dict())


def test_errors():
    m = model()
    with pytest.raises(ValueError, match="context=24"):
        m(torch.zeros(1, 25, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids"):
        m(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="implementation"):
        model(implementation="flash")
    with pytest.raises(ValueError, match="positions"):
        model(positions="sinusoid")
    with pytest.raises(ValueError, match="embed_dim"):
        model(embed_dim=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, ids(), 3, top_p=0)
    with pytest.raises(ValueError, match="exceeds"):
        generate(m, ids(T=12), 14)
    with pytest.raises(ValueError, match="sdpa"):
        m.blocks[0].attention(torch.zeros(1, 3, 32), return_weights=True)
