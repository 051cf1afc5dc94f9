"""The blocked, threaded path of the numpy ``conv2d_im2col`` against the float64 oracle.

The shared conv tests use small inputs that fit in one block. Here the block size is
shrunk so that the same inputs are cut into bands of output rows or groups of images,
and the blocks are shared out among several threads: every split must give the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.numpy import conv as npconv
from companion.testing import assert_close

# (N, C_in, H, W, C_out, kH, kW, stride, padding, dilation, groups)
CASES = {
    "pad1": (3, 4, 9, 7, 5, 3, 3, 1, 1, 1, 1),
    "stride2-dilated": (2, 3, 11, 10, 4, 3, 2, 2, 1, (2, 1), 1),
    "groups2": (3, 4, 7, 5, 6, 3, 3, 1, "same", 1, 2),
    "one-row-output": (2, 2, 3, 8, 3, 3, 3, 1, 0, 1, 1),
}
# Bytes per block: one patch row (cut into bands of one row), a few rows, about one
# image.
CHUNK_BYTES = {"row": 1, "rows": 4096, "images": 20000}


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("chunk", list(CHUNK_BYTES))
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_and_threads_match_oracle(case, chunk, num_threads, rng, monkeypatch):
    N, C_in, H, W, C_out, kH, kW, stride, padding, dilation, groups = CASES[case]
    x = rng.standard_normal((N, C_in, H, W))
    weight = rng.standard_normal((C_out, C_in // groups, kH, kW))
    bias = rng.standard_normal(C_out)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    # float64
    oracle = npconv.conv2d_reference(x, weight, bias, **options)
    monkeypatch.setattr(npconv, "_CHUNK_BYTES", CHUNK_BYTES[chunk])
    out = npconv.conv2d_im2col(x, weight, bias, num_threads=num_threads, **options)
    assert_close(
        out, oracle, name=f"conv2d_im2col {case} blocks={chunk} threads={num_threads}"
    )


@pytest.mark.parametrize("chunk_bytes", [1, 500, 5000, 10**9])
def test_blocks_cover_every_output_row_once(chunk_bytes, monkeypatch):
    geo = npconv.conv2d_geometry((3, 2, 10, 6), (4, 2, 3, 3), padding=1)
    monkeypatch.setattr(npconv, "_CHUNK_BYTES", chunk_bytes)
    # (N, H_out)
    covered = np.zeros((geo.N, geo.H_out), dtype=int)
    for b0, b1, i0, i1 in npconv._output_chunks(geo, 2 * 9 * 4):
        covered[b0:b1, i0:i1] += 1
    assert (covered == 1).all(), (
        f"block size {chunk_bytes}: rows covered {covered.tolist()}"
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_num_threads_must_be_a_positive_int(bad, rng):
    x, weight = rng.standard_normal((1, 1, 4, 4)), rng.standard_normal((1, 1, 3, 3))
    with pytest.raises(ValueError, match="num_threads"):
        npconv.conv2d_im2col(x, weight, num_threads=bad)
