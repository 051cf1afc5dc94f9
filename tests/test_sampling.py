"""Sampling the next token (issue 24): greedy limits, truncation, a chi-square test."""

import math

import numpy as np
import pytest
import torch

from companion.testing import assert_close
from companion.torch.sampling import next_token_distribution, sample


@pytest.fixture
def logits(rng):
    return torch.tensor(rng.normal(0, 2, size=(4, 11)), dtype=torch.float32)


def test_top_k_one_and_zero_temperature_are_greedy(logits):
    greedy = logits.argmax(dim=-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample(logits, top_k=1, generator=g), greedy)
        assert torch.equal(sample(logits, temperature=1e-4, generator=g), greedy)
    assert torch.equal(sample(logits, temperature=0), greedy)
    assert sample(logits).dtype == torch.int64
    assert sample(logits).shape == (4,)


def test_top_p_one_is_the_full_distribution(logits):
    full = torch.softmax(logits, dim=-1)
    assert_close(next_token_distribution(logits, top_p=1.0), full)
    assert_close(next_token_distribution(logits, top_k=11), full)
    assert_close(next_token_distribution(logits, top_k=100), full)
    # temperature divides the logits
    assert_close(
        next_token_distribution(logits, temperature=2.0), torch.softmax(logits / 2, -1)
    )


def expected(logits, temperature, top_k, top_p):
    """The truncated distribution, written independently in numpy (float64)."""
    z = logits.double().numpy() / temperature
    out = np.zeros_like(z)
    for b, row in enumerate(z):
        order = np.argsort(-row, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12) + 1)  # reach top_p
        kept = order[:n]
        q = np.exp(row[kept] - row[kept].max())
        out[b, kept] = q / q.sum()
    return out


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, 0.9), (0.7, 5, 1.0), (1.3, 6, 0.8)]
)
def test_distribution_is_truncated_and_renormalised(logits, temperature, top_k, top_p):
    got = next_token_distribution(
        logits, temperature=temperature, top_k=top_k, top_p=top_p
    )
    want = expected(logits, temperature, top_k, top_p)
    assert_close(got.double(), torch.from_numpy(want), atol=1e-6, rtol=1e-5)
    assert (got > 0).sum() < logits.numel()  # something was cut


def chi_square_critical(df, z=3.719):
    """Wilson-Hilferty: the chi-square quantile of ``df`` degrees of freedom at the
    normal quantile ``z`` (3.719: 0.9999)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (0.8, 6, 0.9)])
def test_draws_follow_the_truncated_distribution(logits, temperature, top_k, top_p):
    n = 20_000
    row = logits[:1].expand(n, -1)  # one distribution, n draws at once
    g = torch.Generator().manual_seed(1234)
    ids = sample(row, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
    counts = np.bincount(ids.numpy(), minlength=logits.shape[1])
    probs = expected(logits[:1], temperature, top_k, top_p)[0]
    assert counts[probs == 0].sum() == 0  # never a token that was cut
    support = probs > 0
    e = n * probs[support]
    statistic = float(((counts[support] - e) ** 2 / e).sum())
    df = int(support.sum()) - 1
    assert statistic < chi_square_critical(df)
    # and the test can fail: the untruncated distribution is rejected
    if top_p < 1 or top_k is not None:
        full = torch.softmax(logits[0].double() / temperature, -1).numpy()
        e_full = n * full
        wrong = float(((counts - e_full) ** 2 / e_full).sum())
        assert wrong > chi_square_critical(logits.shape[1] - 1)


def test_generator_makes_draws_reproducible(logits):
    a = sample(logits, generator=torch.Generator().manual_seed(5))
    b = sample(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_input_is_not_modified(logits):
    before = logits.clone()
    sample(logits, temperature=0.5, top_k=3, top_p=0.5)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_values_name_the_argument(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(logits, **kwargs)


def test_bad_types_and_shapes(logits):
    with pytest.raises(TypeError, match="top_k"):
        sample(logits, top_k=2.0)
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0])
    with pytest.raises(TypeError, match="logits"):
        sample(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        sample(torch.tensor([[0.0, float("nan")]]))
