"""The pipeline bubble's formula, and the structure of the stored measurement
(``book/_data/pipeline_bubbles.json``: the order of events, never the times)."""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from companion.torch.distributed.bubbles import ideal_bubble
from companion.torch.distributed.examples_axes import bubble_fraction

STORED = Path(__file__).resolve().parent.parent / "book/_data/pipeline_bubbles.json"


@pytest.mark.parametrize("P, m", [(1, 1), (2, 1), (2, 8), (4, 4), (8, 32)])
def test_ideal_bubble_is_the_idle_share_of_equal_stages(P, m):
    # m busy slots of each stage's m + P - 1
    assert ideal_bubble(P, m) == pytest.approx(float(Fraction(P - 1, m + P - 1)))


def test_ideal_bubble_refuses_empty_pipelines():
    with pytest.raises(ValueError, match="num_stages and microbatches must be >= 1"):
        ideal_bubble(0, 4)


def test_bubble_fraction_of_a_drawn_timeline():
    """Two stages, two microbatches of forward 1 and backward 1, GPipe order."""
    stage0 = [("forward", 0, 0, 1), ("forward", 1, 1, 2)]
    stage0 += [("backward", 1, 4, 5), ("backward", 0, 5, 6)]
    stage1 = [("forward", 0, 1, 2), ("forward", 1, 2, 3)]
    stage1 += [("backward", 1, 3, 4), ("backward", 0, 4, 5)]
    assert bubble_fraction([stage0, stage1]) == pytest.approx(ideal_bubble(2, 2))


def test_stored_measurement_has_every_microbatch_in_schedule_order():
    data = json.loads(STORED.read_text())
    assert {"processor", "cpu_count", "load_average", "torch"} <= set(data["machine"])
    assert {(r["schedule"], r["microbatches"]) for r in data["runs"]} == {
        ("gpipe", 1),
        ("gpipe", 2),
        ("gpipe", 4),
        ("gpipe", 8),
        ("1f1b", 2),
        ("1f1b", 4),
        ("1f1b", 8),
    }
    for run in data["runs"]:
        m, P = run["microbatches"], run["stages"]
        assert run["ideal"] == ideal_bubble(P, m)
        assert len(run["timelines"]) == P
        for stage, spans in enumerate(run["timelines"]):
            kinds = sorted((kind, i) for kind, i, _, _ in spans)
            assert kinds == [("backward", i) for i in range(m)] + [
                ("forward", i) for i in range(m)
            ]
            forwards = [i for kind, i, _, _ in spans if kind == "forward"]
            assert forwards == list(range(m))  # in microbatch order
            if run["schedule"] == "gpipe":
                last = max(e for kind, _, _, e in spans if kind == "forward")
                first = min(s for kind, _, s, _ in spans if kind == "backward")
                assert last <= first, (run["schedule"], m, stage)
        assert 0 < run["bubble"] < 1
        assert run["bubble"] == pytest.approx(bubble_fraction(run["timelines"]))
