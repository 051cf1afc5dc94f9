r"""Digit images drawn from a bitmap font defined here: a 10-class, 28 x 28 data set
that ships with the code.

The second source document's Keras CNN expects ``28 x 28 x 1`` images of 10 classes (the
shape of MNIST). MNIST must be downloaded; this generator needs nothing but numpy. Each
image is one of the digits 0-9 of a ``5 x 7`` bitmap font (:data:`DIGIT_FONT`), enlarged
by an integer factor, placed at a random position, with random brightness and Gaussian
noise:

.. math::

    X_n = a_n \cdot \operatorname{enlarge}_{s_n}(G_{y_n}) \text{ placed at } (r_n, c_n)
          + \sigma\, \varepsilon_n, \qquad \varepsilon_n \sim \mathcal{N}(0, I)

with the class ``y_n`` uniform over the ten digits, the factor ``s_n`` uniform over
``scales``, the offset ``(r_n, c_n)`` uniform over the positions where the enlarged
glyph fits, the brightness ``a_n`` uniform in ``[0.6, 1]`` and ``sigma = noise``. Images
are ``NCHW`` float32 with one channel (torch's layout; ``images.transpose(0, 2, 3, 1)``
is Keras's ``NHWC``). The same arguments give the same arrays.

Explained in the book chapter *Parameter sharing in code*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion._checks import check_int

__all__ = ["DIGIT_FONT", "digit_glyphs", "DigitsData", "digits_dataset"]

#: The ten digits as ``5 x 7`` bitmaps, ``"#"`` = ink, one string per row.
DIGIT_FONT = (
    (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),  # 0
    ("  #  ", " ##  ", "# #  ", "  #  ", "  #  ", "  #  ", "#####"),  # 1
    (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),  # 2
    ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),  # 3
    ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),  # 4
    ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),  # 5
    ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),  # 6
    ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),  # 7
    (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),  # 8
    (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),  # 9
)


def digit_glyphs() -> np.ndarray:
    """The glyphs of :data:`DIGIT_FONT` as float32 ``(10, 7, 5)`` arrays of 0 and 1
    (row-major, top row first)."""
    return np.array(
        [[[ch == "#" for ch in row] for row in glyph] for glyph in DIGIT_FONT],
        dtype=np.float32,
    )


@dataclass(frozen=True)
class DigitsData:
    """Digit images: ``images (N, 1, H, W)`` float32, ``labels (N,)`` int64 (the digit),
    ``offsets (N, 2)`` int64 (top-left row and column of the glyph), ``scales (N,)``
    int64
    (its enlargement factor)."""

    images: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    scales: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def digits_dataset(
    num_images: int,
    *,
    image_size: int = 28,
    scales=(3,),
    noise: float = 0.1,
    seed: int = 0,
) -> DigitsData:
    r"""``num_images`` images of the digits of :data:`DIGIT_FONT`, as in the module's
    equation.

    Parameters
    ----------
    num_images : int
        ``N``.
    image_size : int
        ``H = W``; every enlarged glyph ``(7 s, 5 s)`` must fit.
    scales : sequence of int
        The enlargement factors ``s`` to draw from.
    noise : float
        ``sigma >= 0``, the standard deviation of the added Gaussian noise.
    seed : int
        Seeds a ``numpy.random.Generator``; the same seed gives the same images.

    Returns
    -------
    DigitsData
    """
    num_images = check_int("num_images", num_images)
    image_size = check_int("image_size", image_size)
    scales = np.asarray(scales)
    if (
        scales.ndim != 1
        or scales.size == 0
        or scales.dtype.kind not in "iu"
        or scales.min() < 1
    ):
        raise ValueError(
            f"scales must be a non-empty sequence of positive ints, got {scales!r}"
        )
    if 7 * scales.max() > image_size:
        raise ValueError(
            f"a glyph enlarged {scales.max()}x is {7 * scales.max()} pixels tall and "
            "does not fit "
            f"image_size={image_size}"
        )
    noise = float(noise)
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    glyphs = digit_glyphs()  # (10, 7, 5)
    rng = np.random.default_rng(seed)
    labels = rng.integers(10, size=num_images)  # y_n, (N,)
    sizes = rng.choice(scales, size=num_images)  # s_n, (N,)
    # r_n uniform where the glyph fits, (N,)
    rows = rng.integers(image_size - 7 * sizes + 1)
    columns = rng.integers(image_size - 5 * sizes + 1)  # c_n, (N,)
    brightness = rng.uniform(0.6, 1.0, size=num_images).astype(np.float32)  # a_n, (N,)
    # (N, 1, H, W)
    images = np.zeros((num_images, 1, image_size, image_size), dtype=np.float32)
    for n in range(num_images):
        s = int(sizes[n])
        # enlarge_s(G_y), (7 s, 5 s)
        glyph = np.kron(glyphs[labels[n]], np.ones((s, s), dtype=np.float32))
        images[n, 0, rows[n] : rows[n] + 7 * s, columns[n] : columns[n] + 5 * s] = (
            brightness[n] * glyph
        )
    # + sigma * epsilon
    images += (noise * rng.standard_normal(images.shape)).astype(np.float32)
    return DigitsData(
        images=images,
        labels=labels.astype(np.int64),
        offsets=np.stack([rows, columns], axis=1).astype(np.int64),
        scales=sizes.astype(np.int64),
    )
