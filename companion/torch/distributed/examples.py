"""Functions run in the processes of :func:`~companion.torch.distributed.launch.launch`.

For the tests and the chapter.

Each builds its inputs from a seed (the same full tensors on every rank), runs the
distributed computation on this rank's part and returns what the caller checks:
gathered outputs and gradients as numpy arrays (from rank 0; ``None`` elsewhere) and
this rank's counts. They compute and report; the comparisons with the single-process
oracle are made by the caller, in the parent process.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from companion.torch.distributed.comm import counting, nbytes
from companion.torch.distributed.data_parallel import (
    REDUCED_PARAMETERS,
    counting_allreduce_hook,
    unique_parameter_bytes,
)
from companion.torch.distributed.ring import (
    gather_sequence,
    ring_attention,
    shard_sequence,
)
from companion.torch.distributed.tensor_parallel import (
    TensorParallelMultiHeadAttention,
)
from companion.torch.models import TinyTransformerLM
from companion.torch.multihead import MultiHeadAttention

__all__ = [
    "attention_inputs",
    "run_ring_attention",
    "uneven_ring_attention",
    "mismatched_shapes",
    "exit_during_collective",
    "fail_then_peer_exits",
    "attention_module",
    "tensor_parallel_inputs",
    "run_tensor_parallel",
    "language_model",
    "language_batch",
    "language_loss",
    "run_data_parallel",
    "run_parallel",
]


def attention_inputs(B, H, H_kv, length, D, D_v, *, seed=0, dtype=torch.float64):
    """Full ``query, key, value`` and an output gradient, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, D, generator=g, dtype=dtype)  # (B, H, N, D)
    k = torch.randn(B, H_kv, length, D, generator=g, dtype=dtype)  # (B, H_kv, N, D)
    v = torch.randn(B, H_kv, length, D_v, generator=g, dtype=dtype)
    grad_out = torch.randn(B, H, length, D_v, generator=g, dtype=dtype)
    return q, k, v, grad_out


def _numpy(x):
    return x.detach().cpu().numpy()


def run_ring_attention(cases, repeats: int = 0, ranks=None):
    """Ring attention forward and backward for each case of ``cases``.

    A case is a dict with ``B, H, H_kv, length, D, D_v, causal, layout`` (and
    ``seed``, ``dtype``, ``scale``). Returns one dict per case: ``output``,
    ``grad_query``, ``grad_key``, ``grad_value`` (gathered, on the group's first rank
    only), ``forward`` and ``backward`` (this rank's counts) and, with ``repeats > 0``,
    ``compute_seconds``: this rank's CPU time in the blocks, the least of ``repeats``
    more forward passes. With ``ranks`` (global ranks), the ring runs in a group of
    those ranks (``dist.new_group``); the others return ``None``.
    """
    group = None if ranks is None else dist.new_group(list(ranks))
    if ranks is not None and dist.get_rank() not in ranks:
        return None
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    results = []
    for case in cases:
        case = dict(case)
        causal, layout = case.pop("causal"), case.pop("layout")
        options = dict(causal=causal, layout=layout, scale=case.pop("scale", None))
        q, k, v, grad_out = attention_inputs(**case)
        shards = [shard_sequence(t, rank, world_size, layout=layout) for t in (q, k, v)]
        q_s, k_s, v_s = (t.requires_grad_() for t in shards)
        with counting() as forward:
            out = ring_attention(q_s, k_s, v_s, group=group, **options)
        with counting() as backward:
            out.backward(shard_sequence(grad_out, rank, world_size, layout=layout))
        result = {"forward": forward.as_dict(), "backward": backward.as_dict()}
        gathered = [
            gather_sequence(t.detach(), layout=layout, group=group)
            for t in (out, q_s.grad, k_s.grad, v_s.grad)
        ]
        if rank == 0:
            names = ("output", "grad_query", "grad_key", "grad_value")
            result.update(zip(names, map(_numpy, gathered)))
        if repeats:
            best = float("inf")
            with torch.no_grad():
                for _ in range(repeats):
                    dist.barrier(group=group)
                    with counting() as count:
                        ring_attention(q_s, k_s, v_s, group=group, **options)
                    best = min(best, count.compute_seconds)
            result["compute_seconds"] = best
        results.append(result)
    return results


def uneven_ring_attention():
    """Shards of different lengths on different ranks: ``ring_attention`` refuses."""
    rank = dist.get_rank()
    x = torch.zeros(1, 1, 4 + rank, 2, dtype=torch.float64)  # (B, H, L_r, D)
    return ring_attention(x, x, x)


def mismatched_shapes():
    """Ranks that disagree on shapes: the messages of the ``ValueError`` each raises.

    ``gather_sequence`` with a shard ``(2, 3 + rank)``, then ``ring_attention`` with
    shards of one length but ``1 + rank`` heads. Every rank raises at the same point,
    so the ranks stay in step.
    """
    rank = dist.get_rank()
    messages = []
    try:
        gather_sequence(torch.zeros(2, 3 + rank), dim=-1)
    except ValueError as exc:
        messages.append(str(exc))
    x = torch.zeros(1, 1 + rank, 4, 2, dtype=torch.float64)  # (B, H_r, L, D)
    try:
        ring_attention(x, x, x)
    except ValueError as exc:
        messages.append(str(exc))
    return messages


def exit_during_collective(code: int = 3):
    """Rank 1 exits (``os._exit(code)``) while rank 0 waits in an all-reduce."""
    import os
    import time

    if dist.get_rank() == 1:
        time.sleep(0.5)  # rank 0 is inside the all-reduce by now
        os._exit(code)
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def fail_then_peer_exits(code: int = 4):
    """Rank 0 raises ``ValueError`` at once; rank 1 exits with ``code`` 1 s later."""
    import os
    import time

    if dist.get_rank() == 0:
        raise ValueError("rank 0 fails first")
    time.sleep(1.0)  # within launch's grace for a collective's error, not for this
    os._exit(code)


# --------------------------------------------------------------------------------------
# tensor parallelism
# --------------------------------------------------------------------------------------


def attention_module(E, H, H_kv, *, seed=0):
    """A float64 ``MultiHeadAttention`` with random weights and biases."""
    torch.manual_seed(seed)
    module = MultiHeadAttention(E, H, H_kv, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
    return module


def tensor_parallel_inputs(E, B, L, *, seed=0):
    """Input ``x (B, L, E)`` and an output gradient, float64, from ``seed``."""
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    return x, torch.randn(B, L, E, generator=g, dtype=torch.float64)


def run_tensor_parallel(cases):
    """Tensor-parallel attention forward and backward for each case.

    A case: ``E, H, H_kv, B, L, causal, seed``. Returns per case: ``output`` and
    ``grad_input`` (full, this rank's), this rank's ``heads`` and ``kv_heads``, the
    gradients of its parts (``q_proj.weight`` ...), its ``forward``/``backward``
    counts and, to compare, the collectives PyTorch's ``CommDebugMode`` saw.
    """
    results = []
    # imported here: torch.distributed.tensor roughly doubles a worker's import time,
    # and the ring and data-parallel workers do not need it
    from torch.distributed.tensor.debug import CommDebugMode

    for case in cases:
        module = attention_module(case["E"], case["H"], case["H_kv"], seed=case["seed"])
        parallel = TensorParallelMultiHeadAttention(module)
        x, grad_out = tensor_parallel_inputs(
            case["E"], case["B"], case["L"], seed=case["seed"]
        )
        x.requires_grad_()
        with CommDebugMode() as torch_count:  # PyTorch's own count, to compare
            with counting() as forward:
                y = parallel(x, causal=case["causal"])
            with counting() as backward:
                y.backward(grad_out)
        results.append(
            {
                "output": _numpy(y),
                "grad_input": _numpy(x.grad),
                "heads": (parallel.heads.start, parallel.heads.stop),
                "kv_heads": (parallel.kv_heads.start, parallel.kv_heads.stop),
                "grads": {n: _numpy(p.grad) for n, p in parallel.named_parameters()},
                "forward": forward.as_dict(),
                "backward": backward.as_dict(),
                "comm_debug_mode": {
                    str(op): n for op, n in torch_count.get_comm_counts().items()
                },
            }
        )
    return results


# --------------------------------------------------------------------------------------
# data parallelism with tied weights
# --------------------------------------------------------------------------------------


def language_model(tied, *, seed=0, vocab_size=13, length=8, embed_dim=16):
    """A float64 ``TinyTransformerLM`` (one block, two heads) from ``seed``."""
    torch.manual_seed(seed)
    model = TinyTransformerLM(
        vocab_size, length, embed_dim=embed_dim, num_heads=2, num_layers=1, tied=tied
    )
    return model.double()


def language_batch(batch, *, seed=0, vocab_size=13, length=8):
    """Token ids ``(batch, length)`` and next-token targets, from ``seed``."""
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(0, vocab_size, (batch, length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def language_loss(model, ids, targets):
    """Mean next-token cross-entropy."""
    logits = model(ids)  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )


def run_data_parallel(batch=6, seed=0, fsdp=True):
    """One backward pass of ``DistributedDataParallel`` on this rank's rows of a batch.

    For ``tied`` in (True, False): the gradients (rank 0, by parameter name, each
    shared tensor once), the bytes DDP all-reduced on this rank, the parameters it
    reduced (how often the tied one appears) and the model's unique parameter bytes.
    With ``fsdp``, the same with ``fully_shard`` (FSDP2), or the error it raised, its
    counted bytes (``fsdp2_bytes``) and their formula (``fsdp2_formula``), and
    ``FullyShardedDataParallel`` (FSDP1)'s error.
    """
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = dist.get_rank(), dist.get_world_size()
    if batch % world_size:
        raise ValueError(f"batch={batch} must split evenly over {world_size} ranks")
    rows = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    ids, targets = language_batch(batch, seed=seed)
    results = {}
    for tied in (True, False):
        model = language_model(tied, seed=seed)
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, counting_allreduce_hook)
        REDUCED_PARAMETERS.clear()
        with counting() as count:
            language_loss(ddp, ids[rows], targets[rows]).backward()
        tied_id = id(model.embedding.weight)
        results[tied] = {
            "grads": {n: _numpy(p.grad) for n, p in model.named_parameters()},
            "bytes": count.bytes["ddp_all_reduce"],
            "unique_parameter_bytes": unique_parameter_bytes(model),
            "parameter_bytes_per_use": sum(
                nbytes(p) for _, p in model.named_parameters(remove_duplicate=False)
            ),
            "embedding_reductions": REDUCED_PARAMETERS.count(tied_id),
        }
    results["bucket_events"] = ddp_bucket_events(ids[rows], targets[rows], seed)
    if fsdp:
        fsdp2 = _fsdp2(ids[rows], targets[rows], seed)
        if isinstance(fsdp2, str):
            results["fsdp2"] = fsdp2
        else:
            results["fsdp2"] = fsdp2["grads"]
            results["fsdp2_bytes"] = fsdp2["bytes"]
            results["fsdp2_formula"] = fsdp2["formula"]
        results["fsdp1"] = _fsdp1(seed)
    return results if rank == 0 else {k: results[k]["bytes"] for k in (True, False)}


def ddp_bucket_events(ids, targets, seed=0, bucket_cap_mb=0.004, steps=2):
    """The order of events in DDP backward passes with small (4 KB) buckets.

    Per step, a list: each bucket's all-reduce start (``"bucket <i>"``) and the moment
    the tied embedding's gradient is complete (``"embedding"``: its two uses, the
    output layer and the lookup, meet in the last operation of the backward pass).
    DDP rebuilds its buckets after the first step, in the order the gradients became
    ready.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    model = language_model(True, seed=seed)
    events = []
    model.embedding.weight.register_post_accumulate_grad_hook(
        lambda _: events[-1].append("embedding")
    )
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)

    def hook(state, bucket):
        events[-1].append(f"bucket {bucket.index()}")
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    for _ in range(steps):
        events.append([])
        language_loss(ddp, ids, targets).backward()
    return events


def _fsdp2(ids, targets, seed):
    try:
        from companion.torch.distributed.fsdp import fsdp2_bytes, shard_counted

        model = language_model(True, seed=seed)
        formula = fsdp2_bytes(model, dist.get_world_size())
        shard_counted(model)
        with counting() as count:
            language_loss(model, ids, targets).backward()
        return {
            "grads": {
                n: _numpy(p.grad.full_tensor()) for n, p in model.named_parameters()
            },
            "bytes": dict(count.bytes),
            "formula": formula,
        }
    except Exception as error:  # shown in the chapter as it is
        return f"{type(error).__name__}: {error}"


def _fsdp1(seed):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        FullyShardedDataParallel(language_model(True, seed=seed))
        return "ran"
    except Exception as error:  # shown in the chapter as it is
        return f"{type(error).__name__}: {error}"


def run_parallel(tensor_parallel_cases, data_parallel=True):
    """:func:`run_tensor_parallel` and :func:`run_data_parallel`, one launch."""
    return {
        "tensor_parallel": run_tensor_parallel(tensor_parallel_cases),
        "data_parallel": run_data_parallel() if data_parallel else None,
    }
