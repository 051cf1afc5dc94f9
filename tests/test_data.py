"""The synthetic data generators: shapes, dtypes, determinism, the split by position,
the answers."""

import numpy as np
import pytest

from companion.data import (
    SEQUENCE_TASKS,
    SHAPE_NAMES,
    sequence_task,
    shape_offsets,
    shape_patterns,
    shapes_dataset,
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
