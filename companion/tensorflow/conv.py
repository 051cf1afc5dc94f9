r"""Convolution as parameter sharing, for TensorFlow tensors: the same functions as
:mod:`companion.numpy.conv`.

One kernel is applied at every position of the input: that reuse of the same weights
is parameter sharing across positions. The API keeps the layouts of the other two
namespaces, ``NCHW`` inputs and ``OIHW`` weights with the semantics of
``torch.nn.functional.conv2d`` (see :mod:`companion.conventions`); TensorFlow's own
``NHWC`` layout is used inside only. Shapes, stride, padding and groups are checked
once, by :func:`companion._checks.conv2d_geometry`, for all three backends.

float16/bfloat16 inputs are computed in float32 and returned in their own dtype.

Explained in the book chapter *Parameter sharing: algorithm and math*.
"""

from __future__ import annotations

import tensorflow as tf

from companion._checks import check_float, conv2d_geometry, dtype_name

# sizes only, no arrays: one definition
from companion.numpy.conv import conv2d_output_size

__all__ = [
    "corr2d",
    "convolve2d",
    "conv2d_output_size",
    "conv2d_reference",
    "conv2d_im2col",
    "locally_connected2d",
]

_LOW_PRECISION = (tf.float16, tf.bfloat16)


def _as_tensor(name: str, t):
    """``t`` as a floating ``tf.Tensor`` (``TypeError`` otherwise)."""
    if t is None:
        return None
    if not isinstance(t, (tf.Tensor, tf.Variable)):
        raise TypeError(f"{name} must be a tf.Tensor, got {type(t).__name__}")
    check_float(name, t.dtype)
    return tf.convert_to_tensor(t)


def _check_tensors(x, weight, bias):
    """x, weight, bias as tensors of one floating dtype (``TypeError`` otherwise)."""
    x, weight, bias = (
        _as_tensor("x", x),
        _as_tensor("weight", weight),
        _as_tensor("bias", bias),
    )
    dtypes = {dtype_name(t.dtype) for t in (x, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"x, weight and bias must have one dtype, got {sorted(dtypes)}")
    return x, weight, bias


def _accumulation_dtype(dtype):
    """float32 for float16/bfloat16 inputs, the input dtype otherwise."""
    return tf.float32 if dtype in _LOW_PRECISION else dtype


def _pad_nchw(x, pad):
    """Zero-pad the last two axes of NCHW ``x`` by ``(top, bottom, left, right)``."""
    top, bottom, left, right = pad
    # (N, C_in, H_pad, W_pad)
    return tf.pad(x, [[0, 0], [0, 0], [top, bottom], [left, right]])


# --- the source document's formula: one channel, no padding, stride 1 -----------------


def corr2d(x, kernel):
    r"""Two-dimensional cross-correlation of one channel, the source document's formula.

    .. math::

        Y_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1} X_{i+m,\, j+n}\, K_{m,n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``Y (H - h + 1, W - w + 1)``. The same ``h x w``
    weights are used at every output position (parameter sharing); deep-learning
    "convolution" is this cross-correlation (the kernel is not flipped).
    """
    x, kernel, _ = _check_tensors(x, kernel, None)
    if x.shape.rank != 2 or kernel.shape.rank != 2:
        raise ValueError(
            f"x and kernel must be 2-D (H, W) and (h, w), got shapes {tuple(x.shape)} "
            f"and {tuple(kernel.shape)}"
        )
    H, W = x.shape
    h, w = kernel.shape
    if h > H or w > W or h < 1 or w < 1:
        raise ValueError(
            f"kernel {tuple(kernel.shape)} must be non-empty and fit inside x "
            f"{tuple(x.shape)}"
        )
    acc = _accumulation_dtype(x.dtype)
    x_acc, k_acc = tf.cast(x, acc), tf.cast(kernel, acc)
    y = tf.zeros((H - h + 1, W - w + 1), dtype=acc)  # (H - h + 1, W - w + 1)
    for m in range(h):
        for n in range(w):
            # X_{i+m, j+n} K_{m,n}
            y = y + x_acc[m : m + H - h + 1, n : n + W - w + 1] * k_acc[m, n]
    return tf.cast(y, x.dtype)


def convolve2d(x, kernel):
    r"""True two-dimensional convolution ("valid" part): cross-correlation with the
    flipped kernel.

    .. math::

        (X * K)_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1}
            X_{i+m,\, j+n}\, K_{h-1-m,\, w-1-n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``(H - h + 1, W - w + 1)``, written as
    ``corr2d(x, flip(kernel))``: the two differ only by the flip.
    """
    if not isinstance(kernel, (tf.Tensor, tf.Variable)) or kernel.shape.rank != 2:
        raise ValueError(
            "kernel must be a 2-D tf.Tensor, got "
            f"{getattr(kernel, 'shape', type(kernel).__name__)}"
        )
    return corr2d(x, tf.reverse(kernel, axis=(0, 1)))  # K[h-1-m, w-1-n]


# --- readable reference: a loop over kernel offsets -----------------------------------


def conv2d_reference(
    x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1
):
    r"""2-D convolution (cross-correlation) written as a loop over the kernel offsets.

    .. math::

        Y_{n,o,i,j} = b_o + \sum_{c \in \text{group}(o)} \sum_{m,q}
            W_{o,c,m,q}\,
            X^{\text{pad}}_{n,\, g(o) C_g + c,\, s_h i + d_h m,\, s_w j + d_w q}

    ``x (N, C_in, H, W)``, ``weight (C_out, C_in / groups, kH, kW)``, ``bias (C_out,)``
    -> ``(N, C_out, H_out, W_out)``; output channel ``o`` of group
    ``g(o) = o // (C_out / groups)`` sees input channels
    ``g(o) C_g ... (g(o) + 1) C_g - 1`` with ``C_g = C_in / groups``. ``stride``,
    ``padding`` (int, pair, ``"same"``, ``"valid"``) and ``dilation`` follow
    ``torch.nn.functional.conv2d``. Meant for small sizes: it is the formula, not a fast
    path.
    """
    x, weight, bias = _check_tensors(x, weight, bias)
    geo = conv2d_geometry(
        tuple(x.shape),
        tuple(weight.shape),
        None if bias is None else tuple(bias.shape),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    acc = _accumulation_dtype(x.dtype)
    (s_h, s_w), (d_h, d_w), G = geo.stride, geo.dilation, geo.groups
    x_pad = _pad_nchw(tf.cast(x, acc), geo.pad)  # (N, C_in, H_pad, W_pad)
    # (N, G, C_g, H_pad, W_pad)
    x_grouped = tf.reshape(x_pad, (geo.N, G, geo.C_in_per_group, *x_pad.shape[-2:]))
    w_grouped = tf.reshape(
        tf.cast(weight, acc),
        # (G, O_g, C_g, kH, kW)
        (G, geo.C_out_per_group, geo.C_in_per_group, geo.kH, geo.kW),
    )
    y = tf.zeros((geo.N, G, geo.C_out_per_group, geo.H_out, geo.W_out), dtype=acc)
    for m in range(geo.kH):
        for q in range(geo.kW):
            x_shifted = x_grouped[
                ...,
                d_h * m : d_h * m + s_h * (geo.H_out - 1) + 1 : s_h,
                # (N, G, C_g, H_out, W_out)
                d_w * q : d_w * q + s_w * (geo.W_out - 1) + 1 : s_w,
            ]
            # sum over c of W_{o,c,m,q} X
            y = y + tf.einsum("ngchw,goc->ngohw", x_shifted, w_grouped[..., m, q])
    # (N, C_out, H_out, W_out)
    y = tf.reshape(y, (geo.N, geo.C_out, geo.H_out, geo.W_out))
    if bias is not None:
        y = y + tf.cast(bias, acc)[:, None, None]  # + b_o
    return tf.cast(y, x.dtype)


# --- fast: im2col (tf.image.extract_patches, NHWC) and one matrix product -------------


def conv2d_im2col(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
    r"""2-D convolution as im2col + matrix product; same signature and result as
    :func:`conv2d_reference`.

    The input is moved to ``NHWC`` and padded; ``tf.image.extract_patches`` copies every
    receptive field into one row, ``patches (N, H_out, W_out, kH kW C_in)`` ordered
    ``(kH, kW, C_in)``; then each group's filters ``(kH kW C_g, O_g)`` multiply its rows
    in one batched matrix product, ``Y_g = \text{patches}_g \cdot W_g``, and the result
    goes back to ``NCHW``. The shared kernel becomes one dense matrix applied to every
    position.
    """
    x, weight, bias = _check_tensors(x, weight, bias)
    geo = conv2d_geometry(
        tuple(x.shape),
        tuple(weight.shape),
        None if bias is None else tuple(bias.shape),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    acc = _accumulation_dtype(x.dtype)
    G, P = geo.groups, geo.H_out * geo.W_out
    # (N, H_pad, W_pad, C_in)
    x_nhwc = tf.transpose(_pad_nchw(tf.cast(x, acc), geo.pad), (0, 2, 3, 1))
    patches = tf.image.extract_patches(
        x_nhwc,
        sizes=(1, geo.kH, geo.kW, 1),
        strides=(1, *geo.stride, 1),
        # (N, H_out, W_out, kH kW C_in)
        rates=(1, *geo.dilation, 1),
        padding="VALID",
    )
    # (N, P, kH kW, G, C_g)
    patches = tf.reshape(patches, (geo.N, P, geo.kH * geo.kW, G, geo.C_in_per_group))
    patches = tf.reshape(
        tf.transpose(patches, (0, 3, 1, 2, 4)),
        # (N, G, P, kH kW C_g)
        (geo.N, G, P, geo.kH * geo.kW * geo.C_in_per_group),
    )
    w_oihw = tf.reshape(
        tf.cast(weight, acc),
        (G, geo.C_out_per_group, geo.C_in_per_group, geo.kH, geo.kW),
    )
    w_matrix = tf.reshape(
        tf.transpose(w_oihw, (0, 3, 4, 2, 1)),
        # (G, kH kW C_g, O_g)
        (G, geo.kH * geo.kW * geo.C_in_per_group, geo.C_out_per_group),
    )
    y = tf.matmul(patches, w_matrix)  # (N, G, P, O_g): Y_g = patches_g W_g
    y = tf.transpose(y, (0, 1, 3, 2))  # (N, G, O_g, P)
    # (N, C_out, H_out, W_out)
    y = tf.reshape(y, (geo.N, geo.C_out, geo.H_out, geo.W_out))
    if bias is not None:
        y = y + tf.cast(bias, acc)[:, None, None]  # + b_o
    return tf.cast(y, x.dtype)


# --- the same receptive fields without sharing ----------------------------------------


def locally_connected2d(x, weight, bias=None, *, stride=1, padding=0):
    r"""A locally connected layer: a convolution's receptive fields, one kernel per
    position.

    .. math::

        Y_{b,o,i,j} = \mathrm{bias}_{i,j,o} + \sum_{c,m,n}
            X^{\mathrm{pad}}_{b,\,c,\; i s_H + m,\; j s_W + n}\; W_{i,j,o,c,m,n}

    ``x (N, C_in, H, W)``, ``weight (H_out, W_out, C_out, C_in, kH, kW)``,
    ``bias (H_out, W_out, C_out)`` or None -> ``(N, C_out, H_out, W_out)``, as
    :func:`companion.numpy.conv.locally_connected2d`. ``tf.image.extract_patches`` gives
    every receptive field; each position then has its own matrix: ``H_out W_out`` times
    a convolution's parameters, no sharing.
    """
    x, weight, bias = _check_tensors(x, weight, bias)
    if weight.shape.rank != 6:
        raise ValueError(
            "weight must have shape (H_out, W_out, C_out, C_in, kH, kW), got shape "
            f"{tuple(weight.shape)}"
        )
    H_out_w, W_out_w, C_out, C_in, kH, kW = weight.shape
    geo = conv2d_geometry(
        tuple(x.shape), (C_out, C_in, kH, kW), stride=stride, padding=padding
    )
    if (geo.H_out, geo.W_out) != (H_out_w, W_out_w):
        raise ValueError(
            f"weight {tuple(weight.shape)} has {H_out_w} x {W_out_w} positions but x "
            f"{tuple(x.shape)} "
            f"with kernel {kH} x {kW}, stride {stride} and padding {padding!r} gives "
            f"{geo.H_out} x {geo.W_out} output positions"
        )
    if bias is not None and tuple(bias.shape) != (geo.H_out, geo.W_out, C_out):
        raise ValueError(
            "bias must have shape (H_out, W_out, C_out) = "
            f"{(geo.H_out, geo.W_out, C_out)}, "
            f"got {tuple(bias.shape)}"
        )
    acc = _accumulation_dtype(x.dtype)
    # (N, H_pad, W_pad, C_in)
    x_nhwc = tf.transpose(_pad_nchw(tf.cast(x, acc), geo.pad), (0, 2, 3, 1))
    patches = tf.image.extract_patches(
        x_nhwc,
        sizes=(1, kH, kW, 1),
        strides=(1, *geo.stride, 1),
        # (N, H_out, W_out, kH kW C_in)
        rates=(1, 1, 1, 1),
        padding="VALID",
    )
    w_per_position = tf.reshape(
        tf.transpose(tf.cast(weight, acc), (0, 1, 4, 5, 3, 2)),
        # (H_out, W_out, kH kW C_in, C_out)
        (geo.H_out, geo.W_out, kH * kW * C_in, C_out),
    )
    # (N, C_out, H_out, W_out): W_{i,j} X_{field (i,j)}
    y = tf.einsum("nijk,ijko->noij", patches, w_per_position)
    if bias is not None:
        y = y + tf.transpose(tf.cast(bias, acc), (2, 0, 1))  # + bias_{i,j,o}
    return tf.cast(y, x.dtype)
