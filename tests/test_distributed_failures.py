"""launch and the collectives fail clearly, before spawning where they can, and leave
no process behind (issue 23: processes and unclear errors)."""

import importlib
import math
import multiprocessing

import pytest
import torch.distributed as dist

from companion.torch.distributed import WorkerError, head_split, launch
from companion.torch.distributed.examples import (
    exit_during_collective,
    fail_then_peer_exits,
    mismatched_shapes,
)

# the module (the package's attribute ``launch`` is the function)
launch_module = importlib.import_module("companion.torch.distributed.launch")


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if launch starts a process."""

    def refuse(*args, **kwargs):
        raise AssertionError("launch spawned processes before checking its arguments")

    monkeypatch.setattr(launch_module.multiprocessing, "get_context", refuse)


@pytest.fixture
def no_leftovers():
    """After the test, no child process of this one is alive."""
    before = set(multiprocessing.active_children())
    yield
    left = [p for p in multiprocessing.active_children() if p not in before]
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize(
    "timeout, error, match",
    [
        (float("nan"), ValueError, "timeout must be a positive number.*nan"),
        (-1.0, ValueError, "timeout must be a positive number.*-1"),
        (0, ValueError, "timeout must be a positive number"),
        ("x", TypeError, "timeout must be a number of seconds.*'x'"),
        (True, TypeError, "timeout must be a number"),
        (None, TypeError, "timeout must be a number"),
    ],
)
def test_timeout_is_checked_before_spawning(no_spawn, timeout, error, match):
    with pytest.raises(error, match=match):
        launch(dist.get_rank, 2, timeout=timeout)


def test_a_lambda_is_refused_before_spawning(no_spawn):
    def nested():
        return 1

    for fn in (lambda: 1, nested):
        with pytest.raises(TypeError, match="fn must be importable at module level"):
            launch(fn, 2)
    with pytest.raises(TypeError, match="args must pickle"):
        launch(dist.get_rank, 2, lambda: 1)


def test_the_first_failing_worker_is_reported(no_leftovers):
    # rank 1 exits while rank 0 waits in an all-reduce; rank 0's connection error
    # follows from it and used to be what the parent raised
    with pytest.raises(WorkerError, match=r"^rank 1: exited with code 3") as info:
        launch(exit_during_collective, 2, 3, timeout=60)
    assert info.value.rank == 1


def test_an_error_of_its_own_is_not_blamed_on_a_later_exit(no_leftovers):
    # only a collective's RuntimeError waits for a peer's exit to show
    with pytest.raises(ValueError, match="^rank 0: rank 0 fails first"):
        launch(fail_then_peer_exits, 2, 4, timeout=60)


def test_ranks_that_disagree_on_shapes_get_a_clear_error(no_leftovers):
    # before: gloo aborted the workers ("exit code -6"), the reason only on stderr.
    # Also: timeout=math.inf means no timeout.
    messages = launch(mismatched_shapes, 2, timeout=math.inf)
    gather = (
        "gather_sequence: the ranks disagree on the shape of x_shard "
        "(rank 0: (2, 3), rank 1: (2, 4))"
    )
    ring = (
        "ring_attention: the ranks disagree on the shape of query "
        "(rank 0: (1, 1, 4, 2), rank 1: (1, 2, 4, 2))"
    )
    for rank_messages in messages:  # every rank raised, with the same message
        assert len(rank_messages) == 2
        assert rank_messages[0].startswith(gather)
        assert rank_messages[1].startswith(ring)


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 4, 0, 0), "world_size must be a positive int"),
        ((0, 0, 0, 2), "num_heads must be a positive int"),
        ((4, 0, 0, 2), "num_kv_heads must be a positive int"),
        ((4, 8, 0, 2), "num_kv_heads=8 must divide num_heads=4"),
        ((4, 4, 2, 2), r"rank must be < world_size=2, got 2"),
        ((4, 4, -1, 2), "rank must be a non-negative int"),
    ],
)
def test_head_split_checks_its_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        head_split(*args)


def test_head_split_still_splits():
    assert head_split(8, 2, 3, 4) == (range(6, 8), range(1, 2))
    assert head_split(4, 1, 1, 2) == (range(2, 4), range(0, 1))


@pytest.fixture
def one_rank_group():
    """A gloo group of one rank in this process (no spawn), destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_attention_checks_its_inputs(one_rank_group):
    import torch

    from companion.testing import assert_close
    from companion.torch.distributed import TensorParallelMultiHeadAttention
    from companion.torch.distributed.examples import attention_module

    module = attention_module(8, 2, 2)
    parallel = TensorParallelMultiHeadAttention(module)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"query must have shape \(B, length, E=8\)"):
        parallel(torch.randn(2, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"key must have shape .* query's B"):
        parallel(x, torch.randn(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="key and value must have one length"):
        parallel(x, x, torch.randn(2, 4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        parallel(x.numpy())
    with torch.no_grad():  # one rank holds every head: the module itself
        assert_close(parallel(x, causal=True), module(x, causal=True), name="output")
