"""The digit images of :mod:`companion.digits`: shapes, determinism, the glyph where it
is said to be, errors."""

from __future__ import annotations

import numpy as np
import pytest

from companion.digits import DIGIT_FONT, digit_glyphs, digits_dataset
from companion.testing import assert_close


def test_font_has_ten_distinct_5x7_glyphs():
    assert len(DIGIT_FONT) == 10
    assert all(
        len(glyph) == 7 and all(len(row) == 5 for row in glyph) for glyph in DIGIT_FONT
    )
    glyphs = digit_glyphs()
    assert glyphs.shape == (10, 7, 5) and glyphs.dtype == np.float32
    flat = glyphs.reshape(10, -1)
    # Hamming distances (10, 10)
    distances = np.abs(flat[:, None] - flat[None, :]).sum(-1)
    assert (distances[~np.eye(10, dtype=bool)] >= 2).all(), (
        "every two digits differ in at least 2 pixels"
    )


@pytest.mark.parametrize(
    "image_size, scales",
    [(28, (3,)), (28, (2, 3, 4)), (7, (1,)), (16, (1, 2))],
    ids=["28-s3", "28-s234", "7-s1-edge", "16-s12"],
)
def test_shapes_dtypes_and_labels(image_size, scales):
    data = digits_dataset(200, image_size=image_size, scales=scales, seed=3)
    assert (
        data.images.shape == (200, 1, image_size, image_size)
        and data.images.dtype == np.float32
    )
    assert (
        data.labels.dtype == np.int64
        and data.labels.shape == (200,)
        and len(data) == 200
    )
    assert set(np.unique(data.labels)) == set(range(10))
    assert set(np.unique(data.scales)) <= set(scales)
    assert (data.offsets >= 0).all()
    assert (data.offsets[:, 0] + 7 * data.scales <= image_size).all()
    assert (data.offsets[:, 1] + 5 * data.scales <= image_size).all()


@pytest.mark.parametrize("scales", [(3,), (1, 2)], ids=["s3", "s12"])
def test_noiseless_image_is_the_enlarged_glyph_at_its_offset(scales):
    data = digits_dataset(30, image_size=28, scales=scales, noise=0.0, seed=1)
    glyphs = digit_glyphs()
    for image, label, (r, c), s in zip(
        data.images[:, 0], data.labels, data.offsets, data.scales
    ):
        patch = image[r : r + 7 * s, c : c + 5 * s]
        brightness = patch.max()
        assert 0.6 <= brightness <= 1.0
        expected = brightness * np.kron(glyphs[label], np.ones((s, s), np.float32))
        assert_close(patch, expected, rtol=0, atol=0, name=f"glyph {label}")
        outside = image.copy()
        outside[r : r + 7 * s, c : c + 5 * s] = 0
        assert not outside.any(), "no ink outside the glyph's box"


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = (
        digits_dataset(50, seed=7),
        digits_dataset(50, seed=7),
        digits_dataset(50, seed=8),
    )
    assert_close(a.images, b.images, rtol=0, atol=0, name="same seed")
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_noise_has_the_requested_scale():
    clean = digits_dataset(400, noise=0.0, seed=2).images
    noisy = digits_dataset(400, noise=0.3, seed=2).images
    assert_close(np.std(noisy - clean), 0.3, rtol=0.02, atol=0, name="noise std")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": 2.5}, "num_images"),
        ({"num_images": 4, "image_size": 20, "scales": (3,)}, "does not fit"),
        ({"num_images": 4, "scales": ()}, "scales"),
        ({"num_images": 4, "scales": (0,)}, "scales"),
        ({"num_images": 4, "scales": (1.5,)}, "scales"),
        ({"num_images": 4, "noise": -1.0}, "noise"),
    ],
    ids=[
        "zero",
        "float-count",
        "too-small",
        "no-scales",
        "zero-scale",
        "float-scale",
        "negative-noise",
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        digits_dataset(**kwargs)
