"""The mixture-of-experts experiment (issue 25) on a toy budget: every run and seed is
there with the numbers the chapter reads; the MoE GPT has the dense model's active
parameters; the loads and dropped counts add up."""

import json

import pytest

torch = pytest.importorskip("torch")

from companion.experiments_moe import (  # noqa: E402
    CAPACITY_FACTORS,
    MOE_RUNS,
    active_parameters,
    main,
    moe_experiments,
    moe_gpt,
)
from companion.torch.gpt import GPT  # noqa: E402
from companion.torch.moe import MoELayer  # noqa: E402

TOY_BUDGET = dict(steps=3, warmup=1, context=16, batch_size=2, eval_batches=2)
TOY_MODEL = dict(embed_dim=24, num_heads=2, num_layers=2)
TOY_MOE = dict(num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def record():
    return moe_experiments(
        seeds=(0, 1),
        budget={**TOY_BUDGET, "vocab_size": 256},
        base_model=TOY_MODEL,
        moe=TOY_MOE,
    )


def test_every_run_and_seed_with_what_the_chapter_reads(record):
    assert [(r["name"], r["seed"]) for r in record["runs"]] == [
        (name, seed) for seed in (0, 1) for name in MOE_RUNS
    ]
    for run in record["runs"]:
        assert 0 < run["bits_per_byte"] < 20
    assert json.loads(json.dumps(record))["budget"]["steps"] == 3
    assert record["capacity_factors"] == list(CAPACITY_FACTORS)


def test_equal_active_parameters_more_total(record):
    runs = {r["name"]: r for r in record["runs"] if r["seed"] == 0}
    dense = runs["dense"]["parameters"]
    E, layers, N = 24, 2, 4
    for name in ("moe", "moe_aux", "moe_bias"):
        # the routers (N E per layer) are the only active addition
        assert runs[name]["active_parameters"] == dense + layers * N * E
        # 4 experts of width 32 (3 * 24 * 32 each) replace a dense MLP of width 64
        assert runs[name]["parameters"] == dense + layers * (
            N * E + N * 3 * E * 32 - 3 * E * 64
        )


def test_loads_and_drops_add_up(record):
    for run in record["runs"]:
        if run["name"] == "dense":
            assert "expert_load" not in run
            continue
        total = run["assignments_per_layer"]
        assert total == 2 * 2 * 16 * 2  # batches * batch * context * top_k
        for load, dropped in zip(run["expert_load"], run["dropped_assignments"]):
            assert sum(load) == total and len(load) == 4
            # more capacity never drops more; c = 2 with 4 experts and k = 2 is
            # 16 slots per expert for 32 assignments per batch: nothing beyond
            assert dropped == sorted(dropped, reverse=True)
            assert dropped[-1] == 0
    # the bias moves only in the run that updates it
    runs = {r["name"]: r for r in record["runs"] if r["seed"] == 0}
    assert all(b == 0 for row in runs["moe"]["bias"] for b in row)
    assert any(b != 0 for row in runs["moe_bias"]["bias"] for b in row)


def test_moe_gpt_swaps_only_the_mlps():
    torch.manual_seed(0)
    dense = GPT(256, 16, **TOY_MODEL)
    torch.manual_seed(0)
    moe = moe_gpt(256, 16, num_experts=4, top_k=2, **TOY_MODEL)
    assert all(isinstance(b.mlp, MoELayer) for b in moe.blocks)
    hidden = 8 * 24 // 3 // 2
    assert moe.blocks[0].mlp.down.shape == (4, 24, hidden)
    assert active_parameters(dense) == dense.num_parameters()
    mlp = sum(p.numel() for p in dense.blocks[0].mlp.parameters())
    expected = dense.num_parameters() + 2 * (4 * 24 + 2 * mlp - mlp)
    assert moe.num_parameters() == expected
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert moe(ids).shape == (2, 16, 256)


def test_bad_input():
    with pytest.raises(ValueError, match="runs"):
        moe_experiments(runs=("sparse",))
    with pytest.raises(ValueError, match="seeds"):
        moe_experiments(seeds=())


def test_command_writes_json(tmp_path, monkeypatch):
    import companion.experiments_moe as module

    monkeypatch.setattr(
        module, "MOE_BUDGET", {**module.MOE_BUDGET, **TOY_BUDGET, "vocab_size": 256}
    )
    monkeypatch.setattr(module, "BASE_MODEL", TOY_MODEL)
    monkeypatch.setattr(module, "MOE", {**module.MOE, **TOY_MOE})
    out = tmp_path / "moe.json"
    assert main(["--out", str(out), "--seeds", "0", "--runs", "dense", "moe"]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["runs"]] == ["dense", "moe"]
