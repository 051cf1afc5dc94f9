"""Ring attention on gloo processes equals one process's attention on the full sequence.

Each world size is one launch (starting processes that import torch costs seconds), in
which every case runs; the parent compares the gathered outputs and gradients with the
float64 oracle: the numpy reference for the output, torch autograd through the torch
reference for the gradients.
"""

import pytest
import torch
from _distributed_helpers import shared_launch

from companion.numpy import scaled_dot_product_attention_reference as numpy_reference
from companion.testing import assert_close, assert_close_to_oracle
from companion.torch import scaled_dot_product_attention_reference as torch_reference
from companion.torch.distributed import (
    launch,
    shard_positions,
    shard_sequence,
)
from companion.torch.distributed.examples import (
    attention_inputs,
    run_ring_attention,
)

# (B, H, H_kv, D, D_v): multi-head, grouped-query, multi-query
HEADS = [(2, 4, 4, 8, 8), (1, 4, 2, 8, 5), (1, 3, 1, 4, 6)]


def _cases(world_size):
    cases = []
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for i, (B, H, H_kv, D, D_v) in enumerate(HEADS):
                chunk = 3 if i != 1 else 1  # odd chunks, and one-token chunks
                length = 2 * world_size * chunk
                cases.append(
                    dict(
                        B=B,
                        H=H,
                        H_kv=H_kv,
                        length=length,
                        D=D,
                        D_v=D_v,
                        causal=causal,
                        layout=layout,
                        seed=10 * i + world_size,
                    )
                )
    # a scale of our own
    cases.append(
        dict(
            B=1,
            H=2,
            H_kv=1,
            length=2 * world_size,
            D=4,
            D_v=4,
            causal=True,
            layout="zigzag",
            seed=7,
            scale=0.3,
        )
    )
    # float32, grouped heads, both layouts, causal: the ring in another dtype
    for layout in ("contiguous", "zigzag"):
        cases.append(
            dict(
                B=1,
                H=4,
                H_kv=2,
                length=4 * world_size,
                D=8,
                D_v=8,
                causal=True,
                layout=layout,
                seed=99,
                dtype=torch.float32,
            )
        )
    return cases


def _oracle(case, dtype=torch.float64):
    """float64 output (numpy) and gradients (autograd), or the ``dtype`` baseline."""
    case = dict(case)
    causal = case.pop("causal")
    del case["layout"]
    case.pop("dtype", None)
    scale = case.pop("scale", None)
    q, k, v, grad_out = attention_inputs(**case, dtype=dtype)
    if dtype == torch.float64:
        expected = numpy_reference(
            q.numpy(), k.numpy(), v.numpy(), causal=causal, scale=scale
        )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch_reference(*leaves, causal=causal, scale=scale)
    out.backward(grad_out)
    if dtype != torch.float64:
        expected = out.detach()
    return expected, [t.grad for t in leaves]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def ring_run(request, tmp_path_factory):
    world_size = request.param
    cases = _cases(world_size)
    if world_size in (3, 4):  # shared with other modules' cases of this world size
        return world_size, cases, shared_launch(world_size, tmp_path_factory)["ring"]
    return world_size, cases, launch(run_ring_attention, world_size, cases)


def test_ring_attention_equals_one_process(ring_run):
    world_size, cases, per_rank = ring_run
    for case, result in zip(cases, per_rank[0]):
        if case.get("dtype", torch.float64) != torch.float64:
            continue
        expected, grads = _oracle(case)
        name = f"W={world_size} {case}"
        assert_close(result["output"], expected, name=f"output {name}")
        for key, grad in zip(("grad_query", "grad_key", "grad_value"), grads):
            assert_close(result[key], grad, name=f"{key} {name}")


def test_ring_attention_float32_as_close_as_one_process_float32(ring_run):
    """float32: no more than 2x the error of single-process float32 attention."""
    world_size, cases, per_rank = ring_run
    checked = 0
    for case, result in zip(cases, per_rank[0]):
        if case.get("dtype") != torch.float32:
            continue
        oracle, oracle_grads = _oracle(case)
        baseline, baseline_grads = _oracle(case, torch.float32)
        name = f"float32 W={world_size} {case}"
        assert_close_to_oracle(result["output"], baseline, oracle, name=name)
        for key, b, o in zip(
            ("grad_query", "grad_key", "grad_value"), baseline_grads, oracle_grads
        ):
            assert_close_to_oracle(result[key], b, o, name=f"{key} {name}")
        checked += 1
    assert checked == 2


def test_ring_bytes_follow_the_formula(ring_run):
    """Forward (W-1)(k+v) bytes per rank; backward (W-1)(k+v) + W(k+v)."""
    world_size, cases, per_rank = ring_run
    W = world_size
    for case, *results in zip(cases, *per_rank):
        shard = case["length"] // W
        size = torch.tensor([], dtype=case.get("dtype", torch.float64)).element_size()
        k = case["B"] * case["H_kv"] * shard * case["D"] * size
        v = case["B"] * case["H_kv"] * shard * case["D_v"] * size
        for result in results:
            fwd, bwd = result["forward"], result["backward"]
            assert fwd["bytes"].get("send", 0) == (W - 1) * (k + v)
            assert fwd["calls"].get("send", 0) == 2 * (W - 1)
            expected = (W - 1) * (k + v) + (W * (k + v) if W > 1 else 0)
            assert bwd["bytes"].get("send", 0) == expected


def test_causal_work_contiguous_unbalanced_zigzag_balanced(ring_run):
    world_size, cases, per_rank = ring_run
    W = world_size
    for index, case in enumerate(cases):
        if not case["causal"]:
            continue
        work = [per_rank[r][index]["forward"]["score_entries"] for r in range(W)]
        heads = case["B"] * case["H"]
        if case["layout"] == "contiguous":
            c = case["length"] // W  # rank r: r + 1 tiles of c x c
            assert work == [heads * (r + 1) * c * c for r in range(W)]
        else:
            h = case["length"] // (2 * W)  # every rank: 2W + 1 tiles of h x h
            assert work == [heads * (2 * W + 1) * h * h] * W


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_sequence_layouts(layout):
    W, N = 3, 12
    x = torch.arange(N, dtype=torch.float64).reshape(1, N, 1)
    shards = [shard_sequence(x, r, W, layout=layout) for r in range(W)]
    positions = [shard_positions(N, r, W, layout=layout) for r in range(W)]
    for shard, pos in zip(shards, positions):
        assert_close(shard[0, :, 0], pos.to(torch.float64))
    assert sorted(torch.cat(positions).tolist()) == list(range(N))
    if layout == "zigzag":  # rank r: chunks r and 2W-1-r of 2W
        assert positions[0].tolist() == [0, 1, 10, 11]
        assert positions[2].tolist() == [4, 5, 6, 7]
    x_before = x.clone()
    shards[0][0, 0, 0] = -1.0  # a copy: the input is untouched
    assert_close(x, x_before)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_sequence_uneven_is_a_value_error(layout):
    with pytest.raises(ValueError, match="does not split into"):
        shard_sequence(torch.zeros(1, 1, 10, 2), 0, 3, layout=layout)
    # 12 splits into 4 contiguous chunks but not into the 8 chunks of a zigzag
    if layout == "zigzag":
        with pytest.raises(ValueError, match="8 equal chunks"):
            shard_sequence(torch.zeros(1, 1, 12, 2), 0, 4, layout=layout)
    else:
        assert shard_sequence(torch.zeros(1, 1, 12, 2), 0, 4).shape == (1, 1, 3, 2)
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(torch.zeros(1, 1, 12, 2), 0, 3, layout="striped")
    with pytest.raises(ValueError, match="rank"):
        shard_sequence(torch.zeros(1, 1, 12, 2), 3, 3)


def test_ring_attention_bad_input_is_a_clear_error(one_process_group):
    from companion.torch.distributed import ring_attention

    q = torch.zeros(1, 4, 6, 8, dtype=torch.float64)  # (B, H, L, D)
    kv = torch.zeros(1, 2, 6, 8, dtype=torch.float64)  # (B, H_kv, L, D)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        ring_attention(q.numpy(), kv, kv)
    with pytest.raises(TypeError, match="one dtype"):
        ring_attention(q, kv.float(), kv)
    with pytest.raises(ValueError, match="H_kv=3 must divide query heads H=4"):
        ring_attention(q, kv[:, :1].expand(1, 3, 6, 8), kv[:, :1].expand(1, 3, 6, 8))
    with pytest.raises(ValueError, match="same length"):
        ring_attention(q, kv[..., :4, :], kv[..., :4, :])
    with pytest.raises(ValueError, match="two equal chunks"):
        ring_attention(q[..., :5, :], kv[..., :5, :], kv[..., :5, :], layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, kv, kv, layout="striped")
    with pytest.raises(TypeError, match="causal must be a bool"):
        ring_attention(q, kv, kv, causal="yes")
    q_before = q.clone()
    out = ring_attention(q, kv, kv, causal=True)  # world of one: plain attention
    assert out.shape == (1, 4, 6, 8)
    assert_close(q, q_before)


def test_ring_attention_on_a_subgroup():
    """Ranks 1 and 2 of 3 form the ring (group rank 0 is global rank 1); 0 idles."""
    case = dict(B=1, H=4, H_kv=2, length=8, D=4, D_v=4, causal=True, layout="zigzag")
    per_rank = launch(run_ring_attention, 3, [case], 0, [1, 2])
    assert per_rank[0] is None
    result = per_rank[1][0]
    expected, grads = _oracle(case)
    assert_close(result["output"], expected, name="output")
    for key, grad in zip(("grad_query", "grad_key", "grad_value"), grads):
        assert_close(result[key], grad, name=key)
    k_and_v = 2 * (1 * 2 * 4 * 4 * 8)  # (B, H_kv, length / 2, D) float64, twice
    assert result["forward"]["bytes"]["send"] == k_and_v  # W - 1 = 1 hop
