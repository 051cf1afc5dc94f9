"""Audit of issue 27: what the distributed tests did not yet check.

- The pipeline on more than two stages ("a GPT split into 2-4 stages"): on three
  and on four gloo processes the middle stages hold blocks only, the tied embedding
  lives on the first and the last, and GPipe and 1F1B give the loss and every
  gradient of one process (float64, the default tolerance 1e-10); the tied
  all-reduce moves ``V E`` numbers between the first and the last rank and nothing
  on the middle ones. Both run inside the ring tests' launches of the same size
  (``shared_launch`` in ``_distributed_helpers``).
- A worker that raises while its peer waits in a collective: the parent raises the
  worker's own exception type with its rank and its traceback, and no process is
  left behind (checked in ``/proc``, not only in ``multiprocessing``'s list).
- The stage split refused by the stage module itself, not only by ``stage_layers``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from companion.testing import assert_close
from companion.torch.distributed import launch
from companion.torch.distributed.examples import language_batch
from companion.torch.distributed.examples_axes import pipeline_model
from companion.torch.distributed.pipeline import PipelineStageModule

CASES = {
    3: [
        dict(schedule="gpipe", microbatches=3, layers=3, batch=3, seed=0),
        dict(schedule="1f1b", microbatches=3, layers=6, batch=6, seed=1),
    ],
    4: [
        dict(schedule="gpipe", microbatches=4, layers=4, batch=4, seed=2),
        dict(schedule="1f1b", microbatches=4, layers=8, batch=4, seed=3),
    ],
}


@pytest.fixture(scope="module", params=[3, 4], ids=lambda p: f"{p}stages")
def stages(request, tmp_path_factory):
    from _distributed_helpers import shared_launch

    P = request.param
    return P, CASES[P], shared_launch(P, tmp_path_factory)["pipeline"]


def _one_process(case):
    model = pipeline_model(case["layers"], seed=case["seed"])
    ids, targets = language_batch(case["batch"], seed=case["seed"], length=8)
    loss = torch.nn.functional.cross_entropy(
        model(ids).reshape(-1, model.vocab_size), targets.reshape(-1)
    )
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_three_and_four_stage_pipeline_equals_one_process(stages):
    P, cases, per_rank = stages
    for index, case in enumerate(cases):
        loss, expected = _one_process(case)
        assert_close(per_rank[P - 1][index]["loss"], loss, name=f"loss {case}")
        for rank in range(P - 1):
            assert per_rank[rank][index]["loss"] is None
        held = []
        for rank in range(P):
            grads = per_rank[rank][index]["grads"]
            for name, grad in grads.items():
                assert_close(grad, expected[name], name=f"rank {rank} {name} {case}")
            held.append(set(grads))
        assert set().union(*held) == set(expected)  # every parameter on some stage
        # blocks split evenly; a middle stage holds neither end of the tied tensor
        per = case["layers"] // P
        for rank in range(1, P - 1):
            blocks = {n.split(".")[1] for n in held[rank] if n.startswith("blocks.")}
            assert blocks == {str(i) for i in range(rank * per, (rank + 1) * per)}
            assert "embedding.weight" not in held[rank]
        assert "embedding.weight" in held[0] and "embedding.weight" in held[P - 1]


def test_three_and_four_stage_tied_all_reduce_is_between_the_ends_only(stages):
    P, cases, per_rank = stages
    V, E = 13, 8
    for index in range(len(cases)):
        tied = [per_rank[rank][index]["tied_bytes"] for rank in range(P)]
        assert tied == [V * E * 8] + [0] * (P - 2) + [V * E * 8]


def test_stage_module_refuses_a_split_that_does_not_divide_the_layers():
    model = pipeline_model(3, seed=0)
    with pytest.raises(
        ValueError, match="num_layers=3 does not split into num_stages=2"
    ):
        PipelineStageModule(model, 0, 2)
    untied = pipeline_model(2, seed=0)
    untied.tied = False
    with pytest.raises(TypeError, match="model must be a tied TinyTransformerLM"):
        PipelineStageModule(untied, 0, 2)


# --- a worker that raises -------------------------------------------------------------


def raise_while_the_peer_waits():
    """Rank 1 raises; rank 0 waits in a barrier that rank 1 never joins."""
    if dist.get_rank() == 1:
        raise ValueError("rank 1 refuses its shard (audit)")
    dist.barrier()
    return "rank 0 should not get here"


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, parent = fields[0], int(fields[1])
        if parent == pid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_raising_worker_reports_rank_and_traceback_and_leaves_no_process():
    before = set(_children(os.getpid()))
    with pytest.raises(ValueError) as info:
        launch(raise_while_the_peer_waits, 2, timeout=120)
    message = str(info.value)
    assert message.startswith("rank 1: rank 1 refuses its shard (audit)")
    assert info.value.rank == 1
    assert "--- traceback in rank 1 ---" in message
    assert "raise_while_the_peer_waits" in message  # the worker's own frame
    assert 'raise ValueError("rank 1 refuses its shard (audit)")' in message
    left = set(_children(os.getpid())) - before
    # multiprocessing's resource tracker may stay (one per interpreter, not a rank)
    ranks = [
        pid
        for pid in left
        if "companion-rank" in _cmdline(pid) or "multiprocessing.spawn" in _cmdline(pid)
    ]
    assert not ranks, f"worker processes left behind: {ranks}"


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
