"""implementation='sdpa' of the torch multi-head attention (torch's fused kernel, 4-D)
against the reference path: outputs and gradients, grouped heads, caches, masks,
windows, fully masked rows; what it refuses."""

import pytest
import torch

from companion.testing import assert_close
from companion.torch.multihead import KVCache, MultiHeadAttention

E, H = 16, 4


def make_module(num_kv_heads, rope=None):
    torch.manual_seed(0)
    return MultiHeadAttention(
        E, H, num_kv_heads, rope=rope, dtype=torch.float64, implementation="reference"
    )


CASES = {
    "self": dict(L=7, causal=False),
    "causal": dict(L=7, causal=True),
    "causal-window": dict(L=9, causal=True, window=3),
    "window": dict(L=9, window=2),
    "bool-mask": dict(L=5, mask="bool"),
    "float-mask": dict(L=5, mask="float", causal=True),
    "fully-masked-row": dict(L=5, mask="dead"),
    "L=1": dict(L=1, causal=True),
}


def make_mask(kind, L, S):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        return torch.rand(1, H, L, S, generator=g) > 0.3
    if kind == "float":
        return torch.randn(H, L, S, generator=g, dtype=torch.float64)
    keep = torch.ones(L, S, dtype=torch.bool)
    keep[2] = False  # query 2 sees nothing: its heads are 0
    return keep


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sdpa_equals_the_reference_with_gradients(case, num_kv_heads):
    spec = dict(CASES[case])
    L = spec.pop("L")
    kind = spec.pop("mask", None)
    module = make_module(num_kv_heads, rope=True)
    x = torch.randn(2, L, E, dtype=torch.float64, requires_grad=True)
    mask = None if kind is None else make_mask(kind, L, L)
    weight = torch.linspace(-1, 1, E, dtype=torch.float64)
    outputs, grads = {}, {}
    for implementation in ("reference", "sdpa"):
        module.zero_grad()
        x.grad = None
        y = module(x, mask=mask, implementation=implementation, **spec)
        (y * weight).sum().backward()
        assert torch.isfinite(y).all()
        outputs[implementation] = y.detach()
        grads[implementation] = (x.grad.clone(), module.q_proj.weight.grad.clone())
    assert_close(outputs["sdpa"], outputs["reference"], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads["sdpa"], grads["reference"]):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    if kind == "dead":  # zero heads: the output is the output projection's bias
        bias = module.out_proj.bias.detach().expand(2, E)
        assert_close(outputs["sdpa"][:, 2], bias, rtol=0, atol=1e-15)


@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_sdpa_decoding_with_a_cache_equals_the_full_causal_pass(num_kv_heads):
    module = make_module(num_kv_heads, rope=True)
    x = torch.randn(1, 6, E, dtype=torch.float64)
    full = module(x, causal=True, implementation="reference")
    cache = KVCache()
    first = module(x[:, :4], causal=True, cache=cache, implementation="sdpa")
    steps = [
        module(x[:, i : i + 1], causal=True, cache=cache, implementation="sdpa")
        for i in (4, 5)
    ]
    assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-10, atol=1e-12)
    # L < S, causal: the bottom-right band, not torch's top-left is_causal
    cache = KVCache()
    module(x[:, :3], causal=True, cache=cache, implementation="sdpa")
    tail = module(x[:, 3:], causal=True, cache=cache, implementation="sdpa")
    assert_close(tail, full[:, 3:], rtol=1e-10, atol=1e-12)


def test_sdpa_refuses_weights_and_unknown_names():
    module = make_module(4)
    x = torch.randn(1, 3, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="sdpa.*weights"):
        module(x, implementation="sdpa", return_weights=True)
    with pytest.raises(ValueError, match="implementation must be one of"):
        module(x, implementation="fused")
    with pytest.raises(ValueError, match="implementation must be one of"):
        MultiHeadAttention(E, H, implementation="fused")
    assert MultiHeadAttention(E, H, implementation="sdpa").implementation == "sdpa"
