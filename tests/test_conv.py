"""conv2d in all three namespaces against the numpy float64 oracle, torch's and
TensorFlow's built-ins.

The oracle is :func:`companion.numpy.conv2d_reference` in float64. The built-ins
(``torch.nn.functional.conv2d``, ``tf.nn.conv2d`` through one NHWC helper) are checked
against the same oracle, so that the oracle itself is proved to mean what torch means.
Implementations are looked up lazily, by name, in each backend namespace: a backend that
does not offer a registered name yet is skipped, nothing else is.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion import registry
from companion._checks import conv2d_geometry
from companion.numpy import conv as npconv
from companion.testing import (
    as_backend,
    assert_close,
    assert_close_to_oracle,
    numerical_gradient,
    to_numpy,
)

PAIR = registry.pair("conv2d")
NAMES = (PAIR.reference, *PAIR.fast)

# (N, C_in, H, W, C_out, kH, kW, stride, padding, dilation, groups, bias): odd and prime
# sizes,
# 1x1 and non-square kernels, kernel == padded input, "same" with odd and even kernels.
CASES = {
    "basic3x3": (2, 3, 7, 7, 4, 3, 3, 1, 0, 1, 1, True),
    "pad1-nobias": (1, 2, 5, 6, 3, 3, 3, 1, 1, 1, 1, False),
    "stride2-odd": (2, 3, 9, 7, 2, 3, 3, 2, 1, 1, 1, True),
    "stride-pair": (1, 2, 11, 8, 3, 3, 2, (2, 1), (0, 2), 1, 1, True),
    "dilation2": (1, 2, 9, 10, 3, 3, 3, 1, 2, 2, 1, True),
    "dilation-stride": (2, 2, 13, 11, 2, 3, 2, 2, 1, (2, 3), 1, False),
    "groups2": (2, 4, 6, 5, 6, 3, 3, 1, 1, 1, 2, True),
    "depthwise": (1, 3, 7, 5, 3, 3, 3, 1, "same", 1, 3, True),
    "same-even-kernel": (1, 2, 5, 7, 3, 2, 4, 1, "same", 1, 1, True),
    "same-dilated": (1, 2, 6, 5, 2, 3, 2, 1, "same", 2, 1, False),
    "valid": (2, 3, 5, 8, 2, 3, 5, 1, "valid", 1, 1, True),
    "1x1": (2, 5, 3, 4, 7, 1, 1, 1, 0, 1, 1, True),
    "kernel-fills-input": (1, 2, 3, 4, 2, 3, 4, 1, 0, 1, 1, True),
    "one-pixel": (1, 1, 1, 1, 2, 3, 3, 1, 1, 1, 1, True),
}
DTYPES = ("float32", "float64")


def _case_arrays(case: str, rng):
    N, C_in, H, W, C_out, kH, kW, stride, padding, dilation, groups, has_bias = CASES[
        case
    ]
    x = rng.standard_normal((N, C_in, H, W))
    weight = rng.standard_normal((C_out, C_in // groups, kH, kW))
    bias = rng.standard_normal(C_out) if has_bias else None
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, bias, options


def _implementation(backend: str, name: str):
    """The function ``name`` of ``companion.<backend>`` (tests/test_namespaces.py checks
    they all exist)."""
    return getattr(registry.namespace(backend), name)


def _run(backend: str, name: str, x, weight, bias, dtype: str, **options):
    """Convert the numpy inputs to ``backend`` in ``dtype``, run, and return a numpy
    array."""
    function = _implementation(backend, name)
    args = [as_backend(a, backend, dtype) for a in (x, weight)]
    b = None if bias is None else as_backend(bias, backend, dtype)
    return function(*args, b, **options)


def builtin_conv2d(
    framework: str, x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1
):
    """``torch.nn.functional.conv2d`` or ``tf.nn.conv2d`` on NCHW/OIHW numpy arrays;
    numpy NCHW out.

    TensorFlow wants ``NHWC`` inputs and ``HWIO`` filters and explicit per-side padding;
    the transposes live here, once. The padding comes from the shared geometry check, so
    ``"same"`` means torch's rule for both.
    """
    if framework == "torch":
        import torch

        t = {
            k: None if v is None else torch.from_numpy(np.ascontiguousarray(v))
            for k, v in (("x", x), ("w", weight), ("b", bias))
        }
        import warnings

        # torch warns that even kernels with "same" need a padded copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = torch.nn.functional.conv2d(
                t["x"],
                t["w"],
                t["b"],
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
            )
        return out.numpy()
    if framework == "tensorflow":
        # silences TF before import
        import tensorflow as tf  # noqa: F401

        geo = conv2d_geometry(
            x.shape,
            weight.shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
        )
        top, bottom, left, right = geo.pad
        x_nhwc = tf.constant(x.transpose(0, 2, 3, 1))  # (N, H, W, C_in)
        # (kH, kW, C_in/g, C_out)
        w_hwio = tf.constant(weight.transpose(2, 3, 1, 0))
        out = tf.nn.conv2d(
            x_nhwc,
            w_hwio,
            strides=[1, *geo.stride, 1],
            padding=[[0, 0], [top, bottom], [left, right], [0, 0]],
            dilations=[1, *geo.dilation, 1],
            data_format="NHWC",
        )
        if bias is not None:
            out = tf.nn.bias_add(out, tf.constant(bias))
        # (N, C_out, H_out, W_out)
        return out.numpy().transpose(0, 3, 1, 2)
    raise ValueError(f"framework must be 'torch' or 'tensorflow', got {framework!r}")


# --- every implementation against the float64 oracle ----------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "backend,name",
    [(b, n) for b in registry.BACKENDS for n in NAMES],
    ids=[f"{b}-{n}" for b in registry.BACKENDS for n in NAMES],
)
def test_conv2d_matches_oracle(backend, name, dtype, case, rng):
    x, weight, bias, options = _case_arrays(case, rng)
    oracle = npconv.conv2d_reference(x, weight, bias, **options)  # float64
    out = _run(backend, name, x, weight, bias, dtype, **options)
    assert to_numpy(out).dtype == np.dtype(dtype), (
        f"{backend}.{name} returned {to_numpy(out).dtype} for {dtype}"
    )
    if dtype == "float64":
        assert_close(out, oracle, name=f"{backend}.{name}")
    else:
        cast = [None if a is None else a.astype(dtype) for a in (x, weight, bias)]
        # plain loops, same dtype
        baseline = npconv.conv2d_reference(*cast, **options)
        assert_close_to_oracle(out, baseline, oracle, name=f"{backend}.{name} {dtype}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_builtin_conv2d_matches_oracle(framework, dtype, case, rng):
    """The oracle means what torch's and TensorFlow's conv2d mean."""
    x, weight, bias, options = _case_arrays(case, rng)
    oracle = npconv.conv2d_reference(x, weight, bias, **options)
    cast = [None if a is None else a.astype(dtype) for a in (x, weight, bias)]
    out = builtin_conv2d(framework, *cast, **options)
    if dtype == "float64":
        assert_close(out, oracle, name=f"{framework} conv2d")
    else:
        baseline = npconv.conv2d_reference(*cast, **options)
        assert_close_to_oracle(
            out, baseline, oracle, factor=4.0, name=f"{framework} conv2d {dtype}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_float16_accumulates_in_float32_and_returns_float16(name, rng):
    x, weight, bias, options = _case_arrays("groups2", rng)
    out = getattr(npconv, name)(
        x.astype(np.float16),
        weight.astype(np.float16),
        bias.astype(np.float16),
        **options,
    )
    assert out.dtype == np.float16
    oracle = npconv.conv2d_reference(
        x.astype(np.float16).astype(np.float64),
        weight.astype(np.float16).astype(np.float64),
        bias.astype(np.float16).astype(np.float64),
        **options,
    )
    # one float16 rounding of the float32 sum: half an ulp of the largest output,
    # relative 2^-11
    assert_close(
        out, oracle, rtol=2.0**-10, atol=2.0**-10 * np.abs(oracle).max(), name=name
    )


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_not_modified(name, rng):
    x, weight, bias, options = _case_arrays("stride2-odd", rng)
    copies = [a.copy() for a in (x, weight, bias)]
    getattr(npconv, name)(x, weight, bias, **options)
    for before, after in zip(copies, (x, weight, bias)):
        assert np.array_equal(before, after)


# --- bad input: the same clear errors in every namespace ------------------------------

BAD = {
    "groups-do-not-divide-C_in": (
        (1, 3, 5, 5),
        (4, 1, 3, 3),
        None,
        dict(groups=2),
        ValueError,
        "groups",
    ),
    "weight-channels-mismatch": (
        (1, 4, 5, 5),
        (4, 3, 3, 3),
        None,
        {},
        ValueError,
        "C_in",
    ),
    "groups-do-not-divide-C_out": (
        (1, 4, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(groups=2),
        ValueError,
        "groups",
    ),
    "kernel-larger-than-input": (
        (1, 2, 4, 4),
        (3, 2, 5, 5),
        None,
        {},
        ValueError,
        "larger",
    ),
    "dilated-kernel-too-large": (
        (1, 2, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(dilation=3),
        ValueError,
        "larger",
    ),
    "bias-shape": ((1, 2, 5, 5), (3, 2, 3, 3), (2,), {}, ValueError, "bias"),
    "same-with-stride": (
        (1, 2, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(stride=2, padding="same"),
        ValueError,
        "same",
    ),
    "unknown-padding": (
        (1, 2, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(padding="full"),
        ValueError,
        "padding",
    ),
    "negative-padding": (
        (1, 2, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(padding=-1),
        ValueError,
        "padding",
    ),
    "zero-stride": (
        (1, 2, 5, 5),
        (3, 2, 3, 3),
        None,
        dict(stride=0),
        ValueError,
        "stride",
    ),
    "x-not-4d": ((2, 5, 5), (3, 2, 3, 3), None, {}, ValueError, "x"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize(
    "backend,name",
    [(b, n) for b in registry.BACKENDS for n in NAMES],
    ids=[f"{b}-{n}" for b in registry.BACKENDS for n in NAMES],
)
def test_bad_input_raises_clear_error(backend, name, bad, rng):
    x_shape, w_shape, b_shape, options, error, word = BAD[bad]
    x, weight = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    bias = None if b_shape is None else rng.standard_normal(b_shape)
    with pytest.raises(error, match=word):
        _run(backend, name, x, weight, bias, "float64", **options)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_are_a_type_error(name, rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    weight = rng.standard_normal((3, 2, 3, 3))
    with pytest.raises(TypeError, match="one dtype"):
        getattr(npconv, name)(x, weight)


# --- the source document's formula and the flip ---------------------------------------


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_corr2d_is_the_single_channel_conv2d(backend, rng):
    x, kernel = rng.standard_normal((6, 7)), rng.standard_normal((3, 2))
    corr2d = _implementation(backend, "corr2d")
    out = corr2d(as_backend(x, backend), as_backend(kernel, backend))
    expected = npconv.conv2d_reference(x[None, None], kernel[None, None])[0, 0]
    assert_close(out, expected, name=f"{backend}.corr2d")


def test_corr2d_is_the_source_formula_written_out(rng):
    """Y[i, j] = sum_m sum_n X[i+m, j+n] K[m, n], element by element."""
    x, kernel = rng.standard_normal((5, 4)), rng.standard_normal((2, 3))
    out = npconv.corr2d(x, kernel)
    i, j = 2, 1
    assert_close(
        out[i, j],
        sum(x[i + m, j + n] * kernel[m, n] for m in range(2) for n in range(3)),
    )


def test_convolution_flips_the_kernel(rng):
    x, kernel = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    flipped = npconv.convolve2d(x, kernel)
    assert_close(flipped, npconv.corr2d(x, kernel[::-1, ::-1]), name="convolve2d")
    # an asymmetric kernel: they differ
    assert np.abs(flipped - npconv.corr2d(x, kernel)).max() > 1e-3
    symmetric = kernel + kernel[::-1, ::-1]
    assert_close(
        npconv.convolve2d(x, symmetric),
        npconv.corr2d(x, symmetric),
        name="symmetric kernel",
    )


def test_convolve2d_matches_the_definition_by_impulse():
    """Convolving an impulse reproduces the kernel itself (correlation gives it
    flipped)."""
    impulse = np.zeros((5, 5))
    impulse[2, 2] = 1.0
    kernel = np.arange(9.0).reshape(3, 3)
    padded = np.pad(impulse, 2)
    assert_close(
        npconv.convolve2d(padded, kernel)[2:5, 2:5],
        kernel,
        name="convolution of an impulse",
    )
    assert_close(
        npconv.corr2d(padded, kernel)[2:5, 2:5],
        kernel[::-1, ::-1],
        name="correlation of an impulse",
    )


# --- output size ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_output_size_matches_output_shape(case, rng):
    x, weight, bias, options = _case_arrays(case, rng)
    size = npconv.conv2d_output_size(
        x.shape[2:],
        weight.shape[2:],
        stride=options["stride"],
        padding=options["padding"],
        dilation=options["dilation"],
    )
    assert size == builtin_conv2d("torch", x, weight, bias, **options).shape[2:]


# --- the backward pass ----------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "basic3x3",
        "stride2-odd",
        "dilation-stride",
        "groups2",
        "same-even-kernel",
        "kernel-fills-input",
        "one-pixel",
    ],
)
def test_conv2d_backward_matches_torch_autograd(case, rng):
    import torch

    x, weight, bias, options = _case_arrays(case, rng)
    bias = rng.standard_normal(weight.shape[0])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    out = torch.nn.functional.conv2d(tx, tw, tb, **options)
    grad_out = rng.standard_normal(tuple(out.shape))
    out.backward(torch.from_numpy(grad_out))
    dx, dweight, dbias = npconv.conv2d_backward(grad_out, x, weight, **options)
    assert_close(dx, tx.grad, name="dx")
    assert_close(dweight, tw.grad, name="dweight")
    assert_close(dbias, tb.grad, name="dbias")


@pytest.mark.parametrize("case", ["stride-pair", "groups2", "dilation2"])
def test_conv2d_backward_matches_finite_differences(case, rng):
    N, C_in, H, W, C_out, kH, kW, stride, padding, dilation, groups, _ = CASES[case]
    x = rng.standard_normal((1, C_in, min(H, 7), min(W, 7)))
    weight = rng.standard_normal((C_out, C_in // groups, kH, kW))
    bias = rng.standard_normal(C_out)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    grad_out = rng.standard_normal(
        npconv.conv2d_reference(x, weight, bias, **options).shape
    )

    def loss(x_, w_, b_):  # L = sum(G * Y): its gradient with respect to Y is G
        return float(np.sum(grad_out * npconv.conv2d_reference(x_, w_, b_, **options)))

    dx, dweight, dbias = npconv.conv2d_backward(grad_out, x, weight, **options)
    assert_close(
        dx,
        numerical_gradient(lambda a: loss(a, weight, bias), x),
        rtol=1e-6,
        atol=1e-7,
        name="dx",
    )
    assert_close(
        dweight,
        numerical_gradient(lambda a: loss(x, a, bias), weight),
        rtol=1e-6,
        atol=1e-7,
        name="dweight",
    )
    assert_close(
        dbias,
        numerical_gradient(lambda a: loss(x, weight, a), bias),
        rtol=1e-6,
        atol=1e-7,
        name="dbias",
    )


def test_conv2d_backward_rejects_wrong_grad_shape(rng):
    x, weight = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    with pytest.raises(ValueError, match="grad_out"):
        npconv.conv2d_backward(np.zeros((1, 3, 5, 5)), x, weight)


# --- the same receptive fields without sharing ----------------------------------------


@pytest.mark.parametrize(
    "stride,padding", [(1, 0), (2, 1), ((1, 2), "valid"), (1, "same")]
)
def test_locally_connected_with_tied_kernels_is_a_convolution(stride, padding, rng):
    x = rng.standard_normal((2, 3, 7, 6))
    kernel, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    H_out, W_out = npconv.conv2d_output_size((7, 6), 3, stride=stride, padding=padding)
    # the same kernel everywhere
    tied = np.broadcast_to(kernel, (H_out, W_out, *kernel.shape)).copy()
    tied_bias = np.broadcast_to(bias, (H_out, W_out, 4)).copy()
    out = npconv.locally_connected2d(x, tied, tied_bias, stride=stride, padding=padding)
    assert_close(
        out,
        npconv.conv2d_reference(x, kernel, bias, stride=stride, padding=padding),
        name="locally connected with tied kernels",
    )


def test_locally_connected_is_not_translation_equivariant(rng):
    """Shift the input: a convolution's output shifts along; an untied layer's not."""
    x = np.zeros((1, 1, 8, 8))
    x[0, 0, 2, 2] = 1.0
    shifted = np.roll(x, (1, 1), axis=(2, 3))
    kernel = rng.standard_normal((1, 1, 3, 3))
    conv, conv_shifted = (npconv.conv2d_reference(a, kernel) for a in (x, shifted))
    assert_close(
        np.roll(conv, (1, 1), axis=(2, 3))[..., 1:, 1:],
        conv_shifted[..., 1:, 1:],
        name="conv shift",
    )
    untied = rng.standard_normal((6, 6, 1, 1, 3, 3))
    lc, lc_shifted = (npconv.locally_connected2d(a, untied) for a in (x, shifted))
    assert (
        np.abs(
            np.roll(lc, (1, 1), axis=(2, 3))[..., 1:, 1:] - lc_shifted[..., 1:, 1:]
        ).max()
        > 1e-3
    )


def test_locally_connected_rejects_wrong_positions(rng):
    x = rng.standard_normal((1, 2, 6, 6))
    with pytest.raises(ValueError, match="output positions"):
        npconv.locally_connected2d(x, rng.standard_normal((3, 3, 1, 2, 3, 3)))
