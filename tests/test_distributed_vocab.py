"""Vocabulary parallelism on gloo processes equals one process; its traffic follows
the formula; a vocabulary that does not split is refused.

One launch per world size runs every case; the parent computes the same tied model in
one process (full logits, ``torch.nn.functional.cross_entropy``).
"""

import pytest
import torch

from companion.testing import assert_close
from companion.torch.distributed import launch
from companion.torch.distributed.examples_axes import (
    run_vocab_parallel,
    vocab_batch,
    vocab_model,
)
from companion.torch.distributed.vocab_parallel import (
    padded_vocab_size,
    vocab_parallel_bytes,
    vocab_range,
)

# (V, E, B, T): two sizes, and V = 7 that does not split over 2 ranks
CASES = [(12, 6, 2, 5), (16, 4, 3, 2), (7, 4, 1, 3)]


def _cases():
    return [dict(V=V, E=E, B=B, T=T, seed=i) for i, (V, E, B, T) in enumerate(CASES)]


# two ranks show every point (four would only cost CI time)
@pytest.fixture(scope="module", params=[2], ids=lambda w: f"world{w}")
def vocab_run(request):
    world_size = request.param
    return world_size, _cases(), launch(run_vocab_parallel, world_size, _cases())


def _one_process(case):
    embedding, layer = vocab_model(case["V"], case["E"], seed=case["seed"])
    ids, targets = vocab_batch(case["V"], case["B"], case["T"], seed=case["seed"])
    hidden = torch.tanh(layer(embedding(ids)))
    logits = hidden @ embedding.weight.T  # (B, T, V), the weight tied
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, case["V"]), targets.reshape(-1)
    )
    loss.backward()
    return loss.item(), embedding.weight.grad, layer.weight.grad, layer.bias.grad


def test_vocab_parallel_equals_one_process(vocab_run):
    world_size, cases, per_rank = vocab_run
    for index, case in enumerate(cases):
        if case["V"] % world_size:
            continue
        loss, grad_weight, grad_layer_weight, grad_layer_bias = _one_process(case)
        for rank in range(world_size):
            result = per_rank[rank][index]
            name = f"W={world_size} rank {rank} {case}"
            rows = vocab_range(case["V"], rank, world_size)
            assert result["vocab"] == (rows.start, rows.stop)
            assert result["logits_shape"] == (case["B"], case["T"], len(rows))
            assert_close(result["loss"], loss, name=f"loss {name}")
            assert_close(
                result["grad_weight"],
                grad_weight[rows.start : rows.stop],
                name=f"tied weight {name}",
            )
            assert_close(result["grad_layer_weight"], grad_layer_weight, name=name)
            assert_close(result["grad_layer_bias"], grad_layer_bias, name=name)


def test_vocab_parallel_bytes_follow_the_formula(vocab_run):
    """Forward B T E + 3 B T numbers, backward B T E; never the B T V logits."""
    world_size, cases, per_rank = vocab_run
    for index, case in enumerate(cases):
        if case["V"] % world_size:
            continue
        n = case["B"] * case["T"]
        forward, backward = vocab_parallel_bytes(n, case["E"])
        assert forward == (n * case["E"] + 3 * n) * 8
        for rank in range(world_size):
            result = per_rank[rank][index]
            assert result["forward"]["bytes"] == {"all_reduce": forward}
            assert result["forward"]["calls"] == {"all_reduce": 4}
            assert result["backward"]["bytes"] == {"all_reduce": backward}
            assert result["backward"]["calls"] == {"all_reduce": 1}


def test_vocab_that_does_not_split_is_refused(vocab_run):
    world_size, cases, per_rank = vocab_run
    for index, case in enumerate(cases):
        if case["V"] % world_size == 0:
            continue
        padded = padded_vocab_size(case["V"], world_size)
        for rank in range(world_size):
            message = per_rank[rank][index]["error"]
            assert f"vocab_size={case['V']}" in message
            assert f"world_size={world_size}" in message
            assert f"={padded} rows" in message


def test_vocab_range_and_padding():
    assert vocab_range(12, 1, 4) == range(3, 6)
    assert padded_vocab_size(7, 4) == 8
    assert padded_vocab_size(8, 4) == 8
    with pytest.raises(ValueError, match="vocab_size=7 does not split"):
        vocab_range(7, 0, 2)
    with pytest.raises(ValueError, match="rank must be < world_size=2"):
        vocab_range(8, 2, 2)
