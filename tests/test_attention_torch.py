"""The torch attention namespace against torch's own built-ins and against autograd.

* every attention implementation registered for torch equals
  ``torch.nn.functional.scaled_dot_product_attention`` (boolean and float masks, causal,
  grouped-query heads, scale; float16/bfloat16 within twice the built-in's own error);
* the hand-written FlashAttention-2 backward of ``attention_tiled`` equals autograd
  through the reference (and passes ``torch.autograd.gradcheck``), saving no ``L x S``
  tensor;
* ``multi_head_attention`` and the ``MultiHeadAttention`` module equal
  ``torch.nn.MultiheadAttention`` with copied weights, differ from it only where
  documented (a fully masked query: NaN there, 0 here), and decode token by token with
  a KV cache.

The cross-backend comparison with the numpy float64 oracle lives in
``tests/test_attention_pairs.py``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import companion.torch as ct
from companion.registry import implementations
from companion.testing import as_backend, assert_close, assert_close_to_oracle

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATTENTION = implementations("attention", backends=("torch",))
ATTENTION_IDS = [f"{backend}-{name}" for backend, name, _ in ATTENTION]
BLOCKS = {"block_q": 3, "block_k": 4}  # divide none of the lengths below


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def tensor(rng, shape, device, dtype="float64"):
    return as_backend(rng.standard_normal(shape), "torch", dtype).to(device)


def call(name, fn, *args, **kwargs):
    """Call an attention implementation; tiled with blocks that divide nothing."""
    if name == "attention_tiled":
        kwargs = {**BLOCKS, **kwargs}
    return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------
# masks and softmax
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(1, 1), (3, 3), (2, 5), (5, 2), (1, 7)])
def test_causal_mask_is_bottom_right_like_causal_lower_right(L, S, device):
    mask = ct.causal_mask(L, S, device=device)
    assert mask.dtype == torch.bool and mask.device.type == device.type
    expected = torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)
    assert_close(mask, expected, name="causal_mask")
    if L <= S:  # torch materialises causal_lower_right only for L <= S
        assert_close(
            mask, causal_lower_right(L, S)._materialize(), name="causal_lower_right"
        )


def test_padding_mask_marks_the_real_keys(device):
    mask = ct.padding_mask(torch.tensor([3, 0, 5], device=device), 5)
    assert tuple(mask.shape) == (3, 1, 1, 5) and mask.device.type == device.type
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert_close(mask[:, 0, 0], expected, name="padding_mask")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_softmax_masked_entries_and_empty_rows_are_zero(rng, device, dtype):
    x = tensor(rng, (4, 6), device, dtype)
    keep = torch.from_numpy(rng.random((4, 6)) < 0.6).to(device)
    keep[2] = False  # a row with nothing to keep
    keep[0, 0] = True
    weights = ct.softmax(x, axis=-1, mask=keep)
    assert weights.dtype == x.dtype and weights.device.type == device.type
    assert_close(
        weights[~keep],
        torch.zeros(int((~keep).sum()), dtype=x.dtype),
        name="masked entries",
    )
    compute = torch.float64 if dtype == "float64" else torch.float32
    expected = torch.softmax(
        x.to(compute).masked_fill(~keep, -math.inf)[[0, 1, 3]], dim=-1
    ).to(x.dtype)
    assert_close(weights[[0, 1, 3]], expected, name="kept rows vs torch.softmax")


# --------------------------------------------------------------------------------------
# attention against torch.nn.functional.scaled_dot_product_attention
# --------------------------------------------------------------------------------------

SHAPES = [  # (B, H, H_kv, L, S, D, D_v)
    (2, 4, 4, 7, 7, 8, 8),
    (2, 4, 2, 5, 11, 8, 6),
    (1, 6, 1, 1, 5, 4, 4),
    (2, 3, 3, 13, 2, 5, 3),
]
SHAPE_IDS = ["mha-L7-S7", "gqa-L5-S11-Dv6", "mqa-L1", "L13-S2"]


def inputs(rng, shape, device, dtype="float64"):
    B, H, H_kv, L, S, D, D_v = shape
    return (
        tensor(rng, (B, H, L, D), device, dtype),
        tensor(rng, (B, H_kv, S, D), device, dtype),
        tensor(rng, (B, H_kv, S, D_v), device, dtype),
    )


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(
        q, k, v, enable_gqa=q.shape[-3] != k.shape[-3], **kwargs
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_attention_matches_sdpa(rng, device, backend, name, fn, shape):
    q, k, v = inputs(rng, shape, device)
    assert_close(call(name, fn, q, k, v), sdpa(q, k, v), name=f"{name} no mask")
    assert_close(
        call(name, fn, q, k, v, scale=0.3),
        sdpa(q, k, v, scale=0.3),
        name=f"{name} scale",
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_attention_boolean_mask_matches_sdpa(rng, device, backend, name, fn, shape):
    B, H, H_kv, L, S, D, D_v = shape
    q, k, v = inputs(rng, shape, device)
    # broadcast over heads
    keep = torch.from_numpy(rng.random((B, 1, L, S)) < 0.6).to(device)
    keep[0, 0, 0] = False  # one query that sees nothing: 0 in both
    actual = call(name, fn, q, k, v, mask=keep)
    assert_close(actual, sdpa(q, k, v, attn_mask=keep), name=f"{name} boolean mask")
    assert_close(
        actual[0, :, 0], torch.zeros(H, D_v, dtype=q.dtype), name="fully masked row"
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_attention_float_mask_matches_sdpa(rng, device, backend, name, fn, shape):
    B, H, H_kv, L, S, D, D_v = shape
    q, k, v = inputs(rng, shape, device)
    bias = tensor(rng, (H, L, S), device)  # broadcast over the batch
    bias = bias.masked_fill(
        torch.from_numpy(rng.random((H, L, S)) < 0.3).to(device), -math.inf
    )
    bias[:, 0, 1:] = -math.inf  # query 0 sees key 0 only
    assert_close(
        call(name, fn, q, k, v, mask=bias),
        sdpa(q, k, v, attn_mask=bias),
        name=f"{name} float mask",
    )


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_attention_causal_matches_sdpa_bottom_right(
    rng, device, backend, name, fn, shape
):
    B, H, H_kv, L, S, D, D_v = shape
    q, k, v = inputs(rng, shape, device)
    actual = call(name, fn, q, k, v, causal=True)
    if L == S:
        assert_close(
            actual, sdpa(q, k, v, is_causal=True), name=f"{name} causal == is_causal"
        )
    # causal_lower_right for any L, S (for L > S the first L - S queries see nothing: 0)
    visible = torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)
    expected = causal_lower_right(L, S) if L <= S else visible
    assert_close(
        actual, sdpa(q, k, v, attn_mask=expected), name=f"{name} causal_lower_right"
    )
    keep = torch.from_numpy(rng.random((B, 1, 1, S)) < 0.7).to(device)
    assert_close(
        call(name, fn, q, k, v, mask=keep, causal=True),
        sdpa(q, k, v, attn_mask=keep & visible),
        name=f"{name} causal and mask",
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_half_precision_within_twice_the_builtin_error(
    rng, device, backend, name, fn, dtype
):
    shape = SHAPES[1]
    q64, k64, v64 = inputs(rng, shape, device)
    q, k, v = (t.to(getattr(torch, dtype)) for t in (q64, k64, v64))
    keep = torch.from_numpy(rng.random((1, 1, shape[3], shape[4])) < 0.7).to(device)
    actual = call(name, fn, q, k, v, mask=keep, causal=True)
    assert actual.dtype == q.dtype and actual.device.type == device.type
    # (1, 1, L, S)
    visible = keep & causal_lower_right(*shape[3:5])._materialize(device)
    oracle = sdpa(q.double(), k.double(), v.double(), attn_mask=visible)
    baseline = sdpa(q, k, v, attn_mask=visible)
    assert_close_to_oracle(actual, baseline, oracle, name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend,name,fn", ATTENTION, ids=ATTENTION_IDS)
def test_attention_keeps_dtype_and_device_and_inputs(
    rng, device, backend, name, fn, dtype
):
    q, k, v = inputs(rng, SHAPES[1], device, dtype)
    copies = [t.clone() for t in (q, k, v)]
    out = call(name, fn, q, k, v, causal=True)
    assert (
        out.dtype == q.dtype
        and out.device == q.device
        and tuple(out.shape) == (2, 4, 5, 6)
    )
    for before, after in zip(copies, (q, k, v)):
        assert torch.equal(before, after), "an input was modified"


def test_attention_weights_match_sdpa_weights(rng, device):
    q, k, _ = inputs(rng, SHAPES[1], device)
    # V = I returns the weights
    eye = torch.eye(11, dtype=q.dtype, device=device).expand(2, 2, 11, 11)
    weights = ct.attention_weights(q, k, causal=True)
    assert_close(
        weights, sdpa(q, k, eye, attn_mask=causal_lower_right(5, 11)), name="weights"
    )


def test_leading_axes_broadcast(rng, device):
    q = tensor(rng, (3, 1, 4, 5, 8), device)  # (B1, B2, H, L, D)
    k = tensor(rng, (1, 2, 2, 6, 8), device)  # (1, B2, H_kv, S, D)
    v = tensor(rng, (2, 2, 6, 3), device)  # (B2, H_kv, S, D_v)
    expected = ct.scaled_dot_product_attention_reference(
        q.expand(3, 2, 4, 5, 8), k.expand(3, 2, 2, 6, 8), v.expand(3, 2, 2, 6, 3)
    )
    for name in ("scaled_dot_product_attention_reference", "attention_tiled"):
        assert_close(call(name, getattr(ct, name), q, k, v), expected, name=name)


# --------------------------------------------------------------------------------------
# the FlashAttention-2 backward of attention_tiled
# --------------------------------------------------------------------------------------

GRAD_CASES = {  # (B, H, H_kv, L, S, D, D_v), mask kind, causal
    "plain": ((2, 2, 2, 7, 9, 4, 3), None, False),
    "gqa-causal-L<S": ((1, 4, 2, 5, 11, 4, 4), None, True),
    "mqa-causal-L>S": ((2, 3, 1, 10, 4, 3, 5), None, True),
    "bool-mask": ((2, 4, 2, 7, 7, 4, 4), "bool", False),
    "float-mask-causal": ((1, 2, 1, 9, 9, 4, 2), "float", True),
    "L1": ((2, 2, 1, 1, 6, 4, 4), "bool", True),
}


def grad_mask(rng, kind, shape, device):
    B, H, H_kv, L, S, D, D_v = shape
    if kind is None:
        return None
    hidden = torch.from_numpy(rng.random((B, H, L, S)) < 0.3).to(device)
    hidden[:, 0, 0] = True  # query 0 of head 0 sees nothing
    if kind == "bool":
        return ~hidden
    return tensor(rng, (B, H, L, S), device).masked_fill(hidden, -math.inf)


@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
@pytest.mark.parametrize(
    "blocks", [(3, 4), (2, 5), (64, 64)], ids=["bq3-bk4", "bq2-bk5", "bq64-bk64"]
)
def test_tiled_gradients_match_autograd_through_reference(rng, device, case, blocks):
    shape, kind, causal = GRAD_CASES[case]
    q, k, v = (t.requires_grad_() for t in inputs(rng, shape, device))
    mask = grad_mask(rng, kind, shape, device)
    out = ct.attention_tiled(
        q, k, v, mask=mask, causal=causal, block_q=blocks[0], block_k=blocks[1]
    )
    expected = ct.scaled_dot_product_attention_reference(
        q, k, v, mask=mask, causal=causal
    )
    assert_close(out, expected, name="output")
    grad_out = tensor(rng, tuple(out.shape), device)
    tiled_grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for label, actual, wanted in zip(("dQ", "dK", "dV"), tiled_grads, reference_grads):
        assert_close(actual, wanted, name=label)
    # query 0 of head 0 sees nothing: its gradient is exactly 0, not NaN
    if mask is not None:
        assert_close(
            tiled_grads[0][:, 0, 0],
            torch.zeros_like(tiled_grads[0][:, 0, 0]),
            rtol=0,
            atol=0,
            name="dQ of a fully masked row",
        )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_gradcheck(rng, causal):
    q = tensor(rng, (1, 2, 3, 2), "cpu").requires_grad_()
    k = tensor(rng, (1, 1, 5, 2), "cpu").requires_grad_()
    v = tensor(rng, (1, 1, 5, 3), "cpu").requires_grad_()
    keep = torch.from_numpy(rng.random((1, 2, 3, 5)) < 0.7)

    def tiled(q, k, v):
        return ct.attention_tiled(
            q, k, v, mask=keep, causal=causal, block_q=2, block_k=2
        )

    assert torch.autograd.gradcheck(tiled, (q, k, v))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tiled_gradients_in_low_precision(rng, device, dtype):
    shape = (1, 4, 2, 6, 9, 4, 4)
    q64, k64, v64 = (t.requires_grad_() for t in inputs(rng, shape, device))
    grad_out = tensor(rng, (1, 4, 6, 4), device)
    oracle = torch.autograd.grad(
        ct.scaled_dot_product_attention_reference(q64, k64, v64, causal=True),
        (q64, k64, v64),
        grad_out,
    )
    low = [
        t.detach().to(getattr(torch, dtype)).requires_grad_() for t in (q64, k64, v64)
    ]
    baseline = torch.autograd.grad(
        ct.scaled_dot_product_attention_reference(*low, causal=True),
        low,
        grad_out.to(low[0].dtype),
    )
    tiled = torch.autograd.grad(
        ct.attention_tiled(*low, causal=True, block_q=4, block_k=4),
        low,
        grad_out.to(low[0].dtype),
    )
    for label, fast, base, exact in zip(("dQ", "dK", "dV"), tiled, baseline, oracle):
        assert fast.dtype == low[0].dtype
        assert_close_to_oracle(fast, base, exact, name=f"{label} {dtype}")


def test_tiled_saves_no_score_matrix(rng):
    L, S, D = 40, 48, 2  # L * S is far larger than any O(L) or O(S) tensor here
    q, k, v = (t.requires_grad_() for t in inputs(rng, (1, 1, 1, L, S, D, D), "cpu"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        out = ct.attention_tiled(q, k, v, causal=True, block_q=8, block_k=8)
    assert saved and max(saved) < L * S, (
        f"a saved tensor holds {max(saved)} >= L * S = {L * S} numbers"
    )
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_tiled_float_mask_gets_no_gradient(rng):
    q, k, v = inputs(rng, (1, 1, 1, 3, 4, 2, 2), "cpu")
    bias = tensor(rng, (3, 4), "cpu").requires_grad_()
    out = ct.attention_tiled(q, k, v, mask=bias, block_q=2, block_k=2)
    # documented: the mask is a constant for the backward pass
    assert not out.requires_grad


# --------------------------------------------------------------------------------------
# multi-head attention: the function, the module, the KV cache
# --------------------------------------------------------------------------------------


def torch_mha(
    embed_dim, num_heads, *, batch_first, kdim=None, vdim=None, bias=True, device="cpu"
):
    """A float64 ``nn.MultiheadAttention`` with random (non-zero) biases."""
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(
        embed_dim,
        num_heads,
        bias=bias,
        batch_first=batch_first,
        kdim=kdim,
        vdim=vdim,
        dtype=torch.float64,
        device=device,
    )
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return module


def run_mha(module, x_q, x_kv_k, x_kv_v, **kwargs):
    """Call ``nn.MultiheadAttention`` with batch-first tensors, whatever its setting."""
    if module.batch_first:
        return module(x_q, x_kv_k, x_kv_v, **kwargs)
    out, weights = module(
        x_q.transpose(0, 1), x_kv_k.transpose(0, 1), x_kv_v.transpose(0, 1), **kwargs
    )
    return out.transpose(0, 1), weights


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multi_head_attention_matches_nn_multiheadattention(rng, device, batch_first):
    E, H, B, L, S = 12, 3, 2, 5, 7
    module = torch_mha(E, H, batch_first=batch_first, device=device)
    params = ct.MultiHeadParams.from_torch(module)
    x_q, x_kv = tensor(rng, (B, L, E), device), tensor(rng, (B, S, E), device)
    ignore = torch.from_numpy(rng.random((B, S)) < 0.3).to(device)  # nn: True = IGNORE
    ignore[:, 0] = False  # every query keeps one key, so nn gives no NaN
    expected, expected_weights = run_mha(
        module, x_q, x_kv, x_kv, key_padding_mask=ignore, average_attn_weights=False
    )
    keep = ~ignore[:, None, None, :]  # ours: True = attend, (B, 1, 1, S)
    actual, weights = ct.multi_head_attention(
        x_q, x_kv, params, mask=keep, return_weights=True
    )
    assert_close(actual, expected, name="output")
    assert_close(weights, expected_weights, name="per-head weights")
    assert_close(
        ct.multi_head_attention(x_q, x_kv, params, mask=keep),
        expected,
        name="without weights",
    )


def test_multi_head_attention_boolean_attn_mask_is_inverted(rng, device):
    E, H, L = 8, 2, 6
    module = torch_mha(E, H, batch_first=True, device=device)
    x = tensor(rng, (2, L, E), device)
    future = ~ct.causal_mask(L, L, device=device)  # nn: True = may NOT attend
    expected, _ = module(x, x, x, attn_mask=future)
    actual = ct.multi_head_attention(
        x, x, ct.MultiHeadParams.from_torch(module), causal=True
    )
    assert_close(actual, expected, name="causal self-attention")


def test_fully_masked_query_nan_in_nn_zero_here(rng, device):
    """The documented difference: nn.MultiheadAttention gives NaN, ours (and SDPA) 0."""
    E, H, L, S = 8, 2, 3, 4
    module = torch_mha(E, H, batch_first=True, device=device)
    params = ct.MultiHeadParams.from_torch(module)
    x_q, x_kv = tensor(rng, (2, L, E), device), tensor(rng, (2, S, E), device)
    ignore = torch.zeros(2, S, dtype=torch.bool, device=device)
    ignore[1] = True  # sequence 1: every key is padding
    expected, _ = module(x_q, x_kv, x_kv, key_padding_mask=ignore)
    assert torch.isnan(expected[1]).all() and not torch.isnan(expected[0]).any()
    actual, weights = ct.multi_head_attention(
        x_q, x_kv, params, mask=~ignore[:, None, None, :], return_weights=True
    )
    assert_close(
        weights[1],
        torch.zeros_like(weights[1]),
        rtol=0,
        atol=0,
        name="weights of the empty sequence",
    )
    # no value reaches it: only the output bias
    b_o = torch.as_tensor(params.b_o, device=device).expand(L, E)
    assert_close(actual[1], b_o, name="output of the empty sequence")
    assert_close(actual[0], expected[0], name="the other sequence")
    q, k = tensor(rng, (1, H, L, 4), device), tensor(rng, (1, H, S, 4), device)
    nothing = torch.zeros(L, S, dtype=torch.bool, device=device)
    assert_close(
        ct.scaled_dot_product_attention_reference(q, k, k, mask=nothing),
        F.scaled_dot_product_attention(q, k, k, attn_mask=nothing),
        rtol=0,
        atol=0,
        name="SDPA: zero too",
    )


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize(
    "kv_dims", [(None, None), (5, 7)], ids=["self-dims", "kdim5-vdim7"]
)
def test_module_from_torch_matches_nn_multiheadattention(
    rng, device, batch_first, kv_dims
):
    E, H, B, L, S = 12, 4, 2, 5, 6
    kdim, vdim = kv_dims
    reference = torch_mha(
        E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, device=device
    )
    module = ct.MultiHeadAttention.from_torch(reference)
    assert next(module.parameters()).dtype == torch.float64
    x_q = tensor(rng, (B, L, E), device)
    x_k, x_v = (
        tensor(rng, (B, S, kdim or E), device),
        tensor(rng, (B, S, vdim or E), device),
    )
    ignore = torch.from_numpy(rng.random((B, S)) < 0.3).to(device)
    ignore[:, -1] = False
    expected, expected_weights = run_mha(
        reference, x_q, x_k, x_v, key_padding_mask=ignore, average_attn_weights=False
    )
    actual, weights = module(
        x_q, x_k, x_v, mask=~ignore[:, None, None, :], return_weights=True
    )
    assert_close(actual, expected, name="module output")
    assert_close(weights, expected_weights, name="module weights")


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_module_params_round_trip_and_count(rng, device, heads):
    H, H_kv = heads
    E, D = 16, 4
    module = ct.MultiHeadAttention(E, H, H_kv, device=device, dtype=torch.float64)
    counted = sum(p.numel() for p in module.parameters())
    assert counted == E * (H * D) + 2 * E * (H_kv * D) + (H * D) * E + (
        H * D + 2 * H_kv * D + E
    )
    no_bias = ct.MultiHeadAttention(E, H, H_kv, bias=False)
    assert (
        sum(p.numel() for p in no_bias.parameters())
        == E * (H * D) + 2 * E * (H_kv * D) + (H * D) * E
    )
    params = module.to_params()
    assert (params.num_heads, params.num_kv_heads, params.head_dim) == (H, H_kv, D)
    x = tensor(rng, (2, 5, E), device)
    expected = module(x, causal=True)
    assert_close(
        ct.multi_head_attention(x, x, params, causal=True), expected, name="to_params"
    )
    assert_close(
        ct.MultiHeadAttention.from_params(params, device=device)(x, causal=True),
        expected,
        name="from_params",
    )


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_multi_head_attention_matches_numpy_oracle(rng, heads):
    import companion.numpy as cn

    H, H_kv = heads
    params = cn.MultiHeadParams.random(12, H, H_kv, seed=3)
    x_q, x_kv = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 7, 12))
    keep = rng.random((2, 1, 5, 7)) < 0.7
    oracle, oracle_weights = cn.multi_head_attention(
        x_q, x_kv, params, mask=keep, causal=True, return_weights=True
    )
    actual, weights = ct.multi_head_attention(
        torch.from_numpy(x_q),
        torch.from_numpy(x_kv),
        params,
        mask=torch.from_numpy(keep),
        causal=True,
        return_weights=True,
    )
    assert_close(actual, oracle, name="output")
    assert_close(weights, oracle_weights, name="weights")


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kv_cache_decoding_equals_full_causal_attention(rng, device, heads, dtype):
    H, H_kv = heads
    E, B, T = 16, 2, 9
    module = ct.MultiHeadAttention(
        E, H, H_kv, device=device, dtype=getattr(torch, dtype)
    )
    x = tensor(rng, (B, T, E), device, dtype)
    with torch.no_grad():
        full = module(x, causal=True)  # (B, T, E)
        cache = ct.KVCache()
        # a prompt of 3 tokens at once
        prompt = module(x[:, :3], causal=True, cache=cache)
        # then one at a time
        steps = [module(x[:, t : t + 1], causal=True, cache=cache) for t in range(3, T)]
        decoded = torch.cat([prompt, *steps], dim=1)
        assert cache.length == T and tuple(cache.key.shape) == (B, H_kv, T, E // H)
        assert cache.key.device == x.device and cache.key.dtype == x.dtype
        params_cache = ct.KVCache()
        by_function = torch.cat(
            [
                ct.multi_head_attention(
                    x[:, t : t + 1],
                    x[:, t : t + 1],
                    module.to_params(),
                    causal=True,
                    cache=params_cache,
                )
                for t in range(T)
            ],
            dim=1,
        )
    assert_close(decoded, full, name="module decoding")
    assert_close(by_function, full, name="function decoding")


def test_kv_cache_grows_by_doubling(device):
    cache = ct.KVCache()
    assert cache.length == 0 and cache.nbytes == 0 and cache.key is None
    key, value = (
        torch.ones(1, 2, 1, 4, device=device),
        torch.ones(1, 2, 1, 3, device=device),
    )
    capacities = []
    for step in range(100):
        all_keys, all_values = cache.append(key * step, value * step)
        capacities.append(cache.capacity)
    assert tuple(all_keys.shape) == (1, 2, 100, 4) and tuple(all_values.shape) == (
        1,
        2,
        100,
        3,
    )
    assert len(set(capacities)) <= 4, (
        f"storage grew {len(set(capacities))} times for 100 appends"
    )
    assert cache.nbytes == cache.capacity * 2 * (4 + 3) * 4
    assert_close(
        cache.key[0, 0, :, 0], torch.arange(100.0), name="cached keys in order"
    )
    cache.reset()
    assert cache.length == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.append(key, value)
        cache.append(
            torch.ones(1, 3, 1, 4, device=device), torch.ones(1, 3, 1, 3, device=device)
        )


# --------------------------------------------------------------------------------------
# score functions and Nadaraya-Watson against the numpy float64 oracle
# --------------------------------------------------------------------------------------


def score_arguments(rng):
    """numpy float64 arguments of every score function.

    Queries (2, 5, 4), keys (2, 7, 4 or 3).
    """
    q, k, k3 = (
        rng.standard_normal((2, 5, 4)),
        rng.standard_normal((2, 7, 4)),
        rng.standard_normal((2, 7, 3)),
    )
    return {
        "dot_product_scores": (q, k),
        "scaled_dot_product_scores": (q, k),
        "additive_scores": (
            q,
            k3,
            rng.standard_normal((4, 6)),
            rng.standard_normal((3, 6)),
            rng.standard_normal(6),
        ),
        "multiplicative_scores": (q, k3, rng.standard_normal((4, 3))),
        "negative_distance_scores": (q, k),
    }


SCORE_FUNCTIONS = [
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "multiplicative_scores",
    "negative_distance_scores",
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", SCORE_FUNCTIONS)
def test_score_functions_match_numpy_oracle(rng, device, name, dtype):
    import companion.numpy as cn

    # the inputs both sides see
    rounded = [a.astype(dtype) for a in score_arguments(rng)[name]]
    oracle = getattr(cn, name)(*(a.astype("float64") for a in rounded))
    actual = getattr(ct, name)(*(tensor_from(a, device, dtype) for a in rounded))
    assert actual.dtype == getattr(torch, dtype) and actual.device.type == device.type
    if dtype == "float64":
        assert_close(actual, oracle, name=name)
    # as close to the float64 oracle as numpy's own float32 computation, within 2x
    else:
        assert_close_to_oracle(actual, getattr(cn, name)(*rounded), oracle, name=name)


def tensor_from(array, device, dtype):
    return as_backend(array, "torch", dtype).to(device)


@pytest.mark.parametrize(
    "shapes",
    [((9,), (13,), (13,)), ((9, 2), (13, 2), (13, 3)), ((1,), (1,), (1,))],
    ids=["1d", "2d-features-dy3", "single"],
)
@pytest.mark.parametrize("bandwidth", [0.3, 1.0, 4.0])
def test_nadaraya_watson_matches_numpy_oracle(rng, device, shapes, bandwidth):
    import companion.numpy as cn

    x_query, x_keys, y_values = (rng.standard_normal(s) for s in shapes)
    oracle = cn.nadaraya_watson(x_query, x_keys, y_values, bandwidth=bandwidth)
    actual = ct.nadaraya_watson(
        *(tensor_from(a, device, "float64") for a in (x_query, x_keys, y_values)),
        bandwidth=bandwidth,
    )
    assert_close(actual, oracle, name="nadaraya_watson")


def test_negative_distance_scores_equal_cdist(rng, device):
    q, k = tensor(rng, (3, 5, 4), device), tensor(rng, (3, 6, 4), device)
    assert_close(ct.negative_distance_scores(q, k), -torch.cdist(q, k), name="-cdist")


def test_multi_head_params_is_the_numpy_class():
    import companion.numpy as cn

    assert ct.MultiHeadParams is cn.MultiHeadParams


def test_module_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ct.MultiHeadAttention(12, 4, 3)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ct.MultiHeadAttention(10, 4)
    module = ct.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"shape \(B, length, 8\)"):
        module(torch.zeros(2, 3, 7))
