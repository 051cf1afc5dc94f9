"""Which attention kernel a multi-head call uses: shared by the three backends.

Backend-free (no numpy, torch or TensorFlow here), one floor below the backends, so
that ``companion.torch`` and ``companion.tensorflow`` need no private name of
``companion.numpy``.
"""

from __future__ import annotations

__all__ = [
    "IMPLEMENTATIONS",
    "NUMPY_TILED_FROM_SCORES",
    "TENSORFLOW_TILED_FROM_SCORES",
    "TILED_FROM_SCORES",
    "TORCH_TILED_FROM_SCORES",
    "choose_implementation",
]

IMPLEMENTATIONS = ("auto", "reference", "tiled")

# "auto" takes the tiled kernel from this many scores per head (L * S) on, per backend:
# the measured crossover, the n (L = S) from which the tiled kernel was at least as
# fast as the reference at every larger size measured, full and causal, float32,
# (1, 4, n, 64). Measure it on your machine with
#     python -m companion.bench crossover --threads 1
# and pass implementation="tiled" / "reference" where your crossover differs.
# Source: two runs of that command on 2026-12-07 (Intel Xeon, AVX-512, L2 2048 KiB,
# 2 cores shared with other jobs, load average 4.1-5.7 (1 min) and 6.7-6.9 (15 min)
# at the start, 1 thread); the larger of the two runs' crossovers is kept, so that
# "auto" slows neither case down there (raw numbers: book/figures/bench/crossover.json):
#   numpy       768 and 768   -> 768 x 768   (tiled 0.50-0.77x of the reference at 768)
#   torch       256 and 384   -> 384 x 384   (0.45-0.72x at 384)
#   tensorflow  1536 and 1024 -> 1536 x 1536 (eager; 0.16-0.33x at 1536)
# (Before: 1024 x 1024 for every backend, from the L2 size, not from a measurement.)
NUMPY_TILED_FROM_SCORES = 768 * 768
TORCH_TILED_FROM_SCORES = 384 * 384
TENSORFLOW_TILED_FROM_SCORES = 1536 * 1536
TILED_FROM_SCORES = {
    "numpy": NUMPY_TILED_FROM_SCORES,
    "torch": TORCH_TILED_FROM_SCORES,
    "tensorflow": TENSORFLOW_TILED_FROM_SCORES,
}


def choose_implementation(
    implementation, L: int, S: int, return_weights: bool, tiled_from: int
) -> str:
    """``"reference"`` or ``"tiled"`` for ``L`` queries against ``S`` keys.

    ``"auto"`` is ``"tiled"`` from ``L * S >= tiled_from`` on, unless the weights are
    wanted (the tiled kernel never forms them). Shared by the three backends.
    """
    if not isinstance(implementation, str):
        raise TypeError(
            f"implementation must be one of {IMPLEMENTATIONS}, "
            f"got {type(implementation).__name__}"
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if implementation == "tiled" and return_weights:
        raise ValueError(
            "implementation='tiled' never forms the attention weights, so it cannot "
            "return them: use return_weights=False or implementation='reference'"
        )
    if implementation == "auto":
        use_tiled = not return_weights and L * S >= tiled_from
        return "tiled" if use_tiled else "reference"
    return implementation
