"""The synthetic data generators: shapes, dtypes, determinism, the split by position,
the answers, and the two number languages of the translation chapter."""

import numpy as np
import pytest

from companion.data import (
    NUMBER_VOCABULARY,
    SEQUENCE_TASKS,
    SHAPE_NAMES,
    number_alignment,
    number_words,
    sequence_task,
    shape_offsets,
    shape_patterns,
    shapes_dataset,
    translation_pairs,
    translation_split,
)


@pytest.mark.parametrize("shape_size", [3, 5, 7])
def test_shape_patterns_are_four_distinct_binary_shapes(shape_size):
    patterns = shape_patterns(shape_size)
    assert patterns.shape == (len(SHAPE_NAMES), shape_size, shape_size)
    assert patterns.dtype == np.float32
    assert set(np.unique(patterns)) <= {0.0, 1.0}
    flat = patterns.reshape(len(SHAPE_NAMES), -1)
    assert len({row.tobytes() for row in flat}) == len(SHAPE_NAMES)


@pytest.mark.parametrize("shape_size", [2, 4, 0, True])
def test_shape_patterns_rejects_even_or_small_sizes(shape_size):
    with pytest.raises(ValueError, match="shape_size"):
        shape_patterns(shape_size)


@pytest.mark.parametrize("image_size, shape_size", [(12, 5), (16, 5), (7, 3), (6, 5)])
def test_offsets_split_columns_disjointly_and_completely(image_size, shape_size):
    rows_train, cols_train = shape_offsets("train", image_size, shape_size)
    rows_test, cols_test = shape_offsets("test", image_size, shape_size)
    _, cols_all = shape_offsets("all", image_size, shape_size)
    n = image_size - shape_size + 1
    np.testing.assert_array_equal(rows_train, np.arange(n))
    np.testing.assert_array_equal(rows_test, np.arange(n))
    assert not set(cols_train) & set(cols_test)
    assert sorted(set(cols_train) | set(cols_test)) == list(cols_all) == list(range(n))
    assert len(cols_train) >= 1 and len(cols_test) >= 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(split="val"),
        dict(image_size=5, shape_size=5),
        dict(num_images=0),
        dict(noise=-0.1),
    ],
    ids=["split", "too-small", "num_images", "noise"],
)
def test_shapes_dataset_rejects_bad_arguments(bad):
    kwargs = dict(num_images=4)
    kwargs.update(bad)
    with pytest.raises(ValueError):
        shapes_dataset(**kwargs)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_shapes_dataset_places_each_pattern_at_its_offset(split):
    data = shapes_dataset(
        40, split=split, image_size=12, shape_size=5, noise=0.0, seed=3
    )
    assert data.images.shape == (40, 1, 12, 12) and data.images.dtype == np.float32
    assert data.labels.shape == (40,) and data.labels.dtype == np.int64
    assert data.offsets.shape == (40, 2) and len(data) == 40
    _, columns = shape_offsets(split, 12, 5)
    assert set(data.offsets[:, 1]) <= set(columns)
    patterns = shape_patterns(5)
    for image, label, (r, c) in zip(data.images[:, 0], data.labels, data.offsets):
        expected = np.zeros((12, 12), np.float32)
        expected[r : r + 5, c : c + 5] = patterns[label]
        np.testing.assert_array_equal(image, expected)


def test_shapes_dataset_is_deterministic_in_the_seed():
    a, b = shapes_dataset(16, seed=7), shapes_dataset(16, seed=7)
    c = shapes_dataset(16, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_shapes_dataset_noise_has_the_requested_scale():
    data = shapes_dataset(200, image_size=12, noise=0.5, seed=0)
    clean = shapes_dataset(200, image_size=12, noise=0.0, seed=0)
    residual = data.images - clean.images
    assert abs(residual.std() - 0.5) < 0.02


@pytest.mark.parametrize("task", SEQUENCE_TASKS)
@pytest.mark.parametrize("length", [1, 5, 8])
def test_sequence_task_layout_and_answers(task, length):
    data = sequence_task(30, task=task, length=length, num_symbols=7, seed=1)
    assert data.tokens.shape == (30, 2 * length + 1) and data.tokens.dtype == np.int64
    assert (
        data.vocab_size == 8
        and data.separator == 7
        and data.prompt_length == length + 1
    )
    symbols = data.prompts[:, :length]
    assert (symbols >= 0).all() and (symbols < 7).all()
    assert (data.prompts[:, -1] == data.separator).all()
    expected = symbols[:, ::-1] if task == "reverse" else np.sort(symbols, axis=1)
    np.testing.assert_array_equal(data.answers, expected)


def test_sequence_task_is_deterministic_in_the_seed():
    np.testing.assert_array_equal(
        sequence_task(10, seed=2).tokens, sequence_task(10, seed=2).tokens
    )
    assert not np.array_equal(
        sequence_task(10, seed=2).tokens, sequence_task(10, seed=3).tokens
    )


@pytest.mark.parametrize(
    "bad",
    [dict(task="copy"), dict(length=0), dict(num_symbols=1), dict(num_sequences=0)],
    ids=["task", "length", "num_symbols", "num_sequences"],
)
def test_sequence_task_rejects_bad_arguments(bad):
    kwargs = dict(num_sequences=3)
    kwargs.update(bad)
    with pytest.raises(ValueError):
        sequence_task(**kwargs)


# --- translation: numbers in two languages ---------------------------------------
# Independent readers: each turns a sentence back into its number, written from the
# rules in the chapter's prose, not from the generator.
DIGITS_A = dict(zip("ka tu mi ro se pa no ve zu".split(), range(1, 10)))
DIGITS_B = dict(zip("an bo ce di el fo gu hi ix".split(), range(1, 10)))


def read_group(words, digits, tens_suffix, hundred):
    value = 0
    for k, word in enumerate(words):
        if word == hundred:
            continue
        if word == "und":
            continue
        if word.endswith(tens_suffix) and word[:2] in digits:
            value += 10 * digits[word[:2]]
        elif k + 1 < len(words) and words[k + 1] == hundred:
            value += 100 * digits[word]
        else:
            value += digits[word]
    return value


def read_a(words):
    if "kilo" in words:
        k = words.index("kilo")
        high, low = words[:k], words[k + 1 :]
    else:
        high, low = [], words
    return 1000 * read_group(high, DIGITS_A, "ti", "hun") + read_group(
        low, DIGITS_A, "ti", "hun"
    )


def read_b(words):
    if "mil" in words:
        k = words.index("mil")
        low, high = words[:k], words[k + 1 :]
    else:
        low, high = words, []
    return 1000 * read_group(high, DIGITS_B, "za", "hon") + read_group(
        low, DIGITS_B, "za", "hon"
    )


SAMPLE = [1, 7, 10, 11, 20, 21, 99, 100, 101, 110, 342017, 1000, 1001, 999999]
SAMPLE += list(np.random.default_rng(5).integers(1, 10**6, 300))


@pytest.mark.parametrize(
    "n, a, b",
    [
        (342017, "mi hun roti tu kilo kati no", "gu und anza mil bo und diza ce hon"),
        (7, "no", "gu"),
        (21, "tuti ka", "an und boza"),
        (100, "ka hun", "an hon"),
        (1000, "ka kilo", "mil an"),
        (999999, "zu hun zuti zu kilo zu hun zuti zu", "ix und ixza ix hon mil ix und "
         "ixza ix hon"),
    ],
)  # fmt: skip
def test_number_words_examples(n, a, b):
    assert " ".join(number_words(n, "a")) == a
    assert " ".join(number_words(n, "b")) == b


def test_number_words_read_back_to_the_number_in_both_languages():
    for n in SAMPLE:
        assert read_a(number_words(int(n), "a")) == n
        assert read_b(number_words(int(n), "b")) == n


# a word of A and the word of B that translates it
TRANSLATES = {a: b for a, b in zip(DIGITS_A, DIGITS_B)}
TRANSLATES |= {a + "ti": b + "za" for a, b in TRANSLATES.items()}
TRANSLATES |= {"hun": "hon", "kilo": "mil"}


def test_number_alignment_maps_each_word_of_b_to_the_word_it_translates():
    for n in SAMPLE:
        a, b = number_words(int(n), "a"), number_words(int(n), "b")
        alignment = number_alignment(int(n))
        assert len(alignment) == len(b)
        for word, i in zip(b, alignment):
            if word == "und":
                assert i == -1
            else:
                assert TRANSLATES[a[i]] == word
        # a bijection between A's words and B's words other than 'und'
        assert sorted(i for i in alignment if i >= 0) == list(range(len(a)))
    assert number_alignment(342017) == [6, -1, 5, 4, 3, -1, 2, 0, 1]


def test_number_vocabulary_has_specials_first_and_every_word():
    assert NUMBER_VOCABULARY[:3] == ("<pad>", "<bos>", "<eos>")
    assert len(NUMBER_VOCABULARY) == len(set(NUMBER_VOCABULARY)) == 44
    used = {w for n in SAMPLE for lang in "ab" for w in number_words(int(n), lang)}
    assert used == set(NUMBER_VOCABULARY[3:])


def test_translation_pairs_layout():
    numbers = np.array([342017, 7, 999999, 1000])
    source, target = translation_pairs(numbers)
    assert source.shape == (4, 9) and target.shape == (4, 13)
    assert source.dtype == target.dtype == np.int64
    for n, src, tgt in zip(numbers, source, target):
        a, b = number_words(int(n), "a"), number_words(int(n), "b")
        words_src = [NUMBER_VOCABULARY[i] for i in src]
        words_tgt = [NUMBER_VOCABULARY[i] for i in tgt]
        assert words_src == a + ["<pad>"] * (9 - len(a))
        assert words_tgt == ["<bos>", *b, "<eos>"] + ["<pad>"] * (11 - len(b))


def test_translation_pairs_default_lengths_fit_the_longest_sentences():
    longest_a = max(len(number_words(n, "a")) for n in range(1, 10**6, 37))
    longest_b = max(len(number_words(n, "b")) for n in range(1, 10**6, 37))
    assert (longest_a, longest_b) == (9, 11)
    translation_pairs(np.arange(1, 10**6, 37))  # no error


def test_translation_split_is_disjoint_in_range_and_deterministic():
    train, test = translation_split(1000, 200, seed=4)
    assert train.shape == (1000,) and test.shape == (200,)
    assert len(set(train.tolist()) | set(test.tolist())) == 1200
    assert train.min() >= 1 and max(train.max(), test.max()) < 10**6
    again, _ = translation_split(1000, 200, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, translation_split(1000, 200, seed=5)[0])


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: number_words(0, "a"), ValueError),
        (lambda: number_words(10**6, "a"), ValueError),
        (lambda: number_words(12.0, "a"), TypeError),
        (lambda: number_words(True, "a"), TypeError),
        (lambda: number_words(12, "c"), ValueError),
        (lambda: number_alignment(-3), ValueError),
        (lambda: translation_pairs([999999], source_length=8), ValueError),
        (lambda: translation_pairs([999999], target_length=12), ValueError),
        (lambda: translation_pairs([[1, 2]]), ValueError),
        (lambda: translation_split(0), ValueError),
    ],
    ids=[
        "zero", "million", "float", "bool", "language", "negative",
        "short-source", "short-target", "2-D", "no-train",
    ],
)  # fmt: skip
def test_translation_generators_reject_bad_arguments(call, error):
    with pytest.raises(error):
        call()
