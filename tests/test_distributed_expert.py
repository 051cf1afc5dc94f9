"""Expert parallelism on gloo processes equals the whole MoE layer in one process; its
traffic follows the formula; capacity is respected; experts that do not split are
refused.

One launch (two ranks, four experts) runs every case; the parent runs the whole
:class:`companion.torch.moe.MoELayer` on each rank's tokens in one process.
"""

import pytest
import torch

from companion.testing import assert_close
from companion.torch.distributed import launch
from companion.torch.distributed.examples_axes import (
    moe_module,
    moe_tokens,
    run_expert_parallel,
)
from companion.torch.distributed.expert_parallel import expert_split
from companion.torch.moe import expert_capacity

W = 2
# (E, I, N, top_k, T, capacity_factor, shared): top-1, top-2, capacity that drops,
# shared experts; N = 3 does not split over two ranks
CASES = [
    (4, 6, 4, 1, 7, None, 0),
    (4, 5, 4, 2, 6, None, 0),
    (3, 4, 4, 2, 8, 0.5, 0),
    (4, 3, 2, 1, 5, 1.0, 1),
    (4, 3, 3, 1, 4, None, 0),
]


def _cases():
    return [
        dict(E=E, I=I, N=N, top_k=k, T=T, seed=i, capacity_factor=c, shared=s)
        for i, (E, I, N, k, T, c, s) in enumerate(CASES)
    ]


@pytest.fixture(scope="module")
def expert_run():
    return _cases(), launch(run_expert_parallel, W, _cases())


def _one_process(case):
    """The whole layer on each rank's tokens: outputs, input gradients, routings,
    and the parameter gradients summed over the ranks' tokens."""
    case = dict(case)
    T = case.pop("T")
    module = moe_module(**case)
    x, grad_out = moe_tokens(W, T, case["E"], seed=case["seed"])
    outputs, grads_x, routings = [], [], []
    for rank in range(W):
        xr = x[rank].clone().requires_grad_()
        y = module(xr)
        y.backward(grad_out[rank])
        outputs.append(y.detach())
        grads_x.append(xr.grad)
        routings.append(module.last_routing)
    return module, outputs, grads_x, routings


def test_expert_parallel_equals_one_process(expert_run):
    cases, per_rank = expert_run
    for index, case in enumerate(cases):
        if case["N"] % W:
            continue
        module, outputs, grads_x, _ = _one_process(case)
        router_sum = 0
        for rank in range(W):
            result = per_rank[rank][index]
            name = f"rank {rank} {case}"
            experts = expert_split(case["N"], rank, W)
            assert result["experts"] == (experts.start, experts.stop)
            mine = slice(experts.start, experts.stop)
            assert_close(result["output"], outputs[rank], name=f"output {name}")
            assert_close(result["grad_x"], grads_x[rank], name=f"grad x {name}")
            grads = result["grads"]
            assert_close(grads["gate_up"], module.gate_up.grad[mine], name=name)
            assert_close(grads["down"], module.down.grad[mine], name=name)
            router_sum = router_sum + torch.as_tensor(grads["router"])
        # replicated parameters: each rank holds its tokens' share; the sum is whole
        assert_close(router_sum, module.router.grad, name=f"router {case}")
        if case["shared"]:
            for key in ("shared_gate_up", "shared_down"):
                total = sum(
                    torch.as_tensor(per_rank[r][index]["grads"][key]) for r in range(W)
                )
                assert_close(total, getattr(module, key).grad, name=f"{key} {case}")


def test_expert_parallel_bytes_follow_the_formula(expert_run):
    """Rows sent elsewhere and rows received from elsewhere (E numbers each), forward
    and backward; the counts once."""
    cases, per_rank = expert_run
    for index, case in enumerate(cases):
        if case["N"] % W:
            continue
        _, _, _, routings = _one_process(case)
        per = case["N"] // W
        homes = [(r.indices // per)[r.kept] for r in routings]  # each kept row's rank
        for rank in range(W):
            sent = int((homes[rank] != rank).sum())
            got = sum(int((homes[g] == rank).sum()) for g in range(W) if g != rank)
            row_bytes = case["E"] * 8
            result = per_rank[rank][index]
            assert result["forward"]["bytes"] == {
                "all_to_all": (sent + got) * row_bytes,
                "all_to_all_counts": (W - 1) * per * 8,
            }, case
            assert result["backward"]["bytes"] == {
                "all_to_all": (sent + got) * row_bytes
            }, case


def test_expert_parallel_respects_capacity(expert_run):
    cases, per_rank = expert_run
    for index, case in enumerate(cases):
        if case["N"] % W or case["capacity_factor"] is None:
            continue
        C = expert_capacity(
            case["T"], case["N"], case["top_k"], case["capacity_factor"]
        )
        _, _, _, routings = _one_process(case)
        dropped = sum(int((~r.kept).sum()) for r in routings)
        if case["capacity_factor"] < 1:
            assert dropped > 0, "the case must drop assignments"
        for rank in range(W):
            received = per_rank[rank][index]["received"]  # (sources, my experts)
            assert received.max() <= C
            per = case["N"] // W
            for source in range(W):
                r = routings[source]
                for e in range(per):
                    expert = rank * per + e
                    assert received[source, e] == int(
                        (r.indices[r.kept] == expert).sum()
                    )


def test_experts_that_do_not_split_are_refused(expert_run):
    cases, per_rank = expert_run
    for index, case in enumerate(cases):
        if case["N"] % W == 0:
            continue
        for rank in range(W):
            message = per_rank[rank][index]["error"]
            assert f"num_experts={case['N']}" in message
            assert f"world_size={W}" in message
    with pytest.raises(ValueError, match="num_experts=6 does not split"):
        expert_split(6, 0, 4)
