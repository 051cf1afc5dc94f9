"""Ulysses attention on gloo processes equals one process and the ring; its traffic
follows the formula.

One launch per world size runs every case; the parent compares the gathered outputs
and gradients with the float64 oracle (numpy reference for the output, autograd
through the torch reference for the gradients) and with ring attention on the same
shards.
"""

import math

import pytest
from _distributed_helpers import shared_launch

from companion.numpy import scaled_dot_product_attention_reference as numpy_reference
from companion.testing import assert_close
from companion.torch import scaled_dot_product_attention_reference as torch_reference
from companion.torch.distributed import launch
from companion.torch.distributed.examples import attention_inputs
from companion.torch.distributed.examples_axes import run_ulysses
from companion.torch.distributed.ulysses import ulysses_bytes

# (B, H, H_kv, D, D_v) per world size: own kv heads, grouped, kv heads replicated
HEADS = {
    2: [(2, 4, 4, 8, 8), (1, 4, 2, 8, 5), (1, 2, 1, 4, 6)],
    4: [(1, 8, 2, 4, 3), (1, 4, 1, 4, 4)],
}
# (layout, causal): every pair on 2 ranks; on 4, the two that differ most
LAYOUTS = {
    2: [(layout, causal) for layout in ("contiguous", "zigzag") for causal in (0, 1)],
    4: [("contiguous", False), ("zigzag", True)],
}
NAMES = ("output", "grad_query", "grad_key", "grad_value")


def _cases(world_size):
    own_scale = dict(B=1, H=4, H_kv=2, length=2 * world_size, D=4, D_v=4, seed=7)
    return [
        dict(
            B=B,
            H=H,
            H_kv=H_kv,
            length=2 * world_size * 3,
            D=D,
            D_v=D_v,
            causal=bool(causal),
            layout=layout,
            seed=10 * i + world_size,
        )
        for layout, causal in LAYOUTS[world_size]
        for i, (B, H, H_kv, D, D_v) in enumerate(HEADS[world_size])
    ] + [dict(own_scale, causal=True, layout="zigzag", scale=0.3)]


def _oracle(case):
    case = dict(case)
    causal, scale = case.pop("causal"), case.pop("scale", None)
    del case["layout"]
    q, k, v, grad_out = attention_inputs(**case)
    arrays = (q.numpy(), k.numpy(), v.numpy())
    expected = numpy_reference(*arrays, causal=causal, scale=scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch_reference(*leaves, causal=causal, scale=scale).backward(grad_out)
    return [expected] + [t.grad for t in leaves]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ulysses_run(request, tmp_path_factory):
    world_size = request.param
    cases = _cases(world_size)
    # the refusals run in the same launch (starting processes costs seconds); on 4
    # processes the launch is shared with the ring cases and the 4-stage pipeline
    if world_size == 4:
        per_rank = shared_launch(4, tmp_path_factory)["ulysses"]
    else:
        per_rank = launch(run_ulysses, world_size, cases, True)
    return world_size, cases, [r["cases"] for r in per_rank], per_rank[0]["refusals"]


def test_ulysses_equals_one_process_and_the_ring(ulysses_run):
    world_size, cases, per_rank, _ = ulysses_run
    for case, result in zip(cases, per_rank[0]):
        name = f"W={world_size} {case}"
        for key, expected in zip(NAMES, _oracle(case)):
            assert_close(result["ulysses"][key], expected, name=f"{key} {name}")
            assert_close(
                result["ulysses"][key], result["ring"][key], name=f"ring {key} {name}"
            )


def test_ulysses_bytes_follow_the_formula(ulysses_run):
    """(W-1)/W of q, k, v (with replicas) and o, forward and backward; ring beside."""
    world_size, cases, per_rank, _ = ulysses_run
    W = world_size
    for index, case in enumerate(cases):
        for rank in range(W):
            result = per_rank[rank][index]
            s = result["shard_bytes"]
            expected = ulysses_bytes(
                s["q"], s["k"], s["v"], s["o"], W, heads=(case["H"], case["H_kv"])
            )
            replicas = math.lcm(case["H_kv"], W) // case["H_kv"]
            by_hand = (s["q"] + replicas * (s["k"] + s["v"]) + s["o"]) * (W - 1) // W
            assert expected == by_hand
            for direction in ("forward", "backward"):
                counts = result["ulysses"][direction]
                assert counts["bytes"] == {"all_to_all": expected}, (case, direction)
                assert counts["calls"] == {"all_to_all": 4}
            ring = result["ring"]
            assert ring["forward"]["bytes"]["send"] == (W - 1) * (s["k"] + s["v"])


def test_ulysses_refuses_heads_that_do_not_split(ulysses_run):
    world_size, *_, messages = ulysses_run
    H = world_size + 1
    assert f"world_size={world_size} must divide the query heads H={H}" in messages[0]
    assert "zigzag shard holds two equal chunks" in messages[1]


def test_ulysses_bytes_formula_errors():
    with pytest.raises(ValueError, match="must divide the query heads"):
        ulysses_bytes(1, 1, 1, 1, 4, heads=(6, 2))
    assert ulysses_bytes(8, 8, 8, 8, 1) == 0
    assert ulysses_bytes(8, 8, 8, 8, 4, heads=(4, 1)) == (8 + 4 * 16 + 8) * 3 // 4
