r"""Attention, one head, ``d = 64``, float32: every contender at every ``n``, full and causal.

Contenders (each a factory ``(n, causal, threads) -> zero-argument callable`` whose inputs
are built before the clock starts):

- ``textbook``: the line as tutorials write it, ``softmax(Q @ K.T / np.sqrt(d)) @ V``
  (``np.sqrt`` returns float64 and promotes the float32 scores: 2x memory);
- ``reference``: :func:`companion.numpy.scaled_dot_product_attention_reference`;
- ``tiled``: :func:`companion.numpy.attention_tiled` with ``num_threads = threads``;
- ``torch tiled``, ``tf tiled``: the torch and TensorFlow ``attention_tiled``;
- ``torch SDPA``: ``torch.nn.functional.scaled_dot_product_attention``;
- ``bound``: ``4 n^2 d / rate`` (half of it, ``2 n (n + 1) d``, for causal), with the
  matrix-product rate measured in the same run on attention's own two products,
  ``Q K^T (n x d)(d x n)`` and ``P V (n x n)(n x d)``, at the same threads;
  ``bound (peak)`` uses the rate of a large square product instead.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from companion.bench import timing

D = 64
BLOCK = 512  # rows per tile for every tiled kernel (512 x 512 float32 scores = 1 MiB)
NUMPY = ("textbook", "reference", "tiled")
TORCH = ("torch tiled", "torch SDPA")
TENSORFLOW = ("tf tiled",)
PRODUCTS = ("Q K^T", "P V")  # timed to get the matrix-product rate; not contenders
# larger calls are timed without a warm-up call (it would cost a round)
WARMUP_BELOW = 4096


def inputs(n: int, seed: int = 0):
    """``q, k, v`` of shape ``(1, n, D)`` (one head), float32."""
    rng = np.random.default_rng(seed + n)
    # (H=1, n, D) each
    return tuple(rng.standard_normal((1, n, D), dtype=np.float32) for _ in range(3))


def textbook(q, k, v, causal: bool = False):
    """``softmax(Q @ K.T / np.sqrt(d)) @ V`` exactly as tutorials write it (float64 result)."""
    Q, K, V = q[0], k[0], v[0]  # (n, D)
    d = Q.shape[-1]
    scores = Q @ K.T / np.sqrt(d)  # (n, n), float64: np.sqrt returns a float64 scalar
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape, dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ V  # (n, D)


def contender(name: str, n: int, causal: bool, threads: int, modules: dict):
    """A zero-argument callable that runs ``name`` once on fresh inputs of size ``n``."""
    q, k, v = inputs(n)
    if name == "textbook":
        return lambda: textbook(q, k, v, causal)
    if name == "reference":
        from companion.numpy import scaled_dot_product_attention_reference as reference

        return lambda: reference(q, k, v, causal=causal)
    if name == "tiled":
        from companion.numpy import attention_tiled

        return lambda: attention_tiled(
            q, k, v, causal=causal, block_q=BLOCK, block_k=BLOCK, num_threads=threads
        )
    if name == "Q K^T":
        Q, K = q[0], k[0]
        return lambda: Q @ K.T  # (n, n)
    if name == "P V":
        P = np.random.default_rng(n).random((n, n), dtype=np.float32)  # (n, n)
        V = v[0]
        return lambda: P @ V  # (n, D)
    if name in TORCH:
        torch = modules["torch"]
        # (1, n, D), shared memory
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        if name == "torch SDPA":
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def run():
                with torch.no_grad():
                    return sdpa(tq, tk, tv, is_causal=causal)

            return run
        from companion.torch import attention_tiled as torch_tiled

        def run():
            with torch.no_grad():
                return torch_tiled(
                    tq, tk, tv, causal=causal, block_q=BLOCK, block_k=BLOCK
                )

        return run
    if name == "tf tiled":
        tf = modules["tensorflow"]
        from companion.tensorflow import attention_tiled as tf_tiled

        tq, tk, tv = (tf.constant(a) for a in (q, k, v))
        return lambda: tf_tiled(tq, tk, tv, causal=causal, block_q=BLOCK, block_k=BLOCK)
    raise ValueError(f"unknown attention contender {name!r}")


def available(modules: dict) -> list[str]:
    names = list(NUMPY)
    if modules.get("torch") is not None:
        names += TORCH
    if modules.get("tensorflow") is not None:
        names += TENSORFLOW
    return names


def check_outputs(modules: dict, n: int = 256) -> dict[str, float]:
    """Max |difference| of every contender's output from the float64 reference, full and causal.

    Raises ``AssertionError`` if one is off by more than float32 rounding allows.
    """
    from companion.numpy import scaled_dot_product_attention_reference as reference
    from companion.testing import to_numpy

    q, k, v = inputs(n)
    worst = {}
    for causal in (False, True):
        # (n, D)
        oracle = reference(*(a.astype(np.float64) for a in (q, k, v)), causal=causal)[0]
        for name in available(modules):
            out = np.asarray(
                to_numpy(contender(name, n, causal, 1, modules)()), dtype=np.float64
            ).reshape(n, D)
            diff = float(np.max(np.abs(out - oracle)))
            key = f"{name}{' causal' if causal else ''}"
            worst[key] = diff
            if not diff <= 1e-4:
                raise AssertionError(
                    f"attention contender {key} differs from the float64 reference by {diff:.3g}"
                )
    return worst


def time_all(
    sizes,
    threads: int,
    rounds_for,
    modules: dict,
    progress,
    skip_textbook_above: int,
    skip_others_above: int = 1 << 30,
) -> dict:
    """Median seconds of every contender at every ``n``, full and causal, plus the bounds.

    Returns ``{"full"|"causal": {name: {n: seconds}}}``; names include ``bound`` and
    ``bound (peak)``.
    """
    from threadpoolctl import threadpool_limits

    peak_rate = matmul_peak_rate(threads)
    results = {"full": {}, "causal": {}}
    names = available(modules)
    timing.set_threads(threads, modules.get("torch"))
    for n in sizes:
        for causal in (False, True):
            kind = "causal" if causal else "full"
            here = [
                m
                for m in names
                if not (m == "textbook" and n > skip_textbook_above)
                and not (m in ("torch tiled", "tf tiled") and n > skip_others_above)
            ]
            if not causal:
                here += PRODUCTS
            progress(f"attention n={n} {kind}, {threads} thread(s): {', '.join(here)}")
            with threadpool_limits(limits=threads, user_api="blas"):
                runs = {m: contender(m, n, causal, threads, modules) for m in here}
                medians = timing.race(runs, rounds_for(n), warmup=n < WARMUP_BELOW)
            del runs
            for m, seconds in medians.items():
                results[kind].setdefault(m, {})[n] = seconds
            flops = 4 * n * n * D if not causal else 2 * n * (n + 1) * D
            # 4 n^2 d flops
            products = results["full"]["Q K^T"][n] + results["full"]["P V"][n]
            results[kind].setdefault("bound", {})[n] = (
                products * flops / (4 * n * n * D)
            )
            results[kind].setdefault("bound (peak)", {})[n] = flops / peak_rate
    for m in PRODUCTS:
        del results["full"][m]
    return results


def matmul_peak_rate(threads: int, size: int = 1024) -> float:
    """Floating-point operations per second of a square float32 product at ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    with threadpool_limits(limits=threads, user_api="blas"):
        seconds = timing.race({"square": lambda: a @ b}, 5)["square"]
    return 2 * size**3 / seconds


def equal_threads(sizes, thread_counts, rounds_for, modules: dict, progress) -> dict:
    """``tiled`` against ``torch SDPA`` at 1, 2, ... threads: ``{threads: {kind: {name: {n: s}}}}``."""
    from threadpoolctl import threadpool_limits

    torch = modules.get("torch")
    names = ["tiled"] + (["torch SDPA"] if torch is not None else [])
    results = {}
    for threads in thread_counts:
        timing.set_threads(threads, torch)
        for n in sizes:
            for causal in (False, True):
                kind = "causal" if causal else "full"
                progress(
                    f"equal threads: n={n} {kind}, {threads} thread(s): {', '.join(names)}"
                )
                with threadpool_limits(limits=threads, user_api="blas"):
                    runs = {m: contender(m, n, causal, threads, modules) for m in names}
                    medians = timing.race(runs, rounds_for(n), warmup=n < WARMUP_BELOW)
                for m, seconds in medians.items():
                    results.setdefault(threads, {}).setdefault(kind, {}).setdefault(
                        m, {}
                    )[n] = seconds
    return results


# --- peak extra memory -------------------------------------------------------------------------


def numpy_memory(
    sizes, threads: int, progress, skip_textbook_above: int, tiled_only_above: int
) -> dict:
    """Peak extra bytes (tracemalloc) of the numpy contenders: ``{kind: {name: {n: bytes}}}``."""
    results = {"full": {}, "causal": {}}
    for n in sizes:
        for causal in (False, True):
            kind = "causal" if causal else "full"
            for name in NUMPY:
                if (name == "textbook" and n > skip_textbook_above) or (
                    name != "tiled" and n > tiled_only_above
                ):
                    continue
                progress(f"memory (tracemalloc) n={n} {kind}: {name}")
                run = contender(name, n, causal, threads, {})
                results[kind].setdefault(name, {})[n] = timing.traced_peak(run)
                del run
    return results


def framework_memory(sizes, names, threads: int, progress) -> dict:
    """Peak extra resident bytes of torch/TensorFlow contenders, each framework in a fresh process."""
    results = {"full": {}, "causal": {}}
    for group in (TORCH, TENSORFLOW):
        wanted = [m for m in names if m in group]
        if not wanted or not sizes:
            continue
        progress(
            f"memory (fresh process, resident size) n={list(sizes)}: {', '.join(wanted)}"
        )
        request = json.dumps(
            {"sizes": list(sizes), "names": wanted, "threads": threads}
        )
        done = subprocess.run(
            [sys.executable, "-m", "companion.bench.memprobe", request],
            capture_output=True,
            text=True,
            env=timing.fresh_process_env(),
        )
        if done.returncode != 0:
            progress(
                f"memory probe failed for {', '.join(wanted)}: {done.stderr.strip()[-500:]}"
            )
            continue
        for kind, per_name in json.loads(done.stdout.strip().splitlines()[-1]).items():
            for name, per_n in per_name.items():
                results[kind].setdefault(name, {}).update(
                    {int(n): b for n, b in per_n.items()}
                )
    return results


def probe(request: dict) -> dict:
    """Run in a fresh process (:mod:`companion.bench.memprobe`): resident peaks per contender and n."""
    names = request["names"]
    modules = {
        "torch": timing.framework("torch") if any(m in TORCH for m in names) else None,
        "tensorflow": timing.framework("tensorflow")
        if any(m in TENSORFLOW for m in names)
        else None,
    }
    timing.set_threads(request["threads"], modules["torch"])
    results = {"full": {}, "causal": {}}
    for name in names:
        # load kernels before measuring
        contender(name, 64, False, request["threads"], modules)()
        for n in request["sizes"]:
            for causal in (False, True):
                run = contender(name, n, causal, request["threads"], modules)
                results["causal" if causal else "full"].setdefault(name, {})[n] = (
                    timing.resident_peak(run)
                )
                del run
    return results


def scores_bytes(n: int) -> int:
    """Bytes of one ``n x n`` float32 score matrix, for scale."""
    return 4 * n * n
