"""The one comparison helper that every test and notebook check goes through.

``assert_close`` compares an array from any backend (numpy, torch, TensorFlow, or
anything ``numpy.asarray`` accepts) with an expected one and, on failure, says which
element is worst, by how much, against which tolerance, and how many elements fail.

``assert_close_to_oracle`` applies the rule that tolerance follows the baseline's own
error: a fast path computed in some dtype may be at most ``factor`` times as far from
the float64 oracle as the plain (reference) computation in that same dtype, plus a
rounding floor. That is how flash-attention tests its kernels; it keeps tolerances
honest without hand tuning them per test.

This module imports numpy only; torch and TensorFlow tensors are recognised by duck
typing, so using it never imports a framework.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "to_numpy",
    "as_backend",
    "assert_close",
    "assert_close_to_oracle",
    "default_tolerance",
    "numerical_gradient",
]

# (rtol, atol) used when a test gives none: a few units in the last place of each dtype.
_DEFAULT_TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float16): (2e-3, 2e-3),
}


def to_numpy(x) -> np.ndarray:
    """Return ``x`` as a numpy array, from numpy, torch (any device) or TensorFlow.

    bfloat16 has no numpy dtype; it is converted to float32 exactly.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if hasattr(x, "numpy") and callable(x.numpy):  # tf.Tensor / tf.Variable
        arr = np.asarray(x.numpy())
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        return arr
    return np.asarray(x)


def default_tolerance(dtype) -> tuple[float, float]:
    """The (rtol, atol) used for ``dtype`` when a test gives none."""
    name = getattr(dtype, "name", None) or str(dtype).replace("torch.", "").replace(
        "tf.", ""
    )
    if "bfloat16" in name:
        return (1.6e-2, 1.6e-2)
    try:
        return _DEFAULT_TOLERANCES[np.dtype(name)]
    except (TypeError, KeyError):
        return (0.0, 0.0)  # integers, booleans: exact


def _describe(
    diff: np.ndarray, allowed: np.ndarray, actual, expected
) -> tuple[str, tuple]:
    excess = np.where(np.isnan(diff), np.inf, diff - allowed)
    flat = int(np.argmax(excess))
    index = np.unravel_index(flat, diff.shape) if diff.ndim else ()
    return (
        f"worst element at index {tuple(int(i) for i in index)}: actual "
        f"{float(actual[index]):.9g}, "
        f"expected {float(expected[index]):.9g}, |difference| {diff[index]:.3e}, "
        f"allowed {allowed[index]:.3e}",
        index,
    )


def assert_close(
    actual,
    expected,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = False,
    check_dtype: bool = False,
    name: str = "array",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` element by element.

    Shapes must be equal (no broadcasting: a silent broadcast hides bugs). With
    ``check_dtype``, dtypes must be equal too. ``rtol``/``atol`` default to
    :func:`default_tolerance` of ``actual``'s dtype. NaN and infinities must sit in the
    same places in both (NaN only with ``equal_nan``). The message names the worst
    element, its index, the tolerance, and the share of elements that fail.
    """
    a_raw, e_raw = to_numpy(actual), to_numpy(expected)
    if a_raw.shape != e_raw.shape:
        raise AssertionError(
            f"{name}: shape {a_raw.shape} != expected shape {e_raw.shape}"
        )
    if check_dtype and a_raw.dtype != e_raw.dtype:
        raise AssertionError(
            f"{name}: dtype {a_raw.dtype} != expected dtype {e_raw.dtype}"
        )
    # bfloat16 tensors arrive here as float32 arrays: take the tolerance of the
    # original dtype.
    original = getattr(actual, "dtype", a_raw.dtype)
    default_rtol, default_atol = default_tolerance(
        original if "bfloat16" in str(original) else a_raw.dtype
    )
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a = a_raw.astype(np.float64) if a_raw.dtype.kind in "biuf" else a_raw
    e = e_raw.astype(np.float64) if e_raw.dtype.kind in "biuf" else e_raw
    if a.dtype.kind == "b" or e.dtype.kind not in "fc":
        bad = a != e
        if np.any(bad):
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {bad.size} elements differ; "
                f"first at index {idx}: actual {a[idx]}, expected {e[idx]}"
            )
        return

    a_nan, e_nan = np.isnan(a), np.isnan(e)
    if not equal_nan and (a_nan.any() or e_nan.any()):
        where = np.argwhere(a_nan | e_nan)[0]
        raise AssertionError(
            f"{name}: NaN found ({int(a_nan.sum())} in actual, {int(e_nan.sum())} "
            f"in expected), first at index {tuple(int(i) for i in where)}"
        )
    if (a_nan != e_nan).any():
        where = tuple(int(i) for i in np.argwhere(a_nan != e_nan)[0])
        raise AssertionError(
            f"{name}: NaN in one array only, first at index {where}: "
            f"actual {a[where]}, expected {e[where]}"
        )
    a_inf, e_inf = np.isinf(a), np.isinf(e)
    if (a_inf | e_inf).any() and not np.array_equal(
        np.where(a_inf, a, 0), np.where(e_inf, e, 0)
    ):
        where = tuple(int(i) for i in np.argwhere((a_inf | e_inf) & (a != e))[0])
        raise AssertionError(
            f"{name}: infinities differ, first at index {where}: "
            f"actual {a[where]}, expected {e[where]}"
        )

    finite = ~(a_nan | a_inf | e_inf)
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        diff = np.where(finite, np.abs(a - e), 0.0)
    allowed = atol + rtol * np.where(finite, np.abs(e), 0.0)
    failing = diff > allowed
    if failing.any():
        message, _ = _describe(diff, allowed, a, e)
        raise AssertionError(
            f"{name}: {int(failing.sum())} of {failing.size} elements "
            f"({100.0 * failing.mean():.3g}%) exceed the tolerance rtol={rtol:g}, "
            f"atol={atol:g}; "
            f"{message}"
        )


def assert_close_to_oracle(
    fast,
    baseline,
    oracle,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "fast path",
) -> None:
    """Assert the fast path is at most ``factor`` x as wrong as the baseline, plus
    ``floor``.

    ``oracle`` is the float64 reference; ``baseline`` is the plain implementation run in
    the same dtype as ``fast``. The allowed error is
    ``factor * max|baseline - oracle| + floor``, where ``floor`` defaults to the dtype's
    ``atol`` (so that a baseline that happens to be exact does not demand exactness).
    """
    f, b, o = (to_numpy(t) for t in (fast, baseline, oracle))
    for label, arr in (("baseline", b), ("oracle", o)):
        if arr.shape != f.shape:
            raise AssertionError(
                f"{name}: shape {f.shape} != {label} shape {arr.shape}"
            )
    if floor is None:
        floor = default_tolerance(f.dtype)[1]
    o64 = o.astype(np.float64)
    baseline_error = float(np.max(np.abs(b.astype(np.float64) - o64), initial=0.0))
    bound = factor * baseline_error + floor
    assert_close(
        f.astype(np.float64),
        o64,
        rtol=0.0,
        atol=bound,
        name=(
            f"{name} (allowed {factor:g} x baseline error {baseline_error:.3e}"
            f" + floor {floor:.1e})"
        ),
    )


def as_backend(x, backend: str, dtype: str | None = None):
    """Convert a numpy array to a tensor of ``backend`` ("numpy", "torch",
    "tensorflow").

    ``dtype`` is a name ("float32", "float64", "float16", "bfloat16"); ``None`` keeps
    ``x``'s dtype. The framework is imported only when asked for.
    """
    x = np.asarray(x)
    if backend == "numpy":
        if dtype == "bfloat16":
            raise TypeError("numpy has no bfloat16")
        return x.astype(dtype) if dtype else x.copy()
    if backend == "torch":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(getattr(torch, dtype)) if dtype else t
    if backend == "tensorflow":
        # silences TF before import
        import tensorflow as tf  # noqa: F401

        t = tf.convert_to_tensor(x)
        return tf.cast(t, getattr(tf, dtype)) if dtype else t
    raise ValueError(
        f"backend must be 'numpy', 'torch' or 'tensorflow', got {backend!r}"
    )


def numerical_gradient(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences ``(f(a + eps e_i) - f(a - eps e_i)) / (2 eps)`` of the scalar
    ``f`` at ``a``.

    The check that a hand-written gradient is the gradient; ``a`` is not modified.
    """
    a = np.asarray(a, dtype=np.float64)
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (f(plus) - f(minus)) / (2 * eps)
    return grad
