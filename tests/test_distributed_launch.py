"""launch: processes in one gloo group, values in rank order, errors with their rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from companion.torch.distributed import WorkerError, launch
from companion.torch.distributed.examples import uneven_ring_attention

ROOT = Path(__file__).resolve().parent.parent


def test_launch_returns_each_ranks_value_in_order():
    assert launch(dist.get_rank, 2) == [0, 1]


def test_worker_exception_is_raised_in_the_parent_with_its_rank():
    """Also: ring_attention refuses shards of different lengths (an uneven split)."""
    pattern = r"^rank [01]: ring_attention needs the same shard length.*\[4, 5\]"
    with pytest.raises(ValueError, match=pattern) as info:
        launch(uneven_ring_attention, 2)
    assert info.value.rank in (0, 1)
    assert "traceback in rank" in str(info.value)
    assert "ring_attention" in str(info.value)  # the worker's traceback comes along


def test_launch_checks_its_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(dist.get_rank, 0)
    with pytest.raises(TypeError, match="world_size"):
        launch(dist.get_rank, 2.0)
    with pytest.raises(ValueError, match="backend"):
        launch(dist.get_rank, 2, backend="mpi")
    assert issubclass(WorkerError, RuntimeError)


def test_the_same_code_runs_under_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "companion.torch.distributed",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "W=2 zigzag     causal=True" in result.stdout
    worst = float(result.stdout.split("worst difference from one process")[1])
    assert worst <= 1e-10
