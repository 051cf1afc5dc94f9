r"""Small synthetic data sets, generated on the fly (numpy only, no framework, nothing
downloaded).

* :func:`shapes_dataset`: grayscale images of one of four small shapes (a plus, a cross,
  a square outline, a diamond) placed at a random position, with a **split by
  position**: the ``"train"`` split places a shape only in the left part of the image,
  the ``"test"`` split only at column offsets the training split never uses. A network
  that shares its weights across positions (a convolution) can recognise a shape where
  it never saw one; a network with weights per position (a dense layer, a locally
  connected layer) cannot.
* :func:`sequence_task`: token sequences ``symbols, separator, answer`` for a tiny
  language model, where the answer is the symbols reversed or sorted.

Every generator takes a ``seed`` and returns the same arrays for the same arguments.

Explained in the book chapters *Applications: vision* and *Applications: language*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion._checks import check_int

__all__ = [
    "SHAPE_NAMES",
    "shape_patterns",
    "shape_offsets",
    "ShapesData",
    "shapes_dataset",
    "SEQUENCE_TASKS",
    "SequenceData",
    "sequence_task",
]

SHAPE_NAMES = ("plus", "cross", "square", "diamond")
SPLITS = ("train", "test", "all")
SEQUENCE_TASKS = ("reverse", "sort")


# --- images: shapes at positions ------------------------------------------------------


def shape_patterns(shape_size: int = 5) -> np.ndarray:
    """The four shapes of :data:`SHAPE_NAMES` drawn on ``shape_size x shape_size``
    grids.

    Returns ``(4, shape_size, shape_size)`` float32 of 0 and 1: a plus (middle row and
    column), a cross (both diagonals), a square outline (the border) and a diamond
    (``|i - c| + |j - c| = c`` with ``c`` the centre). ``shape_size`` must be odd and >=
    3 so that every shape has a centre and the four differ.
    """
    size = check_int("shape_size", shape_size, minimum=3)
    if size % 2 == 0:
        raise ValueError(
            f"shape_size must be odd (the shapes need a centre pixel), got {size}"
        )
    c = size // 2
    i, j = np.indices((size, size))  # (size, size) each
    plus = (i == c) | (j == c)
    cross = (i == j) | (i + j == size - 1)
    square = (i == 0) | (j == 0) | (i == size - 1) | (j == size - 1)
    diamond = np.abs(i - c) + np.abs(j - c) == c
    # (4, size, size)
    return np.stack([plus, cross, square, diamond]).astype(np.float32)


def shape_offsets(
    split: str, image_size: int = 16, shape_size: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Allowed top-left offsets ``(rows, columns)`` of a shape in ``split``.

    A ``shape_size`` shape fits at ``n = image_size - shape_size + 1`` offsets along
    each axis. Rows: all ``n`` in every split. Columns: ``"train"`` takes the first
    ``n // 2`` (the left part of the image), ``"test"`` the other ``n - n // 2``, which
    the training split never uses, and ``"all"`` every column. Returns two int arrays.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    image_size = check_int("image_size", image_size)
    shape_size = check_int("shape_size", shape_size)
    n = image_size - shape_size + 1
    if n < 2:
        raise ValueError(
            f"image_size={image_size} must exceed shape_size={shape_size} so that "
            "there are at least "
            f"two column offsets to split between train and test"
        )
    rows = np.arange(n)
    columns = {
        "train": np.arange(n // 2),
        "test": np.arange(n // 2, n),
        "all": np.arange(n),
    }[split]
    return rows, columns


@dataclass(frozen=True)
class ShapesData:
    """Images of shapes: ``images (N, 1, H, W)`` float32, ``labels (N,)`` int64 (index
    into
    :data:`SHAPE_NAMES`), ``offsets (N, 2)`` int64 (top-left row and column of each
    shape)."""

    images: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def shapes_dataset(
    num_images: int,
    *,
    split: str = "train",
    image_size: int = 16,
    shape_size: int = 5,
    noise: float = 0.1,
    seed: int = 0,
) -> ShapesData:
    r"""``num_images`` images, each one shape of :func:`shape_patterns` at an offset of
    ``split``.

    .. math::

        X_n = P_{y_n} \text{ placed at } (r_n, c_n) + \sigma\, \varepsilon_n, \qquad
        \varepsilon_n \sim \mathcal{N}(0, I)

    with ``y_n`` uniform over the four shapes, ``(r_n, c_n)`` uniform over
    :func:`shape_offsets` ``(split)`` and ``sigma = noise``. Images are ``NCHW`` with
    one channel (torch's layout). Deterministic in ``seed``; different splits or seeds
    give independent draws.
    """
    num_images = check_int("num_images", num_images)
    noise = float(noise)
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rows, columns = shape_offsets(split, image_size, shape_size)
    patterns = shape_patterns(shape_size)  # (4, k, k)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(SHAPE_NAMES), size=num_images)  # (N,)
    # (N, 2)
    offsets = np.stack(
        [rng.choice(rows, size=num_images), rng.choice(columns, size=num_images)],
        axis=1,
    )
    # (N, 1, H, W)
    images = np.zeros((num_images, 1, image_size, image_size), dtype=np.float32)
    for n, ((r, c), label) in enumerate(zip(offsets, labels)):
        # P_{y_n} at (r_n, c_n)
        images[n, 0, r : r + shape_size, c : c + shape_size] = patterns[label]
    # + sigma * epsilon
    images += (noise * rng.standard_normal(images.shape)).astype(np.float32)
    return ShapesData(
        images=images, labels=labels.astype(np.int64), offsets=offsets.astype(np.int64)
    )


# --- sequences: reverse or sort -------------------------------------------------------


@dataclass(frozen=True)
class SequenceData:
    """Token sequences ``symbols, separator, answer`` for a decoder-only language model.

    ``tokens (N, 2 * length + 1)`` int64; symbols are ``0 .. num_symbols - 1`` and the
    separator is ``num_symbols``, so ``vocab_size = num_symbols + 1``. The prompt is the
    first ``length + 1`` tokens (symbols and separator), the answer the last ``length``.
    """

    tokens: np.ndarray
    length: int
    num_symbols: int
    task: str

    @property
    def separator(self) -> int:
        """The separator token id, ``num_symbols``."""
        return self.num_symbols

    @property
    def vocab_size(self) -> int:
        """``V = num_symbols + 1``."""
        return self.num_symbols + 1

    @property
    def prompt_length(self) -> int:
        """``length + 1``: the symbols and the separator."""
        return self.length + 1

    @property
    def prompts(self) -> np.ndarray:
        """``(N, length + 1)``: what the model is given."""
        return self.tokens[:, : self.prompt_length]

    @property
    def answers(self) -> np.ndarray:
        """``(N, length)``: what it must produce."""
        return self.tokens[:, self.prompt_length :]

    def __len__(self) -> int:
        return len(self.tokens)


def sequence_task(
    num_sequences: int,
    *,
    task: str = "reverse",
    length: int = 8,
    num_symbols: int = 10,
    seed: int = 0,
) -> SequenceData:
    """``num_sequences`` random symbol strings and their answers under ``task``.

    ``task="reverse"``: the answer is the symbols in reverse order; ``task="sort"``: in
    ascending order. Symbols are drawn uniformly (with repetition) from
    ``0 .. num_symbols - 1``. Deterministic in ``seed``. See :class:`SequenceData` for
    the layout of the tokens.
    """
    if task not in SEQUENCE_TASKS:
        raise ValueError(f"task must be one of {SEQUENCE_TASKS}, got {task!r}")
    num_sequences = check_int("num_sequences", num_sequences)
    length = check_int("length", length)
    num_symbols = check_int("num_symbols", num_symbols, minimum=2)
    rng = np.random.default_rng(seed)
    symbols = rng.integers(num_symbols, size=(num_sequences, length))  # (N, length)
    # (N, length)
    answers = symbols[:, ::-1] if task == "reverse" else np.sort(symbols, axis=1)
    separator = np.full((num_sequences, 1), num_symbols)  # (N, 1)
    # (N, 2 * length + 1)
    tokens = np.concatenate([symbols, separator, answers], axis=1).astype(np.int64)
    return SequenceData(
        tokens=tokens, length=length, num_symbols=num_symbols, task=task
    )
