"""The fast parts of ``companion.experiments_positions`` (the chapter's RoPE scaling
grid): the rules, the scaled copy of a model, the task and the stored file's shape.
The full grid (150 + 50 steps per rule and seed) runs in the chapter and by
``python -m companion.experiments_positions``, not here."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from companion import experiments_positions as ep  # noqa: E402
from companion import numpy as cn  # noqa: E402
from companion.testing import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return ep.train_lag("rope", steps=2, seed=0)


def test_lag_batch_targets_are_two_back():
    x, y = ep.lag_batch(4, 12, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 12)
    assert torch.equal(y[:, ep.LAG :], x[:, : -ep.LAG])


def test_rules_stretch_the_experiment_as_the_chapter_says():
    d = 32 // 4  # the model's head size
    plain, _ = cn.rotary_frequencies(d)
    theta = {
        name: cn.rotary_frequencies(d, scaling=rule, seq_len=ep.TEST_LEN)
        for name, rule in ep.RULES.items()
    }
    assert_close(theta["linear"][0], plain / 2, rtol=1e-15, atol=0, name="PI")
    for name in ("ntk", "dynamic", "yarn", "longrope"):  # the fastest pair is kept
        assert theta[name][0][0] == plain[0], name
    assert_close(theta["ntk"][0][-1], plain[-1] / 2, rtol=1e-13, atol=0, name="ntk")
    assert_close(theta["yarn"][0][1:], plain[1:] / 2, rtol=1e-15, atol=0, name="yarn")
    assert theta["yarn"][1] == pytest.approx(0.1 * np.log(2) + 1, rel=1e-15)
    assert 0.5 < theta["llama3"][0][0] < 1.0  # blended: 2 pi lies in (16/4, 16)


def test_with_scaling_copies_and_changes_only_the_rotation(model):
    x, _ = ep.lag_batch(3, ep.TEST_LEN, torch.Generator().manual_seed(1))
    before = model(x)
    scaled = ep.with_scaling(model, ep.RULES["linear"])
    assert all(block.attention.rope.scaling is None for block in model.blocks)
    assert all(b.attention.rope.scaling.rope_type == "linear" for b in scaled.blocks)
    for (name, p), q in zip(model.named_parameters(), scaled.parameters()):
        assert torch.equal(p, q) and p is not q, name
    assert torch.equal(model(x), before)  # the original is untouched
    assert not torch.allclose(scaled(x), before)
    assert torch.equal(ep.with_scaling(model, None)(x), before)


def test_with_scaling_needs_a_rope_model():
    learned = ep.train_lag("learned", steps=0)
    with pytest.raises(ValueError, match="positions='rope'"):
        ep.with_scaling(learned, ep.RULES["ntk"])


def test_grid_is_deterministic_and_main_writes_it(tmp_path):
    rules = {k: ep.RULES[k] for k in ("none", "yarn")}
    test = ep.lag_batch(20, ep.TEST_LEN, torch.Generator().manual_seed(2))
    first = ep.scaling_grid(0, rules=rules, steps=2, fine_tune_steps=1, test=test)
    again = ep.scaling_grid(0, rules=rules, steps=2, fine_tune_steps=1, test=test)
    assert first == again and set(first) == set(rules)
    for row in first.values():
        for key in ("no_fine_tune", "fine_tune"):
            assert len(row[key]) == 2 and all(0 <= a <= 1 for a in row[key])
    out = tmp_path / "grid.json"
    ep.main(
        ["--seeds", "0", "--train-steps", "1", "--fine-tune-steps", "0"]
        + ["--out", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["settings"]["train_steps"] == 1 and list(data["seeds"]) == ["0"]
    assert set(data["seeds"]["0"]) == set(ep.RULES)
    assert "fine_tune" not in data["seeds"]["0"]["none"]
