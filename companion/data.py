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
* :func:`translation_pairs`: numbers below one million written in two made-up
  languages with different word orders, as padded token ids for an encoder-decoder,
  and :func:`number_alignment`, which word of the source each target word translates.

Every generator takes a ``seed`` and returns the same arrays for the same arguments.

Explained in the book chapters *Applications: vision*, *Applications: language* and
*Applications: translation with cross-attention*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion._checks import check_int
from companion.corpora import corpus as corpus  # re-exported (issue 24)

__all__ = [
    "SHAPE_NAMES",
    "shape_patterns",
    "shape_offsets",
    "ShapesData",
    "shapes_dataset",
    "SEQUENCE_TASKS",
    "SequenceData",
    "sequence_task",
    "NUMBER_VOCABULARY",
    "number_words",
    "number_alignment",
    "translation_pairs",
    "translation_split",
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


# --- translation: numbers in two word orders ------------------------------------------
# [book: number languages]
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
A_DIGITS = tuple("ka tu mi ro se pa no ve zu".split())  # 1 ... 9 in language A
A_TENS = tuple(d + "ti" for d in A_DIGITS)  # 10 ... 90
B_DIGITS = tuple("an bo ce di el fo gu hi ix".split())  # 1 ... 9 in language B
B_TENS = tuple(d + "za" for d in B_DIGITS)
A_WORDS = A_DIGITS + A_TENS + ("hun", "kilo")  # 20 words
B_WORDS = B_DIGITS + B_TENS + ("und", "hon", "mil")  # 21 words
NUMBER_VOCABULARY = SPECIALS + A_WORDS + B_WORDS  # one shared vocabulary of 44
LANGUAGES = ("a", "b")


def _group_a(n: int, g: int) -> list:
    """(word, role) pairs of a group 0..999 in A: hundreds, 'hun', tens, units."""
    h, t, u = n // 100, n // 10 % 10, n % 10
    out = [(A_DIGITS[h - 1], (g, "h")), ("hun", (g, "hun"))] if h else []
    out += [(A_TENS[t - 1], (g, "t"))] if t else []
    return out + ([(A_DIGITS[u - 1], (g, "u"))] if u else [])


def _group_b(n: int, g: int) -> list:
    """The same group in B: units, 'und', tens, hundreds, 'hon'."""
    h, t, u = n // 100, n // 10 % 10, n % 10
    out = [(B_DIGITS[u - 1], (g, "u"))] if u else []
    out += [("und", None)] if u and t else []  # 'und' translates no word of A
    out += [(B_TENS[t - 1], (g, "t"))] if t else []
    return out + ([(B_DIGITS[h - 1], (g, "h")), ("hon", (g, "hun"))] if h else [])


def _pairs(n: int, language: str) -> list:
    high, low = divmod(n, 1000)
    if language == "a":  # thousands first, then 'kilo', then the lower group
        thousands = _group_a(high, 1) + [("kilo", "kilo")] if high else []
        return thousands + _group_a(low, 0)
    # lower group first, then 'mil', then the thousands
    return _group_b(low, 0) + ([("mil", "kilo")] + _group_b(high, 1) if high else [])


# [/book: number languages]


def _check_number(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    if not 1 <= n < 10**6:
        raise ValueError(f"n must be in 1 .. 999999, got {n}")
    return int(n)


def number_words(n: int, language: str) -> list[str]:
    """The number ``n`` (1 .. 999999) in language ``"a"`` or ``"b"``.

    A says thousands, ``kilo``, then hundreds (digit and ``hun``), tens and units,
    as English does. B says each group units first, ``und`` (between units and tens,
    as German says *zweiundvierzig*), tens, then hundreds (digit and ``hon``), and
    the lower group first, then ``mil`` and the thousands. 342017 is
    ``mi hun roti tu kilo kati no`` in A and ``gu und anza mil bo und diza ce hon``
    in B. All words are in ``NUMBER_VOCABULARY`` (44 tokens, ``<pad>, <bos>, <eos>``
    first).
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    return [word for word, _ in _pairs(_check_number(n), language)]


def number_alignment(n: int) -> list[int]:
    """For each word of ``number_words(n, "b")``, the position of the word of
    ``number_words(n, "a")`` it translates, or -1 for ``und`` (it translates none)."""
    n = _check_number(n)
    roles = [role for _, role in _pairs(n, "a")]
    return [-1 if role is None else roles.index(role) for _, role in _pairs(n, "b")]


def translation_pairs(
    numbers, *, source_length: int = 9, target_length: int = 13
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``numbers`` in A (the source) and B (the target), right-padded.

    Returns ``source (N, source_length)`` and ``target (N, target_length)`` int64; ids
    index ``NUMBER_VOCABULARY`` (0 = ``<pad>``). The target starts with ``<bos>`` (1)
    and ends with ``<eos>`` (2). The defaults fit every number: A needs at most 9 words,
    B at most 11 plus the two markers. A sentence that does not fit is a ``ValueError``.
    """
    source_length = check_int("source_length", source_length)
    target_length = check_int("target_length", target_length)
    numbers = np.asarray(numbers)
    if numbers.ndim != 1:
        raise ValueError(f"numbers must be 1-D, got shape {numbers.shape}")
    ids = {word: i for i, word in enumerate(NUMBER_VOCABULARY)}
    source = np.zeros((len(numbers), source_length), dtype=np.int64)  # (N, S)
    target = np.zeros((len(numbers), target_length), dtype=np.int64)  # (N, L)
    for row, n in enumerate(numbers.tolist()):
        a = [ids[w] for w in number_words(n, "a")]
        b = [ids["<bos>"], *(ids[w] for w in number_words(n, "b")), ids["<eos>"]]
        if len(a) > source_length or len(b) > target_length:
            raise ValueError(
                f"{n} needs source_length >= {len(a)} and target_length >= "
                f"{len(b)}, got {source_length} and {target_length}"
            )
        source[row, : len(a)] = a
        target[row, : len(b)] = b
    return source, target


def translation_split(
    num_train: int = 11000, num_test: int = 500, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random ``train`` and ``test`` numbers from 1 .. 999999 (int64), drawn
    without replacement; deterministic in ``seed``."""
    num_train = check_int("num_train", num_train)
    num_test = check_int("num_test", num_test)
    rng = np.random.default_rng(seed)
    numbers = rng.choice(np.arange(1, 10**6), num_train + num_test, replace=False)
    return numbers[:num_train], numbers[num_train:]
