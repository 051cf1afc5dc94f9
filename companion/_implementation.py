"""Which attention kernel a multi-head call uses: shared by the three backends.

Backend-free (no numpy, torch or TensorFlow here), one floor below the backends, so
that ``companion.torch`` and ``companion.tensorflow`` need no private name of
``companion.numpy``.
"""

from __future__ import annotations

__all__ = ["IMPLEMENTATIONS", "TILED_FROM_SCORES", "choose_implementation"]

IMPLEMENTATIONS = ("auto", "reference", "tiled")
# "auto" takes the tiled kernel from this many scores per head (L * S) on: one
# 1024 x 1024 float32 score matrix is 4 MiB, more than a core's cache, and from there
# the tiled kernel is both faster and O(L) in memory (book chapter *Making it fast*).
TILED_FROM_SCORES = 1024 * 1024


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
