"""Training the small GPT (issue 24): schedule, decay groups, accumulation, TensorBoard
events, checkpoints that resume bit for bit, the command line."""

import glob
import math

import pytest
import torch

from companion.corpora import corpus
from companion.testing import assert_close
from companion.torch.gpt import GPT
from companion.train import (
    TrainConfig,
    _parameter_groups,
    _windows,
    learning_rate_at,
    main,
    make_tokenizer,
    train,
)

TINY_MODEL = dict(embed_dim=16, num_heads=2, num_layers=1)


def tiny(**kwargs):
    base = dict(
        vocab_size=256,
        context=16,
        batch_size=4,
        steps=8,
        warmup=2,
        eval_every=4,
        eval_batches=2,
        model=TINY_MODEL,
    )
    return TrainConfig(**{**base, **kwargs})


def test_schedule_warms_up_then_follows_a_cosine():
    c = TrainConfig(steps=100, warmup=10, learning_rate=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate_at(s, c) for s in range(100)]
    assert_close([lrs[0], lrs[9], lrs[-1]], [0.1, 1.0, 0.1], rtol=1e-12)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    middle = 10 + (99 - 10) / 2
    assert_close(learning_rate_at(middle, c), 0.55, rtol=1e-12)


def test_decay_only_on_matrices():
    result = train(tiny(steps=1))
    decay, no_decay = _parameter_groups(result.model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in result.model.named_parameters()}
    assert "embedding.weight" in {names[id(p)] for p in decay["params"]}
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    count = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert count == result.model.num_parameters()  # the tied weight once


def test_loss_falls_and_bits_per_byte_follow():
    result = train(tiny(steps=30, learning_rate=1e-2, eval_every=30))
    assert len(result.losses) == 30
    assert math.log(256) - 0.2 < result.losses[0] < math.log(256) + 0.3
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0
    step, val, bpb = result.evaluations[-1]
    assert step == 30
    assert_close(bpb, val / math.log(2), rtol=1e-12)  # one token per byte
    assert result.tokens_per_second > 0
    assert max(result.grad_norms) > 0


def test_accumulation_averages_micro_batch_gradients():
    config = tiny(steps=1, batch_size=3, accumulation=2)
    result = train(config)
    # the same step by hand: both micro-batches of the step's generator, one mean
    torch.manual_seed(config.seed)
    model = GPT(256, 16, **TINY_MODEL)
    tokens = torch.frombuffer(
        bytearray(corpus("shakespeare").train.encode()), dtype=torch.uint8
    ).long()
    generator = torch.Generator().manual_seed(config.seed * 1_000_003)
    x1, y1 = _windows(tokens, 3, 16, generator)
    x2, y2 = _windows(tokens, 3, 16, generator)
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert_close(result.losses[0], loss.item(), rtol=1e-6)
    assert_close(result.grad_norms[0], norm.item(), rtol=1e-5)


def test_resumed_run_reproduces_the_uninterrupted_curve_bit_for_bit(tmp_path):
    config = tiny(steps=10, eval_every=5)
    whole = train(config)
    path = str(tmp_path / "ckpt.pt")
    first = train(config, checkpoint=path, stop_after=4)
    assert first.losses == whole.losses[:4]
    resumed = train(config, checkpoint=path, resume=True)
    assert resumed.losses == whole.losses  # exact floats
    assert resumed.evaluations == whole.evaluations
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="another configuration.*learning_rate"):
        train(
            tiny(steps=10, eval_every=5, learning_rate=1e-2),
            checkpoint=path,
            resume=True,
        )


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    train(tiny(), log_dir=str(tmp_path))
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/learning_rate", "val/bits_per_byte"):
        assert tag in tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))


def test_bpe_tokenizer_and_other_options():
    tokenizer = make_tokenizer("to be or not to be, that is the question " * 50, 270)
    assert tokenizer.vocab_size == 270
    result = train(
        tiny(vocab_size=270, steps=2, model=dict(TINY_MODEL, positions="learned")),
        tokenizer=tokenizer,
        implementation="reference",
    )
    assert result.model.config["positions"] == "learned"
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny(steps=1), tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(warmup=-1), "warmup"),
        (dict(clip=0), "clip"),
        (dict(batch_size=2.5), "batch_size"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_command_line(tmp_path, capsys):
    args = ["--vocab-size", "256", "--context", "16", "--batch-size", "2"]
    args += ["--steps", "3", "--eval-every", "3", "--eval-batches", "1"]
    args += ["--embed-dim", "16", "--num-heads", "2", "--num-layers", "1"]
    args += ["--no-progress", "--checkpoint", str(tmp_path / "c.pt")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 3: validation loss" in out and "tokens/s" in out
    assert (tmp_path / "c.pt").exists()


def test_runs_dir_is_the_projects_build_runs_or_the_override(tmp_path, monkeypatch):
    from companion.train import RUNS_ENV, runs_dir

    monkeypatch.delenv(RUNS_ENV, raising=False)
    project = tmp_path / "project"
    (project / "book").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    assert runs_dir("vision", start=project / "book") == (
        project / "_build" / "runs" / "vision"
    )
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "elsewhere"))
    assert (
        runs_dir("vision", start=project / "book") == tmp_path / "elsewhere" / "vision"
    )
    for bad in ("", "a/b", None):
        with pytest.raises(ValueError, match="chapter"):
            runs_dir(bad)
