"""Every attention implementation of every backend against the numpy float64 reference.

The implementations come from :func:`companion.registry.implementations` (reference and
tiled, in numpy, torch and TensorFlow), so registering a fast path puts it under test
here. Sizes are the edge
cases: L = 1, primes, blocks that do not divide L, L != S (also L < S and L > S with
causal, whose first rows see nothing), H_kv = 1, H_kv = H and in between, bool and float
masks with fully masked rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from companion import registry
from companion.numpy import padding_mask, scaled_dot_product_attention_reference
from companion.testing import as_backend, assert_close, assert_close_to_oracle, to_numpy

DTYPES = {
    "numpy": ("float64", "float32", "float16"),
    "torch": ("float64", "float32", "float16"),
    "tensorflow": ("float64", "float32"),
}


IMPLEMENTATIONS = registry.implementations("attention")


@dataclass(frozen=True)
class Case:
    id: str
    batch: tuple
    H: int
    H_kv: int
    L: int
    S: int
    D: int
    D_v: int
    mask: str | None = None  # None, "bool", "float", "padding"
    causal: bool = False
    # (block_q, block_k) for tiled versions; None = their defaults
    blocks: tuple | None = (3, 4)
    window: int | None = None  # sliding window (causal) or band (not causal)

    def arrays(self, rng):
        """float64 query, key, value and mask; some rows see nothing."""
        query = rng.standard_normal((*self.batch, self.H, self.L, self.D))
        key = rng.standard_normal((*self.batch, self.H_kv, self.S, self.D))
        value = rng.standard_normal((*self.batch, self.H_kv, self.S, self.D_v))
        mask = None
        if self.mask == "bool":
            # shared by the heads
            mask = rng.random((*self.batch, 1, self.L, self.S)) < 0.7
            mask[..., 0, :] = False  # query 0 may attend to nothing
        elif self.mask == "float":
            # per head, broadcast over batch
            mask = rng.standard_normal((self.H, self.L, self.S))
            mask[rng.random(mask.shape) < 0.3] = -np.inf
            mask[:, -1, :] = -np.inf  # the last query may attend to nothing
        elif self.mask == "padding":
            lengths = np.arange(self.batch[0]) % self.S  # includes a length-0 sequence
            mask = padding_mask(lengths, self.S)  # (B, 1, 1, S)
        return query, key, value, mask


CASES = [
    Case("L1-S1", (1,), 1, 1, 1, 1, 4, 4),
    Case("prime-causal-gqa", (2,), 4, 2, 7, 7, 5, 3, causal=True),
    Case("L>S-causal", (1,), 3, 3, 13, 7, 4, 4, causal=True),
    Case("L<S-causal-mqa", (2,), 2, 1, 5, 13, 8, 8, causal=True),
    Case("bool-mask-mqa", (2,), 4, 1, 7, 11, 4, 6, mask="bool"),
    Case("bool-mask-causal", (), 6, 2, 13, 13, 3, 3, mask="bool", causal=True),
    Case("float-mask-causal", (1,), 2, 2, 13, 13, 4, 4, mask="float", causal=True),
    Case("padding", (3,), 2, 2, 6, 9, 4, 4, mask="padding"),
    Case("default-blocks", (1,), 2, 1, 67, 131, 16, 8, causal=True, blocks=None),
    Case("window-causal-gqa", (2,), 4, 2, 13, 13, 4, 4, causal=True, window=3),
    Case("window-causal-L<S", (1,), 2, 2, 5, 17, 4, 4, causal=True, window=4),
    Case("window-causal-L>S", (1,), 2, 1, 11, 6, 4, 4, causal=True, window=2),
    Case("window-band-L<S", (1,), 2, 2, 7, 12, 4, 3, window=3),
    Case("window-1-bool-mask", (2,), 4, 1, 9, 9, 4, 6, mask="bool", window=1),
    Case("window-float-mask", (1,), 2, 2, 13, 13, 4, 4, mask="float", window=5),
    Case(
        "window-default-blocks",
        (1,),
        2,
        2,
        70,
        70,
        8,
        8,
        causal=True,
        window=9,
        blocks=None,
    ),
]


def _params():
    for backend, name, function in IMPLEMENTATIONS:
        short = "reference" if name == registry.pair("attention").reference else name
        for dtype in DTYPES[backend]:
            for case in CASES:
                yield pytest.param(
                    backend,
                    name,
                    function,
                    dtype,
                    case,
                    id=f"{backend}-{short}-{dtype}-{case.id}",
                )


def _to_dtype(x, dtype):
    """Round to ``dtype`` (the backend's input) and back to float64 (the oracle's)."""
    if x is None or x.dtype == np.bool_:
        return x, x
    rounded = x.astype(dtype)
    return rounded, rounded.astype(np.float64)


@pytest.mark.parametrize("backend, name, function, dtype, case", list(_params()))
def test_attention_matches_float64_reference(backend, name, function, dtype, case, rng):
    arrays = case.arrays(rng)
    rounded, exact = zip(*(_to_dtype(a, dtype) for a in arrays))
    oracle = scaled_dot_product_attention_reference(
        *exact[:3], mask=exact[3], causal=case.causal, window=case.window
    )
    inputs = [as_backend(a, backend) if a is not None else None for a in rounded]
    kwargs = {"mask": inputs[3], "causal": case.causal}
    if case.window is not None:
        kwargs["window"] = case.window
    if name != registry.pair("attention").reference and case.blocks is not None:
        kwargs.update(block_q=case.blocks[0], block_k=case.blocks[1])
    output = to_numpy(function(*inputs[:3], **kwargs))

    assert output.dtype == np.dtype(dtype), (
        f"{backend}.{name} returned {output.dtype} for {dtype} input"
    )
    if dtype == "float64":
        assert_close(output, oracle, name=f"{backend}.{name}")
    else:
        baseline = scaled_dot_product_attention_reference(
            *rounded[:3], mask=rounded[3], causal=case.causal, window=case.window
        )
        assert_close_to_oracle(
            output, baseline, oracle, name=f"{backend}.{name} {dtype}"
        )
    if case.causal and case.L > case.S:  # queries 0 .. L - S - 1 see no key: exactly 0
        hidden_rows = output[..., : case.L - case.S, :]
        assert_close(
            hidden_rows,
            np.zeros_like(hidden_rows),
            rtol=0,
            atol=0,
            name="fully masked rows",
        )
