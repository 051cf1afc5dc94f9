"""Source 1's attention code, run as written, and its correction
:func:`nadaraya_watson`.

Source 1 computes one similarity for the whole input, ``1 - ||X||`` (the norm of the
matrix), so its softmax sees a single number and returns 1: the "attention" returns X
unchanged, whatever X is. Kernel regression with the Gaussian kernel is the attention
it meant: one weight per query-key pair, from their distance.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.numpy import nadaraya_watson, negative_distance_scores, softmax
from companion.sources import run_source
from companion.testing import assert_close


def _run_seeded(seed: int) -> dict:
    np.random.seed(seed)  # the snippet draws from the global numpy generator
    return run_source("attention_numpy")


def test_source_attention_returns_x_unchanged():
    scope = _run_seeded(0)
    X = scope["X"]  # (10, 10)
    assert np.ndim(scope["similarity"](X)) == 0, (
        "the similarity is one scalar for the whole matrix"
    )
    assert_close(
        scope["softmax"](scope["similarity"](X)),
        np.float64(1.0),
        rtol=0,
        atol=0,
        name="softmax of one scalar",
    )
    assert_close(scope["alpha"], X, rtol=0, atol=0, name="source attention(X)")
    assert_close(scope["y"], X @ X, rtol=0, atol=0, name="source prediction y = X X")


def test_source_attention_ignores_what_is_asked():
    scope = _run_seeded(1)
    X = scope["X"]
    scaled = scope["attention"](3.0 * X)  # a different input: still returned unchanged
    assert_close(scaled, 3.0 * X, rtol=0, atol=0, name="source attention(3X)")


def test_nadaraya_watson_weights_each_pair_by_distance():
    scope = _run_seeded(0)
    X = scope["X"]  # 10 points with 10 features, used as keys and values
    queries = X[:3] + 0.05  # (3, 10)
    corrected = nadaraya_watson(queries, X, X, bandwidth=0.5)  # (3, 10)
    # (3, 10)
    direct_weights = softmax(
        -(negative_distance_scores(queries, X) ** 2) / (2 * 0.5**2)
    )
    assert_close(
        corrected, direct_weights @ X, name="nadaraya_watson vs Gaussian-kernel weights"
    )
    assert not np.allclose(corrected, queries), (
        "unlike the source, the output depends on the keys' distances"
    )
    # Each output is a convex combination of the values: inside their range, feature
    # by feature.
    assert (corrected >= X.min(axis=0) - 1e-12).all() and (
        corrected <= X.max(axis=0) + 1e-12
    ).all()
    # A small bandwidth follows the nearest key; the source's attention cannot.
    nearest = nadaraya_watson(queries, X, X, bandwidth=0.01)
    assert_close(
        nearest,
        X[:3],
        rtol=1e-9,
        atol=1e-9,
        name="small bandwidth: nearest key's value",
    )


def test_run_source_keeps_what_a_failing_snippet_defined():
    """Source 1's sharing code raises in its loop; its ``forward`` and ``W`` stay
    inspectable."""
    np.random.seed(0)
    scope: dict = {}
    with pytest.raises(ValueError, match="not aligned"):
        run_source("sharing_numpy", scope)
    assert callable(scope["forward"]) and scope["W"].shape == (10, 10)
