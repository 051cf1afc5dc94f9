r"""Two axes at once: tensor parallel x data parallel on a 2-D ``DeviceMesh``.

``W = dp x tp`` ranks form a grid (``torch.distributed.device_mesh.init_device_mesh``,
dimension names ``("dp", "tp")``): rank ``r`` sits in row ``r // tp`` and column
``r % tp``. Each row is a tensor-parallel group (its ranks split the heads of one
:class:`~companion.torch.multihead.MultiHeadAttention`, Megatron's one all-reduce
forward and one backward, over the row); each column is a data-parallel group (its
ranks hold the same heads and different rows of the batch, and sum their weight
gradients over the column). For the loss ``sum(y * g)`` over the whole batch (``g``
an output gradient), the summed gradients are one process's.

Per rank and step, with ``B`` the whole batch, ``L`` the length and ``E`` the width,
float64:

* tensor parallel (row): ``2 (B / dp) L E 8`` bytes handed to all-reduce (forward and
  backward), as on one row alone;
* data parallel (column): the bytes of this rank's parameters, about ``1 / tp`` of the
  module's (the output bias is replicated), handed to all-reduce.

Key/value heads replicated over a row (``H_kv < tp``) would need groups created by
every rank of the mesh; :func:`run_tensor_data_mesh` refuses them (and a batch that
does not split over the columns) with an ``error`` entry in place of the case's.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch.distributed as dist

from companion.torch.distributed.comm import all_reduce, counting, nbytes
from companion.torch.distributed.tensor_parallel import TensorParallelMultiHeadAttention

__all__ = ["tensor_data_mesh", "run_tensor_data_mesh", "mesh_bytes"]


def tensor_data_mesh(dp: int, tp: int):
    """A ``(dp, tp)`` CPU ``DeviceMesh`` named ``("dp", "tp")`` over the current
    group (``dp * tp`` must be its size)."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size = dist.get_world_size()
    if dp < 1 or tp < 1 or dp * tp != world_size:
        raise ValueError(
            f"dp x tp must equal the world size {world_size}, got dp={dp}, tp={tp}"
        )
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def mesh_bytes(E: int, H: int, H_kv: int, B: int, L: int, dp: int, tp: int) -> dict:
    """The formula: bytes handed to all-reduce per rank, ``{"tp": ..., "dp": ...}``."""
    D = E // H
    parameters = (
        (E * E + E) // tp  # q_proj rows of this rank's heads, bias
        + 2 * (H_kv * D * E + H_kv * D) // tp  # k_proj, v_proj
        + E * E // tp  # out_proj columns
        + E  # out bias, replicated
    )
    return {"tp": 2 * (B // dp) * L * E * 8, "dp": parameters * 8}


def run_tensor_data_mesh(cases, dp: int = 2, tp: int = 2):
    """Tensor-parallel attention on each row, its batch split over the columns.

    A case: ``E, H, H_kv, B, L, causal, seed`` (the inputs of
    :func:`~companion.torch.distributed.examples.tensor_parallel_inputs`). Returns
    per case: this rank's ``rows`` of the batch, ``output`` and ``grad_input`` on them,
    its ``heads``, the gradients of its parameters summed over its column, and the
    bytes it handed to all-reduce over its row (``"tp"``) and column (``"dp"``); or
    ``error``, the reason a case was refused.
    """
    from companion.torch.distributed.examples import (
        _numpy,
        attention_module,
        tensor_parallel_inputs,
    )

    mesh = tensor_data_mesh(dp, tp)
    row, column = mesh.get_group("tp"), mesh.get_group("dp")
    row_rank, column_rank = dist.get_rank(row), dist.get_rank(column)
    results = []
    for case in cases:
        if case["H_kv"] < tp or case["B"] % dp:
            results.append(
                {
                    "error": f"run_tensor_data_mesh needs H_kv >= tp={tp} and B "
                    f"divisible by dp={dp}, got H_kv={case['H_kv']}, B={case['B']}"
                }
            )
            continue
        module = attention_module(case["E"], case["H"], case["H_kv"], seed=case["seed"])
        parallel = TensorParallelMultiHeadAttention(module, group=row)
        x, grad_out = tensor_parallel_inputs(
            case["E"], case["B"], case["L"], seed=case["seed"]
        )
        share = case["B"] // dp
        rows = slice(column_rank * share, (column_rank + 1) * share)
        x = x[rows].clone().requires_grad_()
        with counting() as tensor_count:
            y = parallel(x, causal=case["causal"])  # (B/dp, L, E)
            y.backward(grad_out[rows])
        with counting() as data_count:
            for p in parallel.parameters():  # sum over the column's batch rows
                all_reduce(p.grad, group=column)
        results.append(
            {
                "rows": (rows.start, rows.stop),
                "row_rank": row_rank,
                "output": _numpy(y),
                "grad_input": _numpy(x.grad),
                "heads": (parallel.heads.start, parallel.heads.stop),
                "kv_heads": (parallel.kv_heads.start, parallel.kv_heads.stop),
                "grads": {n: _numpy(p.grad) for n, p in parallel.named_parameters()},
                "bytes": {
                    "tp": tensor_count.bytes["all_reduce"],
                    "dp": data_count.bytes["all_reduce"],
                },
                "parameter_bytes": sum(nbytes(p) for p in parallel.parameters()),
            }
        )
    return results
