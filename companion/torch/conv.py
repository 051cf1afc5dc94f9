r"""Convolution as parameter sharing, for torch tensors: the same functions as
:mod:`companion.numpy.conv`.

One kernel is applied at every position of the input: that reuse of the same weights
is parameter sharing across positions. Layouts are ``NCHW`` inputs and ``OIHW``
weights, with the semantics of ``torch.nn.functional.conv2d`` (see
:mod:`companion.conventions`); shapes, stride, padding and groups are checked once, by
:func:`companion._checks.conv2d_geometry`, for all three backends.

Everything stays on the input's device; float16/bfloat16 inputs are computed in float32
and returned in their own dtype.

Explained in the book chapter *Parameter sharing: algorithm and math*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 inputs, the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _check_tensors(x, weight, bias) -> None:
    """``TypeError`` unless x, weight (and bias) are floating tensors of one dtype."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, t.dtype)
    dtypes = {dtype_name(t.dtype) for t in (x, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"x, weight and bias must have one dtype, got {sorted(dtypes)}")


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Zero-pad the last two axes by ``(top, bottom, left, right)``."""
    top, bottom, left, right = pad
    # (N, C_in, H + top + bottom, W + left + right)
    return F.pad(x, (left, right, top, bottom))


# --- the source document's formula: one channel, no padding, stride 1 -----------------


def corr2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r"""Two-dimensional cross-correlation of one channel, the source document's formula.

    .. math::

        Y_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1} X_{i+m,\, j+n}\, K_{m,n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``Y (H - h + 1, W - w + 1)``. The same ``h x w``
    weights are used at every output position (parameter sharing); deep-learning
    "convolution" is this cross-correlation (the kernel is not flipped).
    """
    _check_tensors(x, kernel, None)
    if x.ndim != 2 or kernel.ndim != 2:
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
    x_acc, k_acc = x.to(acc), kernel.to(acc)
    # (H - h + 1, W - w + 1)
    y = torch.zeros(H - h + 1, W - w + 1, dtype=acc, device=x.device)
    for m in range(h):
        for n in range(w):
            # X_{i+m, j+n} K_{m,n}
            y = y + x_acc[m : m + H - h + 1, n : n + W - w + 1] * k_acc[m, n]
    return y.to(x.dtype)


def convolve2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r"""True two-dimensional convolution ("valid" part): cross-correlation with the
    flipped kernel.

    .. math::

        (X * K)_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1}
            X_{i+m,\, j+n}\, K_{h-1-m,\, w-1-n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``(H - h + 1, W - w + 1)``, written as
    ``corr2d(x, flip(kernel))``: the two differ only by the flip.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 2:
        raise ValueError(
            "kernel must be a 2-D torch.Tensor, got "
            f"{getattr(kernel, 'shape', type(kernel).__name__)}"
        )
    return corr2d(x, torch.flip(kernel, dims=(0, 1)))  # K[h-1-m, w-1-n]


# --- readable reference: a loop over kernel offsets -----------------------------------


def conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
) -> torch.Tensor:
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
    _check_tensors(x, weight, bias)
    geo = conv2d_geometry(
        x.shape,
        weight.shape,
        None if bias is None else bias.shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    acc = _accumulation_dtype(x.dtype)
    (s_h, s_w), (d_h, d_w), G = geo.stride, geo.dilation, geo.groups
    x_pad = _pad(x.to(acc), geo.pad)  # (N, C_in, H_pad, W_pad)
    # (N, G, C_g, H_pad, W_pad)
    x_grouped = x_pad.reshape(geo.N, G, geo.C_in_per_group, *x_pad.shape[-2:])
    # (G, O_g, C_g, kH, kW)
    w_grouped = weight.to(acc).reshape(
        G, geo.C_out_per_group, geo.C_in_per_group, geo.kH, geo.kW
    )
    y = torch.zeros(
        geo.N, G, geo.C_out_per_group, geo.H_out, geo.W_out, dtype=acc, device=x.device
    )
    for m in range(geo.kH):
        for q in range(geo.kW):
            rows = slice(d_h * m, d_h * m + s_h * (geo.H_out - 1) + 1, s_h)
            cols = slice(d_w * q, d_w * q + s_w * (geo.W_out - 1) + 1, s_w)
            # (N, G, C_g, H_out, W_out): X_{s i + d m, s j + d q}
            x_shifted = x_grouped[..., rows, cols]
            # sum over c of W_{o,c,m,q} X
            y = y + torch.einsum("ngchw,goc->ngohw", x_shifted, w_grouped[..., m, q])
    y = y.reshape(geo.N, geo.C_out, geo.H_out, geo.W_out)  # (N, C_out, H_out, W_out)
    if bias is not None:
        y = y + bias.to(acc)[:, None, None]  # + b_o
    return y.to(x.dtype)


# --- fast: im2col (F.unfold) and one matrix product -----------------------------------


def conv2d_im2col(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
) -> torch.Tensor:
    r"""2-D convolution as im2col + matrix product; same signature and result as
    :func:`conv2d_reference`.

    ``F.unfold`` copies every receptive field into a column,
    ``cols (N, C_in kH kW, H_out W_out)``; then each group's filters
    ``(O_g, C_g kH kW)`` multiply its columns in one batched matrix product,
    ``Y_g = W_g \cdot \text{cols}_g``. The shared kernel becomes one dense matrix
    applied to every position.
    """
    _check_tensors(x, weight, bias)
    geo = conv2d_geometry(
        x.shape,
        weight.shape,
        None if bias is None else bias.shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    acc = _accumulation_dtype(x.dtype)
    G, k = geo.groups, geo.kH * geo.kW
    x_pad = _pad(x.to(acc), geo.pad)  # (N, C_in, H_pad, W_pad)
    # (N, C_in kH kW, H_out W_out)
    cols = F.unfold(x_pad, (geo.kH, geo.kW), dilation=geo.dilation, stride=geo.stride)
    # (N, G, C_g kH kW, H_out W_out)
    cols = cols.reshape(geo.N, G, geo.C_in_per_group * k, geo.H_out * geo.W_out)
    # (G, O_g, C_g kH kW)
    w_matrix = weight.to(acc).reshape(G, geo.C_out_per_group, geo.C_in_per_group * k)
    y = torch.matmul(w_matrix, cols)  # (N, G, O_g, H_out W_out): Y_g = W_g cols_g
    y = y.reshape(geo.N, geo.C_out, geo.H_out, geo.W_out)  # (N, C_out, H_out, W_out)
    if bias is not None:
        y = y + bias.to(acc)[:, None, None]  # + b_o
    return y.to(x.dtype)


# --- the same receptive fields without sharing ----------------------------------------


def locally_connected2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
) -> torch.Tensor:
    r"""A locally connected layer: a convolution's receptive fields, one kernel per
    position.

    .. math::

        Y_{b,o,i,j} = \mathrm{bias}_{i,j,o} + \sum_{c,m,n}
            X^{\mathrm{pad}}_{b,\,c,\; i s_H + m,\; j s_W + n}\; W_{i,j,o,c,m,n}

    ``x (N, C_in, H, W)``, ``weight (H_out, W_out, C_out, C_in, kH, kW)``,
    ``bias (H_out, W_out, C_out)`` or None -> ``(N, C_out, H_out, W_out)``, as
    :func:`companion.numpy.conv.locally_connected2d`. ``F.unfold`` gives every receptive
    field; each position then has its own matrix: ``H_out W_out`` times a convolution's
    parameters, no sharing.
    """
    _check_tensors(x, weight, bias)
    if weight.ndim != 6:
        raise ValueError(
            "weight must have shape (H_out, W_out, C_out, C_in, kH, kW), got shape "
            f"{tuple(weight.shape)}"
        )
    H_out_w, W_out_w, C_out, C_in, kH, kW = weight.shape
    geo = conv2d_geometry(
        x.shape, (C_out, C_in, kH, kW), stride=stride, padding=padding
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
    P = geo.H_out * geo.W_out
    x_pad = _pad(x.to(acc), geo.pad)  # (N, C_in, H_pad, W_pad)
    cols = F.unfold(x_pad, (kH, kW), stride=geo.stride)  # (N, C_in kH kW, P)
    # (P, C_out, C_in kH kW)
    w_per_position = weight.to(acc).reshape(P, C_out, C_in * kH * kW)
    # (N, C_out, P): W_{i,j} X_{receptive field (i,j)}
    y = torch.einsum("nkp,pok->nop", cols, w_per_position)
    y = y.reshape(geo.N, C_out, geo.H_out, geo.W_out)  # (N, C_out, H_out, W_out)
    if bias is not None:
        y = y + bias.to(acc).permute(2, 0, 1)  # + bias_{i,j,o}
    return y.to(x.dtype)
