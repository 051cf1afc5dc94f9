"""Helpers shared by the distributed tests: the one-process run that a tensor-parallel
launch is compared with, and the slice of its weight gradients that one rank holds."""

import functools
import os
import pickle

try:
    import fcntl
except ImportError:  # not on Windows: each xdist worker then runs its own launch
    fcntl = None

from companion.torch.distributed.examples import (
    attention_module,
    tensor_parallel_inputs,
)


def one_process_attention(case):
    """The full attention module of ``case`` run forward and backward in one process:
    ``(module, output, input gradient)``; the module's parameters hold their
    gradients."""
    module = attention_module(case["E"], case["H"], case["H_kv"], seed=case["seed"])
    x, grad_out = tensor_parallel_inputs(
        case["E"], case["B"], case["L"], seed=case["seed"]
    )
    x.requires_grad_()
    y = module(x, causal=case["causal"])
    y.backward(grad_out)
    return module, y.detach(), x.grad


def head_gradients(module, heads, kv_heads):
    """The gradients of ``module`` that a rank holding query heads ``heads`` and
    key/value heads ``kv_heads`` (slices of head indices) must hold, by name."""
    D = module.head_dim
    q = slice(heads.start * D, heads.stop * D)
    kv = slice(kv_heads.start * D, kv_heads.stop * D)
    return {
        "q_proj.weight": module.q_proj.weight.grad[q],
        "q_proj.bias": module.q_proj.bias.grad[q],
        "k_proj.weight": module.k_proj.weight.grad[kv],
        "k_proj.bias": module.k_proj.bias.grad[kv],
        "v_proj.weight": module.v_proj.weight.grad[kv],
        "v_proj.bias": module.v_proj.bias.grad[kv],
        "out_proj.weight": module.out_proj.weight.grad[:, q],
        "out_bias": module.out_proj.bias.grad,
    }


def shared_launch(world_size, tmp_path_factory=None):
    """:func:`_shared_launch` of ``world_size``, once per test session: under
    pytest-xdist (``make test`` spreads files over workers) the first worker that
    needs it runs it and leaves the pickled result in the session's shared temporary
    folder (``tmp_path_factory``), under a lock, for the others."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if tmp_path_factory is None or worker is None or fcntl is None:
        return _shared_launch(world_size)
    root = tmp_path_factory.getbasetemp().parent  # shared by the xdist workers
    stored = root / f"shared_launch_world{world_size}.pkl"
    with open(root / f"shared_launch_world{world_size}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stored.exists():
            return pickle.loads(stored.read_bytes())
        result = _shared_launch(world_size)
        stored.write_bytes(pickle.dumps(result))
        return result


@functools.cache
def _shared_launch(world_size):
    """One launch per world size (3 or 4) that several test modules read: starting
    processes that import torch costs seconds, so the ring attention cases of
    ``test_distributed_ring``, and on 3 processes the tensor and data parallel run of
    ``test_distributed_parallel`` and the 3-stage pipeline of ``test_audit_27``, on 4
    the Ulysses cases (with the refusals) and the 4-stage pipeline, run together.
    A dict by part; each part is the list of per-rank results of its worker."""
    import test_audit_27
    import test_distributed_parallel
    import test_distributed_ring
    import test_distributed_ulysses

    from companion.torch.distributed import launch
    from companion.torch.distributed.examples import run_parallel, run_ring_attention
    from companion.torch.distributed.examples_axes import (
        run_pipeline,
        run_together,
        run_ulysses,
    )

    parts = {"ring": (run_ring_attention, (test_distributed_ring._cases(world_size),))}
    if world_size == 3:
        cases = test_distributed_parallel._cases(3)
        parts["parallel"] = (run_parallel, (cases,))
    else:
        cases = test_distributed_ulysses._cases(4)
        parts["ulysses"] = (run_ulysses, (cases, True))
    parts["pipeline"] = (run_pipeline, (test_audit_27.CASES[world_size],))
    per_rank = launch(run_together, world_size, *parts.values())
    return {name: [results[i] for results in per_rank] for i, name in enumerate(parts)}
