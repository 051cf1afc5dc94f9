"""Pipeline parallelism (``torch.distributed.pipelining``, GPipe and 1F1B) on gloo
processes equals one process; the tied embedding's two copies receive the gradient of
one parameter.

One launch of two stages runs every case; the parent trains the same tied
``TinyTransformerLM`` one step in one process.
"""

import pytest
import torch

from companion.testing import assert_close
from companion.torch.distributed import launch
from companion.torch.distributed.examples import language_batch
from companion.torch.distributed.examples_axes import (
    bubble_fraction,
    pipeline_model,
    run_pipeline_checks,
)
from companion.torch.distributed.pipeline import stage_layers

P = 2
CASES = [
    dict(schedule="gpipe", microbatches=2, layers=2, batch=4, seed=0),
    dict(schedule="1f1b", microbatches=4, layers=2, batch=4, seed=1),
    dict(schedule="1f1b", microbatches=2, layers=4, batch=2, seed=2),
]


TIMELINES = [("gpipe", 4), ("1f1b", 4)]


@pytest.fixture(scope="module")
def pipeline_checks():
    return launch(run_pipeline_checks, P, CASES, TIMELINES)


@pytest.fixture(scope="module")
def pipeline_run(pipeline_checks):
    return [r["cases"] for r in pipeline_checks]


def _one_process(case):
    model = pipeline_model(case["layers"], seed=case["seed"])
    ids, targets = language_batch(case["batch"], seed=case["seed"], length=8)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, model.vocab_size), targets.reshape(-1)
    )
    loss.backward()
    return loss.item(), model


def test_pipeline_equals_one_process(pipeline_run):
    for index, case in enumerate(CASES):
        loss, model = _one_process(case)
        expected = {n: p.grad for n, p in model.named_parameters()}
        assert_close(pipeline_run[P - 1][index]["loss"], loss, name=f"loss {case}")
        seen = set()
        for rank in range(P):
            grads = pipeline_run[rank][index]["grads"]
            for name, grad in grads.items():
                assert_close(grad, expected[name], name=f"rank {rank} {name} {case}")
            seen |= set(grads)
        assert seen == set(expected)  # every parameter on some stage


def test_pipeline_ties_the_embedding_across_stages(pipeline_run):
    """Both ends hold W_E; after the all-reduce both hold its whole gradient."""
    for index in range(len(CASES)):
        first = pipeline_run[0][index]
        last = pipeline_run[P - 1][index]
        assert_close(
            first["grads"]["embedding.weight"], last["grads"]["embedding.weight"]
        )
        V, E = 13, 8
        assert first["tied_bytes"] == last["tied_bytes"] == V * E * 8


def test_stage_split_errors():
    assert stage_layers(4, 1, 2) == range(2, 4)
    with pytest.raises(
        ValueError, match="num_layers=3 does not split into num_stages=2"
    ):
        stage_layers(3, 0, 2)
    with pytest.raises(ValueError, match="stage must be < num_stages=2"):
        stage_layers(4, 2, 2)


def test_pipeline_schedules_order_the_work(pipeline_checks):
    """Each stage runs every microbatch forward and backward once; GPipe runs all
    forwards before any backward, 1F1B starts backwards while forwards remain on the
    first stage. (The order only: the times are the machine's.)"""
    for index, (schedule, m) in enumerate(TIMELINES):
        timelines = [r["timelines"][index] for r in pipeline_checks]
        for stage, spans in enumerate(timelines):
            kinds = sorted((kind, i) for kind, i, _, _ in spans)
            expected = [("backward", i) for i in range(m)]
            assert kinds == expected + [("forward", i) for i in range(m)], stage
            assert all(start <= end for *_, start, end in spans)
            last_forward = max(e for k, _, _, e in spans if k == "forward")
            first_backward = min(s for k, _, s, _ in spans if k == "backward")
            if schedule == "gpipe":
                assert last_forward <= first_backward, (schedule, stage)
            elif stage == 0:
                assert first_backward < last_forward, (schedule, stage)
        assert 0 <= bubble_fraction(timelines) < 1
