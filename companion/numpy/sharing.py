r"""The first source document's shared layer, :math:`y_i = f(W x_i + b_i)`, by hand in
numpy.

One weight matrix ``W`` serves every position ``i`` (each position keeps its own bias
``b_i``): parameter sharing across positions, the idea behind convolutions and the
position-wise layers of a transformer. Forward and backward passes are written out, a
training loop learns by gradient descent, and an *unshared* twin (one ``W_i`` per
position) shows what sharing saves: parameters, and the data needed to learn them.

Shapes: ``x (B, P, D_in)`` (batch, positions, features), ``W (D_out, D_in)``,
``b (P, D_out)`` -> ``y (B, P, D_out)``; unshared weights ``(P, D_out, D_in)``.

The source's own training loop, ``W += 0.01 * (y - x)``, is not a gradient step and
fails on its shapes (``np.dot`` of ``(10, 1)`` and ``(10, 10)``);
:func:`train_shared_dense` is the corrected loop. Explained in the book chapters
*Parameter sharing: algorithm and math* and *Parameter sharing in code*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from companion._checks import check_float

__all__ = [
    "ACTIVATIONS",
    "shared_dense_forward",
    "shared_dense_backward",
    "unshared_dense_forward",
    "unshared_dense_backward",
    "init_dense_params",
    "dense_loss",
    "make_shared_teacher_data",
    "TrainingResult",
    "train_shared_dense",
]


def _tanh_grad(z):
    return 1.0 - np.tanh(z) ** 2


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


#: ``name -> (f, f')`` for the activation ``f`` of the layer.
ACTIVATIONS = {
    "identity": (lambda z: z, np.ones_like),
    "tanh": (np.tanh, _tanh_grad),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        )
    return ACTIVATIONS[name]


def _check(x, weight, bias, *, shared: bool):
    x, weight, bias = (np.asarray(a) for a in (x, weight, bias))
    for name, a in (("x", x), ("weight", weight), ("bias", bias)):
        check_float(name, a.dtype)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, P, D_in), got shape {x.shape}")
    _, P, D_in = x.shape
    expected_w = "(D_out, D_in)" if shared else "(P, D_out, D_in)"
    w_ok = (
        (weight.ndim == 2 and weight.shape[1] == D_in)
        if shared
        else (weight.ndim == 3 and weight.shape[0] == P and weight.shape[2] == D_in)
    )
    if not w_ok:
        raise ValueError(
            f"weight must have shape {expected_w} with P={P}, D_in={D_in} (x "
            f"{x.shape}), "
            f"got shape {weight.shape}"
        )
    D_out = weight.shape[-2]
    if bias.shape != (P, D_out):
        raise ValueError(
            f"bias must have shape (P, D_out) = {(P, D_out)} (one bias per position), "
            f"got shape {bias.shape}"
        )
    return x, weight, bias


# --- shared: one W for every position -------------------------------------------------


def shared_dense_forward(x, weight, bias, *, activation: str = "tanh") -> np.ndarray:
    r"""The shared layer :math:`y_i = f(W x_i + b_i)` at every position ``i``.

    ``x (B, P, D_in)``, ``weight W (D_out, D_in)`` shared by all ``P`` positions,
    ``bias (P, D_out)`` one ``b_i`` per position -> ``y (B, P, D_out)``.
    ``activation``: a name of :data:`ACTIVATIONS`.
    """
    x, weight, bias = _check(x, weight, bias, shared=True)
    f, _ = _activation(activation)
    z = x @ weight.T + bias  # W x_i + b_i, (B, P, D_out)
    return f(z)  # y_i = f(z_i)


def shared_dense_backward(grad_y, x, weight, bias, *, activation: str = "tanh"):
    r"""Gradients of :func:`shared_dense_forward`, given ``grad_y = dL/dy (B, P,
    D_out)``.

    .. math::

        \delta_i = \frac{\partial L}{\partial y_i} \odot f'(W x_i + b_i), \quad
        \frac{\partial L}{\partial W}
            = \sum_{\text{batch}} \sum_{i=1}^{P} \delta_i\, x_i^{\top}, \quad
        \frac{\partial L}{\partial b_i} = \sum_{\text{batch}} \delta_i, \quad
        \frac{\partial L}{\partial x_i} = W^{\top} \delta_i

    The shared ``W`` collects a **sum over all positions**: each use adds its gradient.
    Returns ``(dx (B, P, D_in), dweight (D_out, D_in), dbias (P, D_out))``.
    """
    x, weight, bias = _check(x, weight, bias, shared=True)
    grad_y = np.asarray(grad_y)
    if grad_y.shape != x.shape[:2] + (weight.shape[0],):
        raise ValueError(
            "grad_y must have the output's shape (B, P, D_out) = "
            f"{x.shape[:2] + (weight.shape[0],)}, "
            f"got {grad_y.shape}"
        )
    _, f_grad = _activation(activation)
    z = x @ weight.T + bias  # (B, P, D_out), recomputed
    # delta_i = dL/dy_i * f'(z_i), (B, P, D_out)
    delta = grad_y * f_grad(z)
    # sum over batch and positions of delta_i x_i^T
    dweight = np.einsum("bpo,bpi->oi", delta, x)
    # sum over batch, one per position, (P, D_out)
    dbias = delta.sum(axis=0)
    dx = delta @ weight  # W^T delta_i, (B, P, D_in)
    return dx, dweight, dbias


# --- unshared: one W_i per position ---------------------------------------------------


def unshared_dense_forward(x, weights, bias, *, activation: str = "tanh") -> np.ndarray:
    r"""The unshared twin :math:`y_i = f(W_i x_i + b_i)`, one matrix per position.

    ``x (B, P, D_in)``, ``weights (P, D_out, D_in)``, ``bias (P, D_out)`` ->
    ``(B, P, D_out)``. ``P`` times the weights of :func:`shared_dense_forward`.
    """
    x, weights, bias = _check(x, weights, bias, shared=False)
    f, _ = _activation(activation)
    z = np.einsum("bpi,poi->bpo", x, weights) + bias  # W_i x_i + b_i, (B, P, D_out)
    return f(z)


def unshared_dense_backward(grad_y, x, weights, bias, *, activation: str = "tanh"):
    r"""Gradients of :func:`unshared_dense_forward`: each ``W_i`` sees only its own
    position.

    .. math::

        \frac{\partial L}{\partial W_i} = \sum_{\text{batch}} \delta_i\, x_i^{\top}

    Returns ``(dx (B, P, D_in), dweights (P, D_out, D_in), dbias (P, D_out))``.
    """
    x, weights, bias = _check(x, weights, bias, shared=False)
    grad_y = np.asarray(grad_y)
    if grad_y.shape != x.shape[:2] + (weights.shape[1],):
        raise ValueError(
            "grad_y must have the output's shape (B, P, D_out) = "
            f"{x.shape[:2] + (weights.shape[1],)}, "
            f"got {grad_y.shape}"
        )
    _, f_grad = _activation(activation)
    z = np.einsum("bpi,poi->bpo", x, weights) + bias  # (B, P, D_out)
    delta = grad_y * f_grad(z)  # (B, P, D_out)
    # per position: sum over batch of delta_i x_i^T
    dweights = np.einsum("bpo,bpi->poi", delta, x)
    dbias = delta.sum(axis=0)  # (P, D_out)
    dx = np.einsum("bpo,poi->bpi", delta, weights)  # W_i^T delta_i, (B, P, D_in)
    return dx, dweights, dbias


# --- training -------------------------------------------------------------------------


def init_dense_params(
    num_positions: int,
    in_features: int,
    out_features: int,
    *,
    shared: bool = True,
    rng=None,
):
    """Glorot-uniform weights and zero biases: ``(W (D_out, D_in) or (P, D_out, D_in), b
    (P, D_out))``.

    ``rng`` is a ``numpy.random.Generator`` or a seed.
    """
    rng = np.random.default_rng(rng)
    limit = np.sqrt(6.0 / (in_features + out_features))
    shape = (
        (out_features, in_features)
        if shared
        else (num_positions, out_features, in_features)
    )
    return rng.uniform(-limit, limit, size=shape), np.zeros(
        (num_positions, out_features)
    )


def dense_loss(prediction, target) -> float:
    r"""Mean squared error per example, :math:`L = \frac{1}{2B} \sum_{b,i,o} (\hat y -
    y)^2`."""
    prediction, target = np.asarray(prediction), np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {prediction.shape} and target {target.shape} must have one "
            "shape"
        )
    return float(0.5 * np.sum((prediction - target) ** 2) / prediction.shape[0])


def make_shared_teacher_data(
    num_samples: int,
    num_positions: int,
    in_features: int,
    out_features: int,
    *,
    num_test: int = 256,
    noise: float = 0.05,
    activation: str = "tanh",
    rng=None,
):
    r"""Data from a teacher that *is* a shared layer: ``y_i = f(W^* x_i + b^*_i) +
    noise``.

    Returns ``(x, y, x_test, y_test)``: ``num_samples`` training and ``num_test`` fresh
    test examples of the same teacher, ``x (n, P, D_in)``, ``y (n, P, D_out)``. With
    such data the shared layer has the right structure; the unshared one must learn the
    same ``W^*`` ``P`` times over, from ``P`` times fewer examples each.
    """
    rng = np.random.default_rng(rng)
    teacher_w = rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
    teacher_b = 0.1 * rng.standard_normal((num_positions, out_features))

    def sample(n):
        x = rng.standard_normal((n, num_positions, in_features))
        y = shared_dense_forward(x, teacher_w, teacher_b, activation=activation)
        return x, y + noise * rng.standard_normal(y.shape)

    x, y = sample(num_samples)
    x_test, y_test = sample(num_test)
    return x, y, x_test, y_test


@dataclass
class TrainingResult:
    """What :func:`train_shared_dense` returns: the learned parameters and the loss at
    every step."""

    weight: np.ndarray
    bias: np.ndarray
    losses: list[float] = field(default_factory=list)
    shared: bool = True

    @property
    def num_parameters(self) -> int:
        """The number of parameters learned, ``D_out D_in (+ P times that if unshared) +
        P D_out``."""
        return int(self.weight.size + self.bias.size)

    def predict(self, x, *, activation: str = "tanh") -> np.ndarray:
        """The trained layer applied to ``x (B, P, D_in)``."""
        forward = shared_dense_forward if self.shared else unshared_dense_forward
        return forward(x, self.weight, self.bias, activation=activation)


def train_shared_dense(
    x,
    y,
    *,
    shared: bool = True,
    steps: int = 300,
    learning_rate: float = 0.1,
    activation: str = "tanh",
    rng=0,
) -> TrainingResult:
    r"""Learn the layer by full-batch gradient descent on :func:`dense_loss`; the
    corrected source loop.

    Each step: forward, ``dL/dy = (y_hat - y) / B``, the hand backward pass, then
    :math:`W \leftarrow W - \eta\, \partial L / \partial W` (and the same for ``b``).
    ``shared=False`` trains the unshared twin on the same data. Returns a
    :class:`TrainingResult` whose ``losses`` has ``steps + 1`` entries (before each step
    and after the last).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"x (B, P, D_in) and y (B, P, D_out) must share B and P, got {x.shape} and "
            f"{y.shape}"
        )
    forward = shared_dense_forward if shared else unshared_dense_forward
    backward = shared_dense_backward if shared else unshared_dense_backward
    weight, bias = init_dense_params(
        x.shape[1], x.shape[2], y.shape[2], shared=shared, rng=rng
    )
    losses = []
    for _ in range(steps):
        # (B, P, D_out)
        prediction = forward(x, weight, bias, activation=activation)
        losses.append(dense_loss(prediction, y))
        # dL/dy_hat
        grad_y = (prediction - y) / x.shape[0]
        _, dweight, dbias = backward(grad_y, x, weight, bias, activation=activation)
        # a gradient step, not W += (y - x)
        weight = weight - learning_rate * dweight
        bias = bias - learning_rate * dbias
    losses.append(dense_loss(forward(x, weight, bias, activation=activation), y))
    return TrainingResult(weight, bias, losses, shared)
