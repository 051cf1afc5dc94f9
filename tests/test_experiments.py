"""The experiment command of issue 24 on a toy budget: every run is there, at equal
budget, with the numbers the chapter reads; the parameter and cache accounting."""

import json

import pytest

from companion.experiments import (
    RUNS,
    _model_config,
    gpt_experiments,
    kv_cache_bytes_per_token,
    main,
)
from companion.torch.gpt import GPT

TOY_BUDGET = dict(steps=4, warmup=1, context=16, batch_size=2, eval_batches=1)
TOY_MODEL = dict(embed_dim=32, num_heads=4, num_layers=2)
TOY_SHOWCASE = {"shakespeare": dict(vocab_size=260, steps=2, tokenizer_chars=5000)}


#: The toy settings every call here shares (only the seeds and ``reuse`` change).
TOY_SETTINGS = dict(
    budget={**TOY_BUDGET, "vocab_size": 256},
    base_model=TOY_MODEL,
    showcase=TOY_SHOWCASE,
    samples=dict(count=2),
    throughput_steps=1,
    workers=1,
)


@pytest.fixture(scope="module")
def record():
    return gpt_experiments(seeds=(0, 1), **TOY_SETTINGS)


def test_every_run_and_seed_at_the_same_budget(record):
    assert [(r["name"], r["seed"]) for r in record["runs"]] == [
        (name, seed) for seed in (0, 1) for name in RUNS
    ]
    for run in record["runs"]:
        assert 0 < run["bits_per_byte"] < 20
        assert run["tokens_per_second"] > 0
    assert json.loads(json.dumps(record))["budget"]["steps"] == 4
    assert set(record["tokens_per_second_by_implementation"]) == {
        "sdpa",
        "tiled",
        "reference",
    }
    assert record["machine"]["threads_per_run"] == 1


def test_equal_parameters_and_compute_where_claimed(record):
    runs = {r["name"]: r for r in record["runs"] if r["seed"] == 0}
    untied, wide = runs["untied"]["parameters"], runs["tied_wide"]["parameters"]
    assert wide <= untied and untied - wide < 3 * 32 * 2  # one MLP unit per layer
    assert runs["shared"]["parameters"] == runs["one_layer"]["parameters"]
    assert runs["shared"]["flops_per_token"] == runs["base"]["flops_per_token"]
    assert runs["shared"]["parameters"] < runs["base"]["parameters"]
    caches = [runs[n]["kv_cache_bytes_per_token"] for n in ("base", "gqa", "mqa")]
    assert caches == [2 * 2 * 4 * 8 * 4, 2 * 2 * 2 * 8 * 4, 2 * 2 * 1 * 8 * 4]


def test_sharing_across_layers_rows(record):
    runs = {r["name"]: r for r in record["runs"] if r["seed"] == 0}
    V, E, L = 256, 32, 2
    # ALBERT's factorised embedding: V x 16 + 16 x E instead of V x E
    assert runs["factorized"]["parameters"] == (
        runs["base"]["parameters"] - V * E + V * 16 + 16 * E
    )
    # cross-layer attention: the second layer has no key/value projections, and the
    # cache per token is half the base model's
    assert runs["cla"]["parameters"] == runs["base"]["parameters"] - 2 * E * E
    assert (
        2 * runs["cla"]["kv_cache_bytes_per_token"]
        == (runs["base"]["kv_cache_bytes_per_token"])
    )
    # the Universal Transformer: the shared block plus one step embedding per layer
    assert runs["universal"]["parameters"] == runs["shared"]["parameters"] + L * E
    assert (
        runs["universal"]["kv_cache_bytes_per_token"]
        == (runs["base"]["kv_cache_bytes_per_token"])
    )


def test_train_builds_the_model_class_it_is_given():
    from companion.torch.cross_layer import CrossLayerGPT
    from companion.train import TrainConfig, train

    config = TrainConfig(
        **{**TOY_BUDGET, "vocab_size": 256},
        eval_every=4,
        model={**TOY_MODEL, "kv_sharing": 2},
    )
    result = train(config, model_class=CrossLayerGPT)
    assert isinstance(result.model, CrossLayerGPT)
    assert len(result.model.new_caches()) == 1
    with pytest.raises(TypeError, match="model_class"):
        train(config, model_class=dict)


def test_positions_evaluated_past_the_training_context(record):
    runs = {r["name"]: r for r in record["runs"] if r["seed"] == 0}
    assert runs["learned"]["bits_per_byte_past_context"] is None
    for name in ("base", "alibi"):
        assert runs[name]["bits_per_byte_past_context"] > 0
        assert runs[name]["bits_per_byte_within_context"] > 0


def test_showcase_samples(record):
    shakespeare = record["showcase"]["shakespeare"]
    assert len(shakespeare["samples"]["trained"]) == 2
    assert len(shakespeare["samples"]["untrained"]) == 2
    assert shakespeare["evaluations"][-1][0] == 2


def test_reuse_keeps_identical_runs_and_trains_the_rest(record):
    grown = gpt_experiments(seeds=(0, 1, 2), reuse=record, **TOY_SETTINGS)
    assert grown["reused"]["showcase"] == ["shakespeare"]
    assert sorted(map(tuple, grown["reused"]["runs"])) == sorted(
        (name, seed) for seed in (0, 1) for name in RUNS
    )
    assert [(r["name"], r["seed"]) for r in grown["runs"]] == [
        (name, seed) for seed in (0, 1, 2) for name in RUNS
    ]
    assert grown["runs"][: 2 * len(RUNS)] == record["runs"]
    # what makes reuse honest: a run trained again gives the same numbers
    again = gpt_experiments(seeds=(1,), **TOY_SETTINGS)
    assert [r["bits_per_byte"] for r in again["runs"]] == [
        r["bits_per_byte"] for r in record["runs"] if r["seed"] == 1
    ]
    # another budget reuses nothing
    other = {**TOY_SETTINGS, "budget": {**TOY_SETTINGS["budget"], "warmup": 2}}
    fresh = gpt_experiments(seeds=(0,), reuse=record, **other)
    assert fresh["reused"] == {"runs": [], "showcase": []}


def test_tied_wide_matches_the_untied_parameters():
    budget = dict(vocab_size=512, context=64)
    base = dict(embed_dim=64, num_heads=4, num_layers=4)
    config = _model_config("tied_wide", budget, base)
    untied = GPT(512, 64, **base, tied=False).num_parameters()
    tied = GPT(512, 64, **config).num_parameters()
    wider = GPT(512, 64, **{**config, "mlp_hidden": config["mlp_hidden"] + 1})
    assert tied <= untied < wider.num_parameters()


def test_kv_cache_bytes():
    config = dict(embed_dim=64, num_heads=4, num_layers=4)
    assert kv_cache_bytes_per_token(config) == 2 * 4 * 4 * 16 * 4
    assert kv_cache_bytes_per_token({**config, "num_kv_heads": 1}) == 2 * 4 * 16 * 4
    assert kv_cache_bytes_per_token(config, bytes_per_number=2) == 2 * 4 * 4 * 16 * 2
    assert kv_cache_bytes_per_token({**config, "kv_sharing": 2}) == 2 * 2 * 4 * 16 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        gpt_experiments(seeds=(), workers=1)
    with pytest.raises(SystemExit):
        main(["unknown"])
