"""Two axes at once: tensor parallel x data parallel on a 2 x 2 ``DeviceMesh`` of four
gloo processes equals one process (outputs, input and weight gradients, float64);
the bytes each rank hands to all-reduce over its row and its column follow the
formula."""

import pytest
from _distributed_helpers import head_gradients, one_process_attention

from companion.testing import assert_close
from companion.torch.distributed import head_split, launch
from companion.torch.distributed.mesh import (
    mesh_bytes,
    run_tensor_data_mesh,
    tensor_data_mesh,
)

DP, TP = 2, 2
CASES = [
    dict(E=16, H=4, H_kv=2, B=4, L=5, causal=True, seed=0),
    dict(E=12, H=2, H_kv=2, B=2, L=3, causal=False, seed=1),
]
REFUSED = [
    dict(E=16, H=4, H_kv=1, B=4, L=5, causal=True, seed=2),  # kv heads replicated
    dict(E=16, H=4, H_kv=2, B=3, L=5, causal=True, seed=2),  # batch does not split
]


@pytest.fixture(scope="module")
def mesh_run():
    return launch(run_tensor_data_mesh, DP * TP, CASES + REFUSED)


def test_tensor_x_data_mesh_equals_one_process(mesh_run):
    for index, case in enumerate(CASES):
        module, y, grad_x = one_process_attention(case)
        for rank in range(DP * TP):
            result = mesh_run[rank][index]
            name = f"rank {rank} {case}"
            rows = slice(*result["rows"])
            assert result["row_rank"] == rank % TP
            assert_close(result["output"], y[rows], name=f"output {name}")
            assert_close(result["grad_input"], grad_x[rows], name=f"grad x {name}")
            heads, kv_heads = head_split(case["H"], case["H_kv"], rank % TP, TP)
            assert result["heads"] == (heads.start, heads.stop)
            expected = head_gradients(module, heads, kv_heads)
            assert sorted(result["grads"]) == sorted(expected)
            for key, grad in expected.items():
                assert_close(result["grads"][key], grad, name=f"{key} {name}")


def test_mesh_rows_and_columns(mesh_run):
    """Ranks 0, 1 hold the first half of the batch, ranks 2, 3 the second; within a
    row the heads differ, within a column the rows of the batch."""
    for index, case in enumerate(CASES):
        share = case["B"] // DP
        for rank in range(DP * TP):
            start = rank // TP * share
            assert mesh_run[rank][index]["rows"] == (start, start + share)


def test_mesh_bytes_follow_the_formula(mesh_run):
    for index, case in enumerate(CASES):
        formula = mesh_bytes(
            **{k: case[k] for k in ("E", "H", "H_kv", "B", "L")}, dp=DP, tp=TP
        )
        for rank in range(DP * TP):
            result = mesh_run[rank][index]
            assert result["bytes"] == formula
            assert result["bytes"]["dp"] == result["parameter_bytes"]


def test_mesh_refuses_replicated_kv_heads_and_uneven_batches(mesh_run):
    for rank in range(DP * TP):
        first, second = mesh_run[rank][len(CASES) :]
        assert "needs H_kv >= tp=2" in first["error"] and "H_kv=1" in first["error"]
        assert "B divisible by dp=2" in second["error"] and "B=3" in second["error"]


def test_mesh_shape_must_match_the_world(one_process_group):
    with pytest.raises(ValueError, match="dp x tp must equal the world size 1"):
        tensor_data_mesh(2, 2)
