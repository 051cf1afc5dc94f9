"""Convolution: the loops, im2col and the frameworks' built-ins on two float32 layers.

- ``small``: ``N = 2``, ``4 -> 8`` channels, ``16 x 16``, ``3 x 3``, padding 1, bias;
  :func:`companion.numpy.conv2d_reference` (plain loops) runs here only.
- ``resnet``: a ResNet-like layer, ``N = 8``, ``64 -> 64`` channels, ``56 x 56``,
  ``3 x 3``,
  padding 1.

Contenders: ``reference``, ``im2col`` (:func:`companion.numpy.conv2d_im2col`,
``num_threads`` = the threads of the row), ``torch`` (``torch.nn.functional.conv2d``,
oneDNN, at the same
threads) and ``tf`` (``tf.nn.conv2d`` on NHWC inputs, at TensorFlow's own thread count,
fixed when it starts; timed only in the rows at all cores).
"""

from __future__ import annotations

import numpy as np

from companion.bench import timing

CASES = {  # N, C_in, H, W, C_out, k
    "small": (2, 4, 16, 16, 8, 3),
    "resnet": (8, 64, 56, 56, 64, 3),
}
TINY_CASES = {"small": (1, 2, 6, 6, 3, 3), "resnet": (2, 8, 10, 10, 8, 3)}


def arrays(shape, seed: int = 0):
    N, C_in, H, W, C_out, k = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C_in, H, W), dtype=np.float32)  # (N, C_in, H, W)
    weight = rng.standard_normal((C_out, C_in, k, k), dtype=np.float32) / np.float32(
        np.sqrt(C_in * k * k)
    )
    bias = rng.standard_normal(C_out, dtype=np.float32)  # (C_out,)
    return x, weight, bias


def contender(name: str, shape, threads: int, modules: dict):
    """A callable running ``name`` on the layer ``shape`` (NCHW, except tf)."""
    from companion.numpy import conv2d_im2col, conv2d_reference

    x, weight, bias = arrays(shape)
    if name == "reference":
        return lambda: conv2d_reference(x, weight, bias, padding=1)
    if name == "im2col":
        return lambda: conv2d_im2col(x, weight, bias, padding=1, num_threads=threads)
    if name == "torch":
        torch = modules["torch"]
        tx, tw, tb = (torch.from_numpy(a) for a in (x, weight, bias))

        def run():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, padding=1)

        return run
    if name == "tf":
        tf = modules["tensorflow"]
        tx = tf.constant(x.transpose(0, 2, 3, 1))  # (N, H, W, C_in)
        tw = tf.constant(weight.transpose(2, 3, 1, 0))  # (k, k, C_in, C_out)
        tb = tf.constant(bias)
        return lambda: tf.nn.bias_add(
            tf.nn.conv2d(tx, tw, strides=1, padding=[[0, 0], [1, 1], [1, 1], [0, 0]]),
            tb,
        )
    raise ValueError(f"unknown convolution contender {name!r}")


def as_nchw(name: str, out) -> np.ndarray:
    out = np.asarray(out)
    # tf: (N, H, W, C) -> (N, C, H, W)
    return out.transpose(0, 3, 1, 2) if name == "tf" else out


def run_all(
    cases: dict, thread_counts, all_cores: int, rounds: int, modules: dict, progress
) -> dict:
    """``{"times": {case: {threads: {name: s}}}, "max_abs_diff": {case: {m: d}}}``."""
    from threadpoolctl import threadpool_limits

    from companion.numpy import conv2d_reference

    times, diffs = {}, {}
    for case, shape in cases.items():
        x, weight, bias = arrays(shape)
        oracle = (
            conv2d_reference(
                *(a.astype(np.float64) for a in (x, weight, bias)), padding=1
            )
            if case == "small"
            else None
        )
        for threads in thread_counts:
            names = ["reference"] if case == "small" else []
            names += ["im2col"]
            names += ["torch"] if modules.get("torch") is not None else []
            names += (
                ["tf"]
                if modules.get("tensorflow") is not None and threads == all_cores
                else []
            )
            progress(f"conv2d {case} {shape}, {threads} thread(s): {', '.join(names)}")
            timing.set_threads(threads, modules.get("torch"))
            with threadpool_limits(limits=threads, user_api="blas"):
                runs = {m: contender(m, shape, threads, modules) for m in names}
                outputs = {
                    m: as_nchw(m, run()).astype(np.float64) for m, run in runs.items()
                }
                times.setdefault(case, {})[threads] = timing.race(runs, rounds)
            base = (
                oracle
                if oracle is not None
                else outputs.get("torch", outputs["im2col"])
            )
            for m, out in outputs.items():
                diff = float(np.max(np.abs(out - base)))
                diffs.setdefault(case, {})[m] = max(
                    diff, diffs.get(case, {}).get(m, 0.0)
                )
                if not diff <= 1e-3:
                    raise AssertionError(
                        f"conv2d {case}: {m} differs from the baseline by {diff:.3g}"
                    )
    return {"times": times, "max_abs_diff": diffs}
