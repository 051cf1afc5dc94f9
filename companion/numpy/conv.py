r"""Convolution as parameter sharing, in numpy: the formulas, the loops and im2col.

A convolution applies one small kernel at every position of its input. The reuse of
the same ``C_out x C_in / groups x kH x kW`` weights at all ``H_out x W_out`` positions
is parameter sharing across positions; :func:`locally_connected2d` is the same layer
without the sharing (one kernel per position), for comparison.

Layouts are ``NCHW`` inputs and ``OIHW`` weights ``(C_out, C_in / groups, kH, kW)``,
with the semantics of ``torch.nn.functional.conv2d`` (see :mod:`companion.conventions`):
with ``p`` the padding, ``s`` the stride, ``d`` the dilation and ``g(o)`` the group of
output channel ``o``,

.. math::

    Y_{b,o,i,j} = \mathrm{bias}_o + \sum_{c \in g(o)} \sum_{m=0}^{kH-1}
        \sum_{n=0}^{kW-1} X^{\mathrm{pad}}_{b,\,c,\; i s_H + m d_H,\; j s_W + n d_W}\;
        W_{o,\, c - c_0(o),\, m,\, n}

Like every deep-learning library, this is a *cross-correlation*: the kernel is not
flipped (:func:`corr2d` vs :func:`convolve2d`). Shapes, stride, padding and groups are
checked once, by :func:`companion._checks.conv2d_geometry`, for all three backends.

Explained in the book chapter *Parameter sharing: algorithm and math*; measured in
*Making it fast*.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from companion._checks import check_float, conv2d_geometry, dtype_name

__all__ = [
    "corr2d",
    "convolve2d",
    "conv2d_output_size",
    "conv2d_reference",
    "conv2d_im2col",
    "conv2d_backward",
    "locally_connected2d",
]


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float16 inputs (accumulate in float32), the input dtype otherwise."""
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _check_arrays(**arrays) -> dict[str, np.ndarray]:
    """``TypeError`` unless every given array is floating and all share one dtype."""
    checked = {}
    for name, a in arrays.items():
        if a is None:
            checked[name] = None
            continue
        a = np.asarray(a)
        check_float(name, a.dtype)
        checked[name] = a
    dtypes = {dtype_name(a.dtype) for a in checked.values() if a is not None}
    if len(dtypes) > 1:
        names = ", ".join(n for n, a in checked.items() if a is not None)
        raise TypeError(f"{names} must have one dtype, got {sorted(dtypes)}")
    return checked


def _pad(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Zero-pad the last two axes by ``(top, bottom, left, right)`` (a new array)."""
    top, bottom, left, right = pad
    # (N, C, H + top + bottom, W + left + right)
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


# --- the source document's formula: one channel, no padding, stride 1 -----------------


def corr2d(x, kernel) -> np.ndarray:
    r"""Two-dimensional cross-correlation of one channel, the source document's formula.

    .. math::

        Y_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1} X_{i+m,\, j+n}\, K_{m,n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``Y (H - h + 1, W - w + 1)``. The same ``h x w``
    weights are used at every output position: that is the parameter sharing.

    The source calls this a *convolution*; it is a **cross-correlation** (the kernel is
    not flipped), which is what ``Conv2D``/``conv2d`` in every deep-learning library
    compute. The convolution of signal processing flips the kernel first: see
    :func:`convolve2d`. For a learned kernel the difference does not matter (the network
    learns the flipped kernel), for a given kernel it does.
    """
    x, kernel = (_check_arrays(x=x, kernel=kernel)[k] for k in ("x", "kernel"))
    if x.ndim != 2 or kernel.ndim != 2:
        raise ValueError(
            f"x and kernel must be 2-D (one channel), got shapes {x.shape} and "
            f"{kernel.shape}"
        )
    H, W = x.shape
    h, w = kernel.shape
    if h > H or w > W or h < 1 or w < 1:
        raise ValueError(
            f"kernel {kernel.shape} must be non-empty and no larger than x {x.shape}"
        )
    work = _compute_dtype(x.dtype)
    y = np.zeros((H - h + 1, W - w + 1), dtype=work)  # (H - h + 1, W - w + 1)
    for i in range(H - h + 1):
        for j in range(W - w + 1):
            window = x[i : i + h, j : j + w].astype(work)  # X[i+m, j+n], (h, w)
            # sum_m sum_n X[i+m, j+n] K[m, n]
            y[i, j] = np.sum(window * kernel)
    return y.astype(x.dtype, copy=False)


def convolve2d(x, kernel) -> np.ndarray:
    r"""True two-dimensional convolution ("valid" part): cross-correlation with the
    flipped kernel.

    .. math::

        (X * K)_{i,j} = \sum_{m=0}^{h-1} \sum_{n=0}^{w-1}
            X_{i+m,\, j+n}\, K_{h-1-m,\, w-1-n}

    ``x (H, W)``, ``kernel (h, w)`` -> ``(H - h + 1, W - w + 1)``; equals
    ``scipy.signal.convolve2d(x, kernel, mode="valid")``. Written as
    ``corr2d(x, kernel[::-1, ::-1])`` to show that the two differ only by the flip.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {kernel.shape}")
    return corr2d(x, kernel[::-1, ::-1])  # K[h-1-m, w-1-n]


def conv2d_output_size(
    input_size, kernel_size, *, stride=1, padding=0, dilation=1
) -> tuple[int, int]:
    r"""``(H_out, W_out)`` of a conv2d with these settings (the rule of
    ``torch.nn.Conv2d``).

    .. math::

        H_{out} = \left\lfloor
            \frac{H + p_{top} + p_{bottom} - d_H (kH - 1) - 1}{s_H}
        \right\rfloor + 1

    and likewise for ``W``. ``input_size`` and ``kernel_size`` are ints or
    ``(rows, cols)`` pairs; ``padding`` an int, a pair, ``"valid"`` or ``"same"``
    (stride 1 only). Raises ``ValueError`` if the dilated kernel is larger than the
    padded input.
    """
    H, W = (input_size, input_size) if np.ndim(input_size) == 0 else tuple(input_size)
    kH, kW = (
        (kernel_size, kernel_size) if np.ndim(kernel_size) == 0 else tuple(kernel_size)
    )
    geometry = conv2d_geometry(
        (1, 1, int(H), int(W)),
        (1, 1, int(kH), int(kW)),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    return geometry.H_out, geometry.W_out


# --- the readable version: loops over every output element ----------------------------


def conv2d_reference(
    x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1
) -> np.ndarray:
    r"""2-D convolution (cross-correlation) by plain loops: the definition, one output
    at a time.

    .. math::

        Y_{b,o,i,j} = \mathrm{bias}_o + \sum_{c=0}^{C_{in}/g - 1} \sum_{m=0}^{kH-1}
            \sum_{n=0}^{kW-1} X^{\mathrm{pad}}_{b,\; \gamma(o) C_{in}/g + c,\;
            i s_H + m d_H,\; j s_W + n d_W}\; W_{o,c,m,n}

    where ``gamma(o) = o // (C_out / g)`` is the group of output channel ``o``.

    Parameters
    ----------
    x : ndarray ``(N, C_in, H, W)``
    weight : ndarray ``(C_out, C_in / groups, kH, kW)``, the same dtype as ``x``
    bias : ndarray ``(C_out,)`` or None
    stride, dilation : int or ``(rows, cols)``
    padding : int, ``(rows, cols)``, ``"valid"`` (no padding) or ``"same"``
        (output size = input size; stride 1 only; an odd total padding puts the
        extra row/column at the bottom/right, as torch does)
    groups : int, dividing ``C_in`` and ``C_out``; group ``g`` maps input channels
        ``g C_in/groups ...`` to output channels ``g C_out/groups ...``

    Returns
    -------
    ndarray ``(N, C_out, H_out, W_out)`` in the dtype of ``x`` (float16 accumulates in
    float32); sizes from :func:`conv2d_output_size`. Equals
    ``torch.nn.functional.conv2d``.
    """
    arrays = _check_arrays(x=x, weight=weight, bias=bias)
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    geo = conv2d_geometry(
        x.shape,
        weight.shape,
        None if bias is None else bias.shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    (s_h, s_w), (d_h, d_w) = geo.stride, geo.dilation
    work = _compute_dtype(x.dtype)
    x_pad = _pad(x.astype(work, copy=False), geo.pad)  # (N, C_in, H + pads, W + pads)
    w = weight.astype(work, copy=False)
    # [book: convolution loops]
    # (N, C_out, H_out, W_out)
    y = np.zeros((geo.N, geo.C_out, geo.H_out, geo.W_out), dtype=work)
    for b in range(geo.N):
        for o in range(geo.C_out):
            group = o // geo.C_out_per_group
            # first input channel of o's group
            c0 = group * geo.C_in_per_group
            channels = slice(c0, c0 + geo.C_in_per_group)
            for i in range(geo.H_out):
                for j in range(geo.W_out):
                    # i s + m d, m < kH
                    rows = slice(i * s_h, i * s_h + d_h * (geo.kH - 1) + 1, d_h)
                    # j s + n d, n < kW
                    cols = slice(j * s_w, j * s_w + d_w * (geo.kW - 1) + 1, d_w)
                    # (C_in/g, kH, kW)
                    receptive_field = x_pad[b, channels, rows, cols]
                    # sum_c sum_m sum_n X W
                    y[b, o, i, j] = np.sum(receptive_field * w[o])
            if bias is not None:
                # + bias_o
                y[b, o] += bias[o]
    # [/book: convolution loops]
    return y.astype(x.dtype, copy=False)


# --- the fast version: im2col, then one matrix product per group ----------------------


def _im2col(x: np.ndarray, geo) -> np.ndarray:
    """The patch matrix ``(groups, N * H_out * W_out, kH * kW * C_in/groups)``,
    C-contiguous.

    Rows are output positions, columns run over ``(kH, kW, C_in/g)`` with the channel
    fastest: the layout the matrix product reads row by row, copied in whole runs of
    channels from a padded ``NHWC`` copy of ``x``. Other orders cost up to ~2x in the
    copy and ~1.5x in the product.
    """
    G, C_g = geo.groups, geo.C_in_per_group
    (s_h, s_w), (d_h, d_w) = geo.stride, geo.dilation
    top, bottom, left, right = geo.pad
    span_h, span_w = d_h * (geo.kH - 1) + 1, d_w * (geo.kW - 1) + 1
    # (N, Hp, Wp, C_in)
    x_nhwc = np.zeros(
        (geo.N, geo.H + top + bottom, geo.W + left + right, geo.C_in), dtype=x.dtype
    )
    # zero padding around NHWC x
    x_nhwc[:, top : top + geo.H, left : left + geo.W, :] = x.transpose(0, 2, 3, 1)
    # (N, Hp, Wp, G, C_in/g)
    x_nhwc = x_nhwc.reshape(*x_nhwc.shape[:3], G, C_g)
    # (N, Hp-span_h+1, Wp-span_w+1, G, C_in/g, span_h, span_w)
    windows = sliding_window_view(x_nhwc, (span_h, span_w), axis=(1, 2))
    # (N, H_out, W_out, G, C_in/g, kH, kW), a view
    windows = windows[:, ::s_h, ::s_w, :, :, ::d_h, ::d_w]
    # (G, N, H_out, W_out, kH, kW, C_in/g)
    patches = windows.transpose(3, 0, 1, 2, 5, 6, 4)
    # the one big copy
    patches = np.ascontiguousarray(patches)
    # (G, N*P, K)
    return patches.reshape(G, geo.N * geo.H_out * geo.W_out, geo.kH * geo.kW * C_g)


# patch rows per product: about 1 MiB, so they stay in a core's L2 cache
_CHUNK_BYTES = 1 << 20


def _thread_count(num_threads) -> int:
    """``num_threads`` checked, or the available cores (at most 8) when it is None."""
    if num_threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 8))
    if (
        isinstance(num_threads, bool)
        or not isinstance(num_threads, (int, np.integer))
        or num_threads < 1
    ):
        raise ValueError(
            f"num_threads must be a positive int or None, got {num_threads!r}"
        )
    return int(num_threads)


def _output_chunks(geo, row_bytes: int):
    """``(b0, b1, i0, i1)`` blocks of output positions whose patch rows take about
    ``_CHUNK_BYTES``.

    Whole images when one image's patch matrix is small, else bands of output rows of
    one image.
    """
    image_bytes = geo.H_out * geo.W_out * row_bytes
    if image_bytes <= _CHUNK_BYTES:
        images = max(1, _CHUNK_BYTES // max(image_bytes, 1))
        return [
            (b0, min(b0 + images, geo.N), 0, geo.H_out)
            for b0 in range(0, geo.N, images)
        ]
    rows = max(1, _CHUNK_BYTES // (geo.W_out * row_bytes))
    return [
        (b, b + 1, i0, min(i0 + rows, geo.H_out))
        for b in range(geo.N)
        for i0 in range(0, geo.H_out, rows)
    ]


def conv2d_im2col(
    x,
    weight,
    bias=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    num_threads: int | None = None,
) -> np.ndarray:
    r"""2-D convolution as im2col plus matrix products; equals :func:`conv2d_reference`.

    Every receptive field becomes one row of a patch matrix, so the convolution is a
    matrix product per group:

    .. math::

        Y_g = \mathrm{cols}_g \; W_g^{\top} + \mathrm{bias}_g, \qquad
        \mathrm{cols}_g \in
            \mathbb{R}^{(N H_{out} W_{out}) \times (kH\, kW\, C_{in}/g)},\;
        W_g \in \mathbb{R}^{(C_{out}/g) \times (kH\, kW\, C_{in}/g)}

    The whole patch matrix repeats each input value up to ``kH kW`` times (memory
    ``N H_out W_out kH kW C_in``). This version builds it one block of rows at a time
    (whole images, or bands of output rows, about 1 MiB each) into one reused buffer and
    multiplies each block as soon as it is built, while it is still in the cache: the
    same rows and the same products, about 1.4x faster than one huge patch matrix
    (measured on a ResNet-like layer), with a few MiB of extra memory instead of the
    whole patch matrix. Rows are copied from a padded ``NHWC`` copy of ``x`` with the
    channel fastest (whole runs of channels; other orders cost up to ~2x).

    Same arguments, shapes and dtypes as :func:`conv2d_reference`; float32 stays
    float32.

    ``num_threads`` (numpy only, as for :func:`companion.numpy.attention_tiled`): worker
    threads over the blocks; default the available cores, at most 8. BLAS is pinned to
    one thread while they run (multi-threaded BLAS on small products is slow when cores
    are busy).
    """
    arrays = _check_arrays(x=x, weight=weight, bias=bias)
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    geo = conv2d_geometry(
        x.shape,
        weight.shape,
        None if bias is None else bias.shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    work = _compute_dtype(x.dtype)
    G, C_g, C_out_g = geo.groups, geo.C_in_per_group, geo.C_out_per_group
    (s_h, s_w), (d_h, d_w) = geo.stride, geo.dilation
    top, bottom, left, right = geo.pad
    # patch length
    K = geo.kH * geo.kW * C_g
    # (N, Hp, Wp, C_in)
    x_nhwc = np.zeros(
        (geo.N, geo.H + top + bottom, geo.W + left + right, geo.C_in), dtype=work
    )
    # zero padding around NHWC x
    x_nhwc[:, top : top + geo.H, left : left + geo.W, :] = x.transpose(0, 2, 3, 1)
    # (N, Hp, Wp, G, C_in/g)
    x_nhwc = x_nhwc.reshape(*x_nhwc.shape[:3], G, C_g)
    span_h, span_w = d_h * (geo.kH - 1) + 1, d_w * (geo.kW - 1) + 1
    # (N, Hp-span_h+1, Wp-span_w+1, G, C_in/g, span_h, span_w)
    windows = sliding_window_view(x_nhwc, (span_h, span_w), axis=(1, 2))
    # (N, H_out, W_out, G, C_in/g, kH, kW), a view
    windows = windows[:, ::s_h, ::s_w, :, :, ::d_h, ::d_w]
    # (G, N, H_out, W_out, kH, kW, C_in/g), a view
    patches = windows.transpose(3, 0, 1, 2, 5, 6, 4)
    w = weight.astype(work, copy=False).reshape(G, C_out_g, C_g, geo.kH, geo.kW)
    # (G, K, C_out/g), rows (kH, kW, C_in/g)
    w_cols = np.ascontiguousarray(w.transpose(0, 3, 4, 2, 1)).reshape(G, K, C_out_g)
    # (N, C_out, H_out, W_out)
    y = np.empty((geo.N, geo.C_out, geo.H_out, geo.W_out), dtype=work)
    chunks = _output_chunks(geo, G * K * work.itemsize)
    # rows of the largest block
    most = max((b1 - b0) * (i1 - i0) * geo.W_out for b0, b1, i0, i1 in chunks)

    next_chunk, lock = iter(chunks), threading.Lock()

    def work_through() -> None:
        # one patch block, reused
        cols_buffer = np.empty(G * most * K, dtype=work)
        # its product, reused
        prod_buffer = np.empty(G * most * C_out_g, dtype=work)
        while True:
            # the next block nobody took
            with lock:
                chunk = next(next_chunk, None)
            if chunk is None:
                return
            b0, b1, i0, i1 = chunk
            nb, rows = b1 - b0, i1 - i0
            # output positions in the block
            P = nb * rows * geo.W_out
            cols = cols_buffer[: G * P * K].reshape(
                G, nb, rows, geo.W_out, geo.kH, geo.kW, C_g
            )
            # im2col of the block
            np.copyto(cols, patches[:, b0:b1, i0:i1])
            prod = prod_buffer[: G * P * C_out_g].reshape(G, P, C_out_g)
            # (G, P, C_out/g) = cols_g W_g^T
            np.matmul(cols.reshape(G, P, K), w_cols, out=prod)
            prod = prod.reshape(G, nb, rows, geo.W_out, C_out_g)
            # to NCHW
            y[b0:b1, :, i0:i1] = prod.transpose(1, 0, 4, 2, 3).reshape(
                nb, geo.C_out, rows, geo.W_out
            )

    workers = min(_thread_count(num_threads), len(chunks))
    if workers <= 1:
        work_through()
    # blocks are independent: one thread each, BLAS pinned to one thread (small
    # products)
    else:
        from threadpoolctl import threadpool_limits

        with (
            threadpool_limits(limits=1, user_api="blas"),
            ThreadPoolExecutor(workers) as pool,
        ):
            for future in [pool.submit(work_through) for _ in range(workers)]:
                # re-raise a worker's exception
                future.result()
    if bias is not None:
        # + bias_o
        y += bias.astype(work, copy=False)[:, None, None]
    return y.astype(x.dtype, copy=False)


# --- the backward pass, by hand -------------------------------------------------------


def conv2d_backward(grad_out, x, weight, *, stride=1, padding=0, dilation=1, groups=1):
    r"""Gradients of :func:`conv2d_reference` with respect to ``x``, ``weight`` and
    ``bias``.

    With ``G = dL/dY (N, C_out, H_out, W_out)`` and the im2col matrices of the forward
    pass (``Y_g = cols_g W_g^T + bias_g``):

    .. math::

        \frac{\partial L}{\partial W_g} = G_g^{\top} \mathrm{cols}_g, \qquad
        \frac{\partial L}{\partial \mathrm{cols}_g} = G_g W_g, \qquad
        \frac{\partial L}{\partial \mathrm{bias}_o} = \sum_{b,i,j} G_{b,o,i,j}

    and ``dL/dX`` scatters each row of ``dL/dcols`` back to the receptive field it came
    from (col2im), adding where receptive fields overlap; padding is cut off at the end.
    The shared weight's gradient is a **sum over all positions**: every position used
    it.

    Returns
    -------
    ``(dx (N, C_in, H, W), dweight (C_out, C_in/g, kH, kW), dbias (C_out,))`` in the
    dtype of ``x``. ``dbias`` is the gradient of a bias, whether or not the forward pass
    used one.
    """
    arrays = _check_arrays(grad_out=grad_out, x=x, weight=weight)
    grad_out, x, weight = arrays["grad_out"], arrays["x"], arrays["weight"]
    geo = conv2d_geometry(
        x.shape,
        weight.shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    expected = (geo.N, geo.C_out, geo.H_out, geo.W_out)
    if grad_out.shape != expected:
        raise ValueError(
            "grad_out must have the output's shape (N, C_out, H_out, W_out) = "
            f"{expected}, "
            f"got {grad_out.shape} (x {x.shape}, weight {weight.shape})"
        )
    work = _compute_dtype(x.dtype)
    G, C_g, C_out_g = geo.groups, geo.C_in_per_group, geo.C_out_per_group
    (s_h, s_w), (d_h, d_w) = geo.stride, geo.dilation
    # (G, N*P, K)
    cols = _im2col(x.astype(work, copy=False), geo)
    w = weight.astype(work, copy=False).reshape(G, C_out_g, C_g, geo.kH, geo.kW)
    # (G, K, C_out/g)
    w_cols = w.transpose(0, 3, 4, 2, 1).reshape(G, -1, C_out_g)
    g = grad_out.astype(work, copy=False).reshape(
        geo.N, G, C_out_g, geo.H_out, geo.W_out
    )
    # (G, N*P, C_out/g)
    g_rows = g.transpose(1, 0, 3, 4, 2).reshape(G, -1, C_out_g)

    # sum_{b,i,j} G_{b,o,i,j}
    dbias = g.sum(axis=(0, 3, 4)).reshape(geo.C_out)
    # (G, K, C_out/g) = cols^T G
    dw_cols = np.matmul(cols.transpose(0, 2, 1), g_rows)
    dweight = (
        dw_cols.reshape(G, geo.kH, geo.kW, C_g, C_out_g)
        # (C_out, C_in/g, kH, kW)
        .transpose(0, 4, 3, 1, 2)
        .reshape(geo.C_out, C_g, geo.kH, geo.kW)
    )
    # (G, N*P, K) = G W
    dcols = np.matmul(g_rows, w_cols.transpose(0, 2, 1))
    dcols = dcols.reshape(G, geo.N, geo.H_out, geo.W_out, geo.kH, geo.kW, C_g)
    # (N, G, C_in/g, kH, kW, H_out, W_out)
    dcols = dcols.transpose(1, 0, 6, 4, 5, 2, 3)
    top, bottom, left, right = geo.pad
    H_pad, W_pad = geo.H + top + bottom, geo.W + left + right
    # (N, G, C_in/g, Hp, Wp)
    dx_pad = np.zeros((geo.N, G, C_g, H_pad, W_pad), dtype=work)
    # col2im: each kernel offset (m, n)
    for m in range(geo.kH):
        # adds to the inputs it read
        for n in range(geo.kW):
            # i s + m d
            rows = slice(m * d_h, m * d_h + s_h * (geo.H_out - 1) + 1, s_h)
            # j s + n d
            cols_ = slice(n * d_w, n * d_w + s_w * (geo.W_out - 1) + 1, s_w)
            dx_pad[..., rows, cols_] += dcols[:, :, :, m, n]
    # (N, C_in, H, W)
    dx = dx_pad.reshape(geo.N, geo.C_in, H_pad, W_pad)[
        :, :, top : H_pad - bottom, left : W_pad - right
    ]
    return (
        np.ascontiguousarray(dx, dtype=x.dtype),
        dweight.astype(x.dtype, copy=False),
        dbias.astype(x.dtype, copy=False),
    )


# --- the same receptive fields without sharing ----------------------------------------


def locally_connected2d(x, weight, bias=None, *, stride=1, padding=0) -> np.ndarray:
    r"""A locally connected layer: a convolution's receptive fields, one kernel per
    position.

    .. math::

        Y_{b,o,i,j} = \mathrm{bias}_{i,j,o} + \sum_{c,m,n}
            X^{\mathrm{pad}}_{b,\,c,\; i s_H + m,\; j s_W + n}\; W_{i,j,o,c,m,n}

    ``x (N, C_in, H, W)``, ``weight (H_out, W_out, C_out, C_in, kH, kW)``,
    ``bias (H_out, W_out, C_out)`` or None (unshared too, as in the old Keras
    ``LocallyConnected2D``) -> ``(N, C_out, H_out, W_out)``. With every ``weight[i, j]``
    equal to one kernel it is :func:`conv2d_reference`; in general it has
    ``H_out W_out`` times the parameters
    (:func:`companion.params.locally_connected2d_parameter_count`) and must learn a
    pattern separately at every position. ``padding``: int, pair, ``"valid"`` or
    ``"same"`` (stride 1).
    """
    arrays = _check_arrays(x=x, weight=weight, bias=bias)
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    if weight.ndim != 6:
        raise ValueError(
            "weight must have shape (H_out, W_out, C_out, C_in, kH, kW), got shape "
            f"{weight.shape}"
        )
    H_out_w, W_out_w, C_out, C_in, kH, kW = weight.shape
    geo = conv2d_geometry(
        x.shape, (C_out, C_in, kH, kW), stride=stride, padding=padding
    )
    if (geo.H_out, geo.W_out) != (H_out_w, W_out_w):
        raise ValueError(
            f"weight {weight.shape} has {H_out_w} x {W_out_w} positions but x "
            f"{x.shape} with "
            f"kernel {kH} x {kW}, stride {stride} and padding {padding!r} gives "
            f"{geo.H_out} x {geo.W_out} output positions"
        )
    if bias is not None and bias.shape != (geo.H_out, geo.W_out, C_out):
        raise ValueError(
            "bias must have shape (H_out, W_out, C_out) = "
            f"{(geo.H_out, geo.W_out, C_out)}, "
            f"got {bias.shape}"
        )
    work = _compute_dtype(x.dtype)
    s_h, s_w = geo.stride
    # (N, C_in, Hp, Wp)
    x_pad = _pad(x.astype(work, copy=False), geo.pad)
    # (N, C_in, H_out, W_out, kH, kW)
    windows = sliding_window_view(x_pad, (kH, kW), axis=(2, 3))[:, :, ::s_h, ::s_w]
    # (N, C_out, H_out, W_out)
    y = np.einsum("bcijmn,ijocmn->boij", windows, weight.astype(work, copy=False))
    if bias is not None:
        # + bias_{i,j,o}
        y = y + bias.astype(work, copy=False).transpose(2, 0, 1)
    return y.astype(x.dtype, copy=False)
