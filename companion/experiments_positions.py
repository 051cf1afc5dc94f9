r"""The positions chapter's "longer than training" grid: RoPE scaling rules measured.

``python -m companion.experiments_positions`` (or :func:`positions_experiments`)
trains the chapter's RoPE model on the lag-2 copy task (``y_t = x_{t-2}``) at length
``TRAIN_LEN = 16``, then applies each rule of :data:`RULES` (scale ``s = 2``, the
original length 16, the test length 32) to a copy of it and measures the accuracy on
the trained positions (``2 <= t < 16``) and the unseen ones (``16 <= t < 32``) of
length-32 test sequences:

* with **no fine-tuning** (the rule changes the frequencies of the trained model);
* after a **short fine-tune** of ``FINE_TUNE_STEPS`` steps at length 32 with the
  rule in place (the same steps for the unscaled row, as the control).

Training is float64 on one thread, so the accuracies are the same on every x86-64
CPU (the chapter checks seed 0 live against the stored file). The results, with the
versions and the machine, go to ``book/_data/positions_experiments.json``; the
chapter ``book/positions.ipynb`` prints the table from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform

__all__ = [
    "V",
    "LAG",
    "TRAIN_LEN",
    "TEST_LEN",
    "FINE_TUNE_STEPS",
    "RULES",
    "lag_batch",
    "train_lag",
    "with_scaling",
    "fine_tune",
    "lag_accuracy_of",
    "test_set",
    "scaling_grid",
    "positions_experiments",
    "main",
]

V, LAG, TRAIN_LEN, TEST_LEN = 10, 2, 16, 32
FINE_TUNE_STEPS = 50
DEFAULT_PATH = (
    pathlib.Path(__file__).resolve().parents[1]
    / "book"
    / "_data"
    / "positions_experiments.json"
)

#: Rule name -> the ``scaling`` of :class:`companion.numpy.RotaryConfig` (``None``:
#: unscaled). Every rule stretches the original 16 positions to the test length 32
#: (``s = 2``). LongRoPE's per-pair factors are set by hand here (the paper searches
#: them); they grow from 1 on the fastest pair to 2 on the slowest.
RULES = {
    "none": None,
    "linear": dict(rope_type="linear", factor=2.0),
    "ntk": dict(rope_type="ntk", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, original_max_positions=16),
    "yarn": dict(rope_type="yarn", factor=2.0, original_max_positions=16),
    "llama3": dict(rope_type="llama3", factor=2.0, original_max_positions=16),
    "longrope": dict(
        rope_type="longrope",
        original_max_positions=16,
        max_positions=32,
        short_factor=(1.0, 1.0, 1.0, 1.0),
        long_factor=(1.0, 1.5, 2.0, 2.0),
    ),
}


# [book: lag task]
def lag_batch(n, length, generator):
    """``n`` random digit sequences ``x (n, length)`` and their targets ``x_{t-2}``."""
    import torch

    x = torch.randint(V, (n, length), generator=generator)
    return x, x.roll(LAG, dims=1)  # y_t = x_{t - 2} (positions t < 2 are not scored)


def _train_steps(model, steps, length, data):
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        x, y = lag_batch(32, length, data)
        logits = model(x)[:, LAG:]  # (32, L - 2, V)
        loss = F.cross_entropy(logits.reshape(-1, V), y[:, LAG:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def train_lag(positions, steps=150, seed=0):
    """The chapter's model (2 layers, E = 32, 4 heads, untied), trained in float64 for
    ``steps`` AdamW steps on batches of 32 sequences of ``TRAIN_LEN`` tokens."""
    import torch

    from companion.torch.models import TinyTransformerLM

    torch.manual_seed(seed)
    model = TinyTransformerLM(
        V,
        TEST_LEN,
        embed_dim=32,
        num_heads=4,
        num_layers=2,
        tied=False,
        positions=positions,
    ).double()  # float64: the same training on every CPU
    data = torch.Generator().manual_seed(seed + 1)
    return _train_steps(model, steps, TRAIN_LEN, data)


# [/book: lag task]


# [book: with scaling]
def with_scaling(model, scaling):
    """A copy of a RoPE ``model`` whose every block rotates with ``scaling`` (a
    :class:`~companion.numpy.RopeScaling`, a dict of its fields, or ``None``)."""
    from companion._positions import RotaryConfig

    scaled = copy.deepcopy(model)
    for block in scaled.blocks:
        old = block.attention.rope
        if old is None:
            raise ValueError("model must use rotary positions (positions='rope')")
        block.attention.rope = RotaryConfig(
            base=old.base,
            interleaved=old.interleaved,
            rotary_dim=old.rotary_dim,
            scaling=scaling,
        )
    return scaled


def fine_tune(model, steps, seed=0):
    """Train ``model`` (in place) ``steps`` more steps on sequences of ``TEST_LEN``."""
    import torch

    data = torch.Generator().manual_seed(seed + 100)  # batches the first run never saw
    return _train_steps(model, steps, TEST_LEN, data)


# [/book: with scaling]


def lag_accuracy_of(model, x, y):
    """Accuracy on the trained positions ``2 <= t < 16`` and the unseen ``16 <= t``."""
    import torch

    with torch.no_grad():
        correct = (model(x).argmax(-1) == y).double()  # (n, L)
    seen, unseen = correct[:, LAG:TRAIN_LEN], correct[:, TRAIN_LEN:]
    return seen.mean().item(), unseen.mean().item()


def test_set():
    """The chapter's 500 test sequences of ``TEST_LEN`` tokens (seed 2)."""
    import torch

    return lag_batch(500, TEST_LEN, torch.Generator().manual_seed(2))


def scaling_grid(
    seed=0, rules=None, steps=150, fine_tune_steps=FINE_TUNE_STEPS, test=None
):
    """``{rule: {"no_fine_tune": [seen, unseen], "fine_tune": [seen, unseen]}}`` for
    one seed; ``fine_tune_steps=0`` leaves out the fine-tuned pair."""
    rules = RULES if rules is None else rules
    x, y = test_set() if test is None else test
    base = train_lag("rope", steps=steps, seed=seed)
    grid = {}
    for name, scaling in rules.items():
        model = with_scaling(base, scaling)
        row = {"no_fine_tune": list(lag_accuracy_of(model, x, y))}
        if fine_tune_steps:
            fine_tune(model, fine_tune_steps, seed=seed)
            row["fine_tune"] = list(lag_accuracy_of(model, x, y))
        grid[name] = row
    return grid


def positions_experiments(
    seeds=(0, 1, 2), fine_tune_steps=FINE_TUNE_STEPS, train_steps=150
) -> dict:
    """The grid for each seed, with its settings, the machine and the versions."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    test = test_set()
    return {
        "task": f"lag-{LAG} copy, train length {TRAIN_LEN}, test length {TEST_LEN}",
        "settings": dict(
            train_steps=train_steps,
            fine_tune_steps=fine_tune_steps,
            batch=32,
            lr=3e-3,
            test_sequences=500,
            dtype="float64",
        ),
        "rules": {k: v for k, v in RULES.items()},
        "seeds": {
            str(s): scaling_grid(
                s, steps=train_steps, fine_tune_steps=fine_tune_steps, test=test
            )
            for s in seeds
        },
        "machine": dict(
            processor=platform.processor() or platform.machine(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            threads=torch.get_num_threads(),
        ),
        "versions": dict(
            python=platform.python_version(),
            numpy=np.__version__,
            torch=torch.__version__.split("+")[0],
        ),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fine-tune-steps", type=int, default=FINE_TUNE_STEPS)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    result = positions_experiments(args.seeds, args.fine_tune_steps, args.train_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
