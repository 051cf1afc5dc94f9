r"""Fully sharded data parallelism (PyTorch's ``fully_shard``, FSDP2), its traffic
counted.

Each of ``W`` ranks keeps ``1/W`` of every parameter (dim 0 split in ``W`` equal
pieces, padded to a multiple of ``W``). A module wrapped by ``fully_shard`` gathers
its parameters before its forward pass (all-gather), and, when it freed them after the
forward pass (``reshard_after_forward``: the default for every module but the root),
gathers them again before its backward pass; after the backward pass it sums the
gradients over the ranks and keeps its own piece (reduce-scatter). Per step and rank,
with ``G`` the padded bytes of a unit's parameters:

* all-gather: ``2 G`` for each unit resharded after the forward pass, ``G`` for the
  root, which keeps its parameters until the backward pass;
* reduce-scatter: ``G`` for every unit.

These are the bytes of the gathered (all-gather output) and of the reduced
(reduce-scatter input) buffers; a ring algorithm sends ``(W - 1) / W`` of each per
rank. DDP, for comparison, hands the unique parameter bytes to one all-reduce per
bucket, and a ring all-reduce is a reduce-scatter followed by an all-gather: FSDP2
moves the same reduce-scatter plus one or two all-gathers, in exchange for keeping
``1/W`` of the parameters, gradients and optimizer state.

:func:`shard_counted` applies ``fully_shard`` to each block and to the model, and
installs :class:`CountingAllGather` and :class:`CountingReduceScatter` (FSDP2's own
collectives, ``dist.all_gather_single`` and ``dist.reduce_scatter_single``, with the
bytes added to the active :func:`~companion.torch.distributed.comm.counting` block as
``"fsdp_all_gather"`` and ``"fsdp_reduce_scatter"``); :func:`fsdp2_bytes` is the
formula. Both run on CPU with gloo (torch 2.13: gloo has ``reduce_scatter``; the older
``FullyShardedDataParallel`` refuses CPU). The custom-collective classes are FSDP2's
interface of ``set_custom_all_gather`` (in ``torch.distributed.fsdp._fully_shard``,
not re-exported by ``torch.distributed.fsdp``).

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from companion.torch.distributed.comm import _record, nbytes

__all__ = [
    "CountingAllGather",
    "CountingReduceScatter",
    "shard_counted",
    "padded_bytes",
    "fsdp2_bytes",
]


class _Alloc:
    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)


class CountingAllGather(_Alloc, AllGather):
    """FSDP2's all-gather, the gathered (output) bytes counted."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        _record("fsdp_all_gather", nbytes(output_tensor))
        return dist.all_gather_single(
            output_tensor, input_tensor, group=group, async_op=async_op
        )


class CountingReduceScatter(_Alloc, ReduceScatter):
    """FSDP2's reduce-scatter, the reduced (input) bytes counted."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        _record("fsdp_reduce_scatter", nbytes(input_tensor))
        return dist.reduce_scatter_single(
            output=output_tensor,
            input=input_tensor,
            group=group,
            op=op,
            async_op=async_op,
        )


def _units(model: torch.nn.Module):
    """``model.blocks`` (each its own unit), then the model (the root: the rest)."""
    return [*model.blocks, model]


def shard_counted(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each of ``model.blocks`` and then ``model``, counted."""
    if not hasattr(model, "blocks"):
        raise TypeError(
            f"shard_counted needs a model with .blocks, got {type(model).__name__}"
        )
    for unit in _units(model):
        fully_shard(unit)
        unit.set_custom_all_gather(CountingAllGather())
        unit.set_custom_reduce_scatter(CountingReduceScatter())
    return model


def padded_bytes(parameters, world_size: int) -> int:
    """Bytes of ``parameters`` (each shared tensor once), dim 0 of each padded to a
    multiple of ``world_size``, as FSDP2 shards them."""
    unique = {id(p): p for p in parameters}.values()
    return sum(
        math.ceil(p.shape[0] / world_size)
        * world_size
        * (p.numel() // p.shape[0])
        * p.element_size()
        for p in unique
    )


def fsdp2_bytes(model: torch.nn.Module, world_size: int) -> dict:
    """The formula: ``{"fsdp_all_gather": ..., "fsdp_reduce_scatter": ...}`` per rank
    and step for :func:`shard_counted`'s units (call it on the unsharded model)."""
    blocks = [padded_bytes(b.parameters(), world_size) for b in model.blocks]
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    root = padded_bytes(
        [p for p in model.parameters() if id(p) not in in_blocks], world_size
    )
    return {
        "fsdp_all_gather": 2 * sum(blocks) + root,
        "fsdp_reduce_scatter": sum(blocks) + root,
    }
