r"""Data parallelism with tied weights, on PyTorch's ``DistributedDataParallel``.

Each of ``W`` ranks holds the whole model and ``1/W`` of the batch; after the backward
pass ``DistributedDataParallel`` all-reduces (averages) the gradients, so every rank
steps with the gradient of the mean loss over the whole batch. A tied tensor (the
token embedding that is also the output layer, ``TinyTransformerLM(tied=True)``) is
one ``nn.Parameter`` used twice: autograd accumulates both uses into its one
``.grad`` before DDP reduces it, and DDP's buckets hold each parameter once, so it is
reduced once: ``V E`` elements fewer than an untied model, per step.

:func:`counting_allreduce_hook` is DDP's default all-reduce hook, counted: registered
with ``ddp.register_comm_hook(None, counting_allreduce_hook)``, it adds each bucket's
bytes to the active :func:`~companion.torch.distributed.comm.counting` block as
``"ddp_all_reduce"`` and the bucket's parameters to ``REDUCED_PARAMETERS``.

FSDP: the sharded ``fully_shard`` (FSDP2) runs on CPU with gloo, its traffic counted
in :mod:`companion.torch.distributed.fsdp`; ``FullyShardedDataParallel`` (FSDP1)
refuses: "FSDP needs a non-CPU accelerator device" (torch 2.13).

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from companion.torch.distributed.comm import _record, nbytes

__all__ = ["counting_allreduce_hook", "REDUCED_PARAMETERS", "unique_parameter_bytes"]

# ids of the parameters in every bucket reduced by counting_allreduce_hook, in order
REDUCED_PARAMETERS: list[int] = []


def counting_allreduce_hook(state, bucket):
    """DDP's ``allreduce_hook`` (the mean over ranks), bytes and parameters counted."""
    _record("ddp_all_reduce", nbytes(bucket.buffer()))
    REDUCED_PARAMETERS.extend(id(p) for p in bucket.parameters())
    return default_hooks.allreduce_hook(state, bucket)


def unique_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters, each shared tensor once."""
    unique = {id(p): p for p in model.parameters()}
    return sum(nbytes(p) for p in unique.values())
