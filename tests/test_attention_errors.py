"""Bad input gets a clear error naming the argument and the shapes, in every backend.

Also: inputs are never modified, float32 stays float32, and float16 with large logits
stays finite (it accumulates in float32 and masks by selection, not by adding -1e9).
"""

from __future__ import annotations

import numpy as np
import pytest

from companion import registry
from companion.numpy import scaled_dot_product_attention_reference
from companion.testing import as_backend, assert_close, assert_close_to_oracle, to_numpy


def _ids(params):
    return [
        f"{backend}-{'reference' if name.endswith('_reference') else name}"
        for backend, name, _ in params
    ]


IMPLEMENTATIONS = registry.implementations("attention")
IDS = _ids(IMPLEMENTATIONS)
impls = pytest.mark.parametrize("backend, name, function", IMPLEMENTATIONS, ids=IDS)

# (id, query shape, key shape, value shape, mask shape or None,
#  words the message must contain)
BAD_SHAPES = [
    ("head-dims", (1, 2, 4, 8), (1, 2, 5, 6), (1, 2, 5, 6), None, "head dimension"),
    ("kv-lengths", (1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 6, 8), None, "length S"),
    ("kv-heads", (1, 4, 4, 8), (1, 2, 5, 8), (1, 1, 5, 8), None, "number of heads"),
    ("heads-not-divisible", (1, 3, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), None, "multiple"),
    (
        "mask-unbroadcastable",
        (1, 2, 4, 8),
        (1, 2, 5, 8),
        (1, 2, 5, 8),
        (3, 5),
        "broadcast",
    ),
    (
        "mask-grows-batch",
        (1, 2, 4, 8),
        (1, 2, 5, 8),
        (1, 2, 5, 8),
        (3, 1, 4, 5),
        "broadcast",
    ),
    ("rank-query", (4, 8), (1, 5, 8), (1, 5, 8), None, "axes"),
    ("rank-value", (1, 4, 8), (1, 5, 8), (5, 8), None, "axes"),
    (
        "batch-unbroadcastable",
        (2, 1, 4, 8),
        (3, 1, 5, 8),
        (3, 1, 5, 8),
        None,
        "broadcast",
    ),
]


@impls
@pytest.mark.parametrize("case", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_shapes_raise_value_error_naming_the_shapes(
    backend, name, function, case, rng
):
    _, q_shape, k_shape, v_shape, mask_shape, words = case
    query, key, value = (
        as_backend(rng.standard_normal(s), backend) for s in (q_shape, k_shape, v_shape)
    )
    mask = (
        None
        if mask_shape is None
        else as_backend(np.ones(mask_shape, dtype=bool), backend)
    )
    with pytest.raises(ValueError, match=words) as caught:
        function(query, key, value, mask=mask)
    message = str(caught.value)
    named = [
        s
        for s in (q_shape, k_shape, v_shape, mask_shape)
        if s is not None and str(s) in message
    ]
    assert named, f"the message names none of the shapes seen: {message}"


@impls
@pytest.mark.parametrize("bad", ["query", "key", "value"])
def test_integer_inputs_raise_type_error(backend, name, function, bad, rng):
    arrays = {n: rng.standard_normal((1, 2, 3, 4)) for n in ("query", "key", "value")}
    arrays[bad] = np.arange(24, dtype=np.int64).reshape(1, 2, 3, 4)
    inputs = [as_backend(arrays[n], backend) for n in ("query", "key", "value")]
    with pytest.raises(TypeError, match=bad):
        function(*inputs)


@impls
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_inputs_are_not_modified(backend, name, function, mask_kind, rng):
    query, key, value = (
        rng.standard_normal(s) for s in ((2, 4, 7, 3), (2, 2, 9, 3), (2, 2, 9, 5))
    )
    mask = rng.random((7, 9)) < 0.6
    if mask_kind == "float":
        mask = np.where(mask, rng.standard_normal((7, 9)), -np.inf)
    inputs = [as_backend(a, backend) for a in (query, key, value, mask)]
    before = [to_numpy(t).copy() for t in inputs]
    function(*inputs[:3], mask=inputs[3], causal=True)
    for label, tensor, copy in zip(("query", "key", "value", "mask"), inputs, before):
        after = to_numpy(tensor)
        # -inf entries of the float mask: compare where they are, then the rest
        if after.dtype.kind == "f":
            assert_close(
                np.isneginf(after),
                np.isneginf(copy),
                name=f"{label}'s -inf entries after the call",
            )
            after, copy = (
                np.nan_to_num(after, neginf=0.0),
                np.nan_to_num(copy, neginf=0.0),
            )
        assert_close(after, copy, rtol=0, atol=0, name=f"{label} after the call")


@impls
def test_float32_stays_float32(backend, name, function, rng):
    shapes = ((1, 2, 5, 4), (1, 1, 6, 4), (1, 1, 6, 3))
    inputs = [as_backend(rng.standard_normal(s), backend, "float32") for s in shapes]
    output = to_numpy(function(*inputs, causal=True, scale=0.5))
    assert output.dtype == np.float32


@impls
def test_float16_large_logits_stay_finite(backend, name, function, rng):
    # scores t q.k of order 1e4: exp overflows float16 above ~11, so this needs the max
    # subtracted and accumulation in float32.
    query = (100 * rng.uniform(-1, 1, (1, 2, 6, 4))).astype(np.float16)
    key = (100 * rng.uniform(-1, 1, (1, 2, 9, 4))).astype(np.float16)
    value = rng.standard_normal((1, 2, 9, 4)).astype(np.float16)
    mask = rng.random((6, 9)) < 0.7
    output = to_numpy(
        function(
            *(as_backend(a, backend) for a in (query, key, value)),
            mask=as_backend(mask, backend),
        )
    )
    assert output.dtype == np.float16
    assert np.isfinite(output).all(), (
        "float16 attention with large logits gave inf or NaN"
    )
    exact = [a.astype(np.float64) for a in (query, key, value)]
    oracle = scaled_dot_product_attention_reference(*exact, mask=mask)
    baseline = scaled_dot_product_attention_reference(query, key, value, mask=mask)
    assert_close_to_oracle(
        output, baseline, oracle, name=f"{backend}.{name} float16, large logits"
    )
