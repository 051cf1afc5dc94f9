"""Tensor-parallel attention and data parallelism with tied weights, on gloo processes.

One launch per world size runs every case; the parent compares with one process: the
full :class:`companion.torch.MultiHeadAttention` (outputs, input and weight gradients,
sliced to each rank's heads) and ``TinyTransformerLM`` on the whole batch.
"""

import pytest
from _distributed_helpers import head_gradients, one_process_attention, shared_launch

from companion.params import count_parameters
from companion.testing import assert_close
from companion.torch.distributed import head_split, launch
from companion.torch.distributed.examples import (
    language_batch,
    language_loss,
    language_model,
    run_parallel,
)

# (E, H, H_kv): heads split with their own kv heads; kv heads replicated (H_kv < W)
TP_CASES = {
    2: [(16, 4, 4), (16, 4, 2), (16, 4, 1)],
    3: [(12, 6, 3), (12, 6, 1), (12, 3, 3)],
}


def _cases(world_size):
    return [
        dict(E=E, H=H, H_kv=H_kv, B=2, L=5, causal=causal, seed=i)
        for i, (E, H, H_kv) in enumerate(TP_CASES[world_size])
        for causal in (False, True)
    ]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def parallel_run(request, tmp_path_factory):
    world_size = request.param
    cases = _cases(world_size)
    if world_size == 3:  # shares the launch of the ring and 3-stage pipeline cases
        return world_size, cases, shared_launch(3, tmp_path_factory)["parallel"]
    return world_size, cases, launch(run_parallel, world_size, cases)


def test_tensor_parallel_equals_the_module(parallel_run):
    world_size, cases, per_rank = parallel_run
    for index, case in enumerate(cases):
        module, y, grad_x = one_process_attention(case)
        for rank in range(world_size):
            result = per_rank[rank]["tensor_parallel"][index]
            name = f"W={world_size} rank {rank} {case}"
            assert_close(result["output"], y, name=f"output {name}")
            assert_close(result["grad_input"], grad_x, name=f"grad x {name}")
            heads, kv_heads = head_split(case["H"], case["H_kv"], rank, world_size)
            assert result["heads"] == (heads.start, heads.stop)
            assert result["kv_heads"] == (kv_heads.start, kv_heads.stop)
            expected = head_gradients(module, heads, kv_heads)
            assert sorted(result["grads"]) == sorted(expected)
            for key, grad in expected.items():
                assert_close(result["grads"][key], grad, name=f"{key} {name}")


def test_tensor_parallel_bytes_follow_the_formula(parallel_run):
    """One all-reduce of B L E forward, one backward (+ replicated kv gradients)."""
    world_size, cases, per_rank = parallel_run
    for index, case in enumerate(cases):
        payload = case["B"] * case["L"] * case["E"] * 8
        D = case["E"] // case["H"]
        replicated = world_size > case["H_kv"]
        # k_proj and v_proj of one kv head: weight (D, E) and bias (D,) each
        kv_grads = 2 * (D * case["E"] + D) * 8 if replicated else 0
        for rank in range(world_size):
            result = per_rank[rank]["tensor_parallel"][index]
            assert result["forward"]["bytes"] == {"all_reduce": payload}
            assert result["forward"]["calls"] == {"all_reduce": 1}
            assert result["backward"]["bytes"] == {"all_reduce": payload + kv_grads}
            # PyTorch's CommDebugMode sees the same all-reduce calls
            calls = result["forward"]["calls"]["all_reduce"]
            calls += result["backward"]["calls"]["all_reduce"]
            assert calls == 2 + (4 if replicated else 0)
            assert result["comm_debug_mode"] == {"c10d.allreduce_": calls}


def test_head_split_errors():
    with pytest.raises(ValueError, match="divide num_heads"):
        head_split(4, 2, 0, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        head_split(12, 4, 0, 6)  # 6 neither divides 4 nor is a multiple of it


def test_data_parallel_tied_gradients_equal_one_process(parallel_run):
    world_size, _, per_rank = parallel_run
    results = per_rank[0]["data_parallel"]
    ids, targets = language_batch(6)
    for tied in (True, False):
        model = language_model(tied)
        language_loss(model, ids, targets).backward()
        grads = results[tied]["grads"]
        assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
        for name, p in model.named_parameters():
            assert_close(grads[name], p.grad, name=f"W={world_size} tied={tied} {name}")
    fsdp2 = results["fsdp2"]
    assert isinstance(fsdp2, dict), fsdp2
    model = language_model(True)
    language_loss(model, ids, targets).backward()
    for name, p in model.named_parameters():
        assert_close(fsdp2[name], p.grad, name=f"FSDP2 W={world_size} {name}")
    assert "FSDP needs a non-CPU accelerator" in results["fsdp1"]


def test_data_parallel_reduces_the_tied_tensor_once(parallel_run):
    world_size, _, per_rank = parallel_run
    results = per_rank[0]["data_parallel"]
    tied, untied = results[True], results[False]
    V, E = 13, 16
    assert tied["embedding_reductions"] == 1
    assert tied["bytes"] == tied["unique_parameter_bytes"]
    assert tied["bytes"] == count_parameters(language_model(True)) * 8
    assert tied["parameter_bytes_per_use"] - tied["bytes"] == V * E * 8
    assert untied["bytes"] - tied["bytes"] == V * E * 8
    for rank in range(1, world_size):
        assert per_rank[rank]["data_parallel"] == {
            True: tied["bytes"],
            False: untied["bytes"],
        }


def test_fsdp2_bytes_follow_the_formula(parallel_run):
    """FSDP2 gathers each unit's parameters (twice for the block, which frees them
    after the forward pass; once for the root) and reduce-scatters every gradient
    once; dim 0 of each parameter is padded to a multiple of W."""
    world_size, _, per_rank = parallel_run
    results = per_rank[0]["data_parallel"]
    counted, formula = results["fsdp2_bytes"], results["fsdp2_formula"]
    assert counted == formula
    model = language_model(True)
    block = sum(p.numel() for p in model.blocks.parameters()) * 8
    unique = count_parameters(model) * 8  # what DDP all-reduces
    if world_size == 2:  # only the (13, 16) embedding has an odd dim 0: one row
        E = 16
        assert counted["fsdp_reduce_scatter"] == unique + E * 8
        assert counted["fsdp_all_gather"] == unique + E * 8 + block
    assert counted["fsdp_reduce_scatter"] >= results[True]["bytes"]


def test_ddp_reduces_buckets_during_the_backward_pass(parallel_run):
    """With 4 KB buckets, from the second step (buckets rebuilt in the order the
    gradients become ready) several buckets start their all-reduce before the tied
    embedding's gradient, the backward pass's last, is complete."""
    world_size, _, per_rank = parallel_run
    first, second = per_rank[0]["data_parallel"]["bucket_events"]
    assert first.count("embedding") == second.count("embedding") == 1
    buckets = [e for e in second if e.startswith("bucket")]
    assert len(buckets) > 2
    before = second.index("embedding")
    assert before >= 2 and all(e.startswith("bucket") for e in second[:before])
    assert second[-1] == buckets[-1]  # the embedding's bucket goes last
