"""The shared dense layer y_i = f(W x_i + b_i): hand gradients, training, and the
unshared twin."""

from __future__ import annotations

import numpy as np
import pytest

from companion import params
from companion.numpy import sharing
from companion.sources import run_source
from companion.testing import assert_close, numerical_gradient

ACTIVATIONS = sorted(sharing.ACTIVATIONS)
SHAPES = {"B1-P1": (1, 1, 3, 2), "B3-P5": (3, 5, 4, 3), "B2-P7-wide": (2, 7, 2, 6)}


def _arrays(shape, shared, rng):
    B, P, D_in, D_out = shape
    x = rng.standard_normal((B, P, D_in))
    weight = rng.standard_normal((D_out, D_in) if shared else (P, D_out, D_in))
    bias = rng.standard_normal((P, D_out))
    grad_y = rng.standard_normal((B, P, D_out))
    return x, weight, bias, grad_y


def _layer(shared):
    if shared:
        return sharing.shared_dense_forward, sharing.shared_dense_backward
    return sharing.unshared_dense_forward, sharing.unshared_dense_backward


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_is_the_formula_at_every_position(activation, rng):
    x, weight, bias, _ = _arrays(SHAPES["B3-P5"], True, rng)
    f, _ = sharing.ACTIVATIONS[activation]
    y = sharing.shared_dense_forward(x, weight, bias, activation=activation)
    for i in (0, 2, 4):  # y_i = f(W x_i + b_i), one position at a time, one example
        assert_close(y[1, i], f(weight @ x[1, i] + bias[i]), name=f"y_{i}")


def test_unshared_with_equal_matrices_is_the_shared_layer(rng):
    x, weight, bias, _ = _arrays(SHAPES["B3-P5"], True, rng)
    # W_i = W for all i
    copies = np.broadcast_to(weight, (x.shape[1], *weight.shape)).copy()
    assert_close(
        sharing.unshared_dense_forward(x, copies, bias),
        sharing.shared_dense_forward(x, weight, bias),
        name="unshared with tied W_i",
    )


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_backward_matches_torch_autograd(shared, activation, shape, rng):
    import torch

    forward, backward = _layer(shared)
    x, weight, bias, grad_y = _arrays(SHAPES[shape], shared, rng)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    torch_f = {
        "identity": lambda z: z,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
    }
    z = (tx @ tw.T if shared else torch.einsum("bpi,poi->bpo", tx, tw)) + tb
    y = torch_f[activation](z)
    assert_close(forward(x, weight, bias, activation=activation), y, name="forward")
    y.backward(torch.from_numpy(grad_y))
    dx, dweight, dbias = backward(grad_y, x, weight, bias, activation=activation)
    assert_close(dx, tx.grad, name="dx")
    assert_close(dweight, tw.grad, name="dweight")
    assert_close(dbias, tb.grad, name="dbias")


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_backward_matches_finite_differences(shared, activation, rng):
    forward, backward = _layer(shared)
    x, weight, bias, grad_y = _arrays(SHAPES["B3-P5"], shared, rng)

    def loss(x_, w_, b_):  # L = sum(G * y): dL/dy = G
        return float(np.sum(grad_y * forward(x_, w_, b_, activation=activation)))

    dx, dweight, dbias = backward(grad_y, x, weight, bias, activation=activation)
    for name, got, wrt in (
        ("dx", dx, lambda a: loss(a, weight, bias)),
        ("dweight", dweight, lambda a: loss(x, a, bias)),
        ("dbias", dbias, lambda a: loss(x, weight, a)),
    ):
        source = {"dx": x, "dweight": weight, "dbias": bias}[name]
        assert_close(
            got, numerical_gradient(wrt, source), rtol=1e-6, atol=1e-8, name=name
        )


def test_shared_gradient_is_the_sum_of_the_per_position_gradients(rng):
    """dL/dW of the shared layer = sum_i dL/dW_i of the unshared layer at W_i = W."""
    x, weight, bias, grad_y = _arrays(SHAPES["B2-P7-wide"], True, rng)
    copies = np.broadcast_to(weight, (x.shape[1], *weight.shape)).copy()
    _, dweight, _ = sharing.shared_dense_backward(grad_y, x, weight, bias)
    _, dweights, _ = sharing.unshared_dense_backward(grad_y, x, copies, bias)
    assert_close(dweight, dweights.sum(axis=0), name="shared gradient")


@pytest.mark.parametrize(
    "bad", ["x-2d", "weight-D_in", "bias-per-position", "unshared-P"]
)
def test_bad_shapes_raise(bad, rng):
    x, weight, bias, _ = _arrays(SHAPES["B3-P5"], True, rng)
    if bad == "x-2d":
        args, forward = (x[0], weight, bias), sharing.shared_dense_forward
    elif bad == "weight-D_in":
        args, forward = (x, weight[:, :-1], bias), sharing.shared_dense_forward
    elif bad == "bias-per-position":
        args, forward = (x, weight, bias[0]), sharing.shared_dense_forward
    else:
        args, forward = (
            (x, rng.standard_normal((4, 3, 4)), bias),
            sharing.unshared_dense_forward,
        )
    with pytest.raises(ValueError, match=r"shape"):
        forward(*args)


def test_unknown_activation_is_a_value_error(rng):
    x, weight, bias, _ = _arrays(SHAPES["B1-P1"], True, rng)
    with pytest.raises(ValueError, match="activation"):
        sharing.shared_dense_forward(x, weight, bias, activation="swish")


# --- training and what sharing buys ---------------------------------------------------


@pytest.fixture(scope="module")
def teacher_data():
    return sharing.make_shared_teacher_data(8, 6, 5, 3, rng=1)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_training_learns(shared, teacher_data):
    x, y, _, _ = teacher_data
    result = sharing.train_shared_dense(
        x, y, shared=shared, steps=300, learning_rate=0.1
    )
    assert len(result.losses) == 301
    assert result.losses[-1] < 0.05 * result.losses[0]
    assert all(b <= a + 1e-12 for a, b in zip(result.losses, result.losses[1:])), (
        "loss went up"
    )


def test_sharing_needs_fewer_parameters_and_generalises_from_few_examples(teacher_data):
    x, y, x_test, y_test = teacher_data
    B, P, D_in = x.shape
    D_out = y.shape[2]
    shared = sharing.train_shared_dense(x, y, shared=True)
    unshared = sharing.train_shared_dense(x, y, shared=False)
    assert (
        shared.num_parameters
        == params.dense_parameter_count(D_in, D_out, bias=False) + P * D_out
    )
    assert unshared.num_parameters == P * params.dense_parameter_count(D_in, D_out)
    # both fit the 8 training examples; only the shared one has seen 8 x 6 examples
    # of its W
    test_shared = sharing.dense_loss(shared.predict(x_test), y_test)
    test_unshared = sharing.dense_loss(unshared.predict(x_test), y_test)
    assert test_shared < 0.2 * test_unshared
    assert test_shared < 2.0 * shared.losses[-1] + 0.05


def test_training_does_not_modify_its_data(teacher_data):
    x, y, _, _ = teacher_data
    x_before, y_before = x.copy(), y.copy()
    sharing.train_shared_dense(x, y, steps=3)
    assert np.array_equal(x, x_before) and np.array_equal(y, y_before)


# --- the source document's loop, run as written ---------------------------------------


def test_source_training_loop_fails_on_its_shapes():
    """``np.dot(x, W)`` with x (10, 1) and W (10, 10): the source's loop never runs one
    step."""
    np.random.seed(0)
    with pytest.raises(ValueError, match=r"shapes \(10,1\) and \(10,10\) not aligned"):
        run_source("sharing_numpy")
