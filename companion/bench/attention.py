r"""Attention, one head, ``d = 64``, float32: every contender, every ``n``.

Every peer is called the way its own documentation recommends for speed, and the run
proves it:

- ``textbook``: the line as tutorials write it, ``softmax(Q @ K.T / np.sqrt(d)) @ V``
  (``np.sqrt`` returns float64 and promotes the float32 scores: 2x memory);
- ``reference``: :func:`companion.numpy.scaled_dot_product_attention_reference`;
- ``tiled``: :func:`companion.numpy.attention_tiled` with ``num_threads = threads``;
- ``torch tiled``, ``tf tiled``: the torch and TensorFlow ``attention_tiled``;
  every tiled kernel with its default blocks (what a user gets without tuning);
- ``torch SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` on 4-D
  ``(B, H, L, D) = (1, 1, n, 64)`` tensors with ``is_causal`` (no mask tensor), called
  inside ``torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION])``: if the flash
  kernel could not run, the call would raise instead of falling back to the math path,
  and the peer is refused. The profiler's kernel names are recorded as well;
- ``torch SDPA fwd+bwd``, ``torch tiled fwd+bwd``: forward and ``autograd.grad`` of the
  three inputs (SDPA still restricted to its flash kernel, forward and backward);
- ``torch.compile``: ``torch.compile`` of the formula ``softmax(Q K^T / sqrt(d)) V``
  (static shapes, compiled before the clock starts; the kernels it ran are recorded);
- ``tf tiled fwd+bwd``: the TensorFlow tiled kernel's forward and its gradients of the
  three inputs under a ``tf.GradientTape`` (eager, as a custom training loop calls it);
- ``keras``: ``keras.ops.dot_product_attention`` on Keras's ``(B, L, H, D)`` layout with
  ``is_causal``, inside ``tf.function`` as a Keras model runs it;
- ``bound``: ``4 n^2 d / rate`` (half of it, ``2 n (n + 1) d``, for causal), with the
  matrix-product rate measured in the same run on attention's own two products,
  ``Q K^T (n x d)(d x n)`` and ``P V (n x n)(n x d)``, at the same threads;
  ``bound (peak)`` uses the rate of a large square product instead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from companion.bench import timing

D = 64
NUMPY = ("textbook", "reference", "tiled")
TORCH = ("torch tiled", "torch SDPA")
TRAINING = ("torch tiled fwd+bwd", "torch SDPA fwd+bwd")
COMPILED = ("torch.compile",)
TENSORFLOW = ("tf tiled", "keras")
# TensorFlow training: timed at TensorFlow's threads against torch SDPA fwd+bwd
TF_TRAINING = ("tf tiled fwd+bwd",)
# the peers that stand for a framework's best path; each is refused if it cannot run
PEERS = ("torch SDPA", "torch SDPA fwd+bwd", "torch.compile", "keras")
# timed up to the config's ``others_up_to`` only (slow, or not in the targets)
SLOW_ABOVE_OTHERS = ("torch tiled", "tf tiled", "keras")
PRODUCTS = ("Q K^T", "P V")  # timed to get the matrix-product rate; not contenders
# larger calls are timed without a warm-up call (it would cost a round)
WARMUP_BELOW = 4096


def inputs(n: int, seed: int = 0):
    """``q, k, v`` of shape ``(1, n, D)`` (one head), float32."""
    rng = np.random.default_rng(seed + n)
    # (H=1, n, D) each
    return tuple(rng.standard_normal((1, n, D), dtype=np.float32) for _ in range(3))


def grad_output(n: int, seed: int = 1) -> np.ndarray:
    """The gradient fed to the backward passes, ``(1, n, D)`` float32."""
    return np.random.default_rng(seed + n).standard_normal((1, n, D), dtype=np.float32)


def textbook(q, k, v, causal: bool = False):
    """``softmax(Q @ K.T / np.sqrt(d)) @ V`` exactly as tutorials write it (float64)."""
    Q, K, V = q[0], k[0], v[0]  # (n, D)
    d = Q.shape[-1]
    # (n, n), float64: np.sqrt returns a float64 scalar
    scores = Q @ K.T / np.sqrt(d)
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape, dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ V  # (n, D)


def _formula(q, k, v, causal: bool):
    """``softmax(Q K^T / sqrt(d)) V`` in torch operations, for ``torch.compile``."""
    import torch

    # (B, H, L, S)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        L, S = scores.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, H, L, D)


def _formula_full(q, k, v):
    return _formula(q, k, v, False)


def _formula_causal(q, k, v):
    return _formula(q, k, v, True)


def _torch_contender(name, q, k, v, n, causal, torch):
    """torch contenders on ``(B, H, L, D) = (1, 1, n, D)`` tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from companion.torch import attention_tiled as torch_tiled

    sdpa = torch.nn.functional.scaled_dot_product_attention
    # (1, 1, n, D): the 4-D layout of SDPA's CPU flash kernel; shares numpy's memory
    tq, tk, tv = (torch.from_numpy(a[None]) for a in (q, k, v))
    if name in TRAINING:
        tq, tk, tv = (t.clone().requires_grad_() for t in (tq, tk, tv))
        grad = torch.from_numpy(grad_output(n)[None])  # (1, 1, n, D)

        def forward():
            if name == "torch SDPA fwd+bwd":
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return sdpa(tq, tk, tv, is_causal=causal)
            return torch_tiled(tq, tk, tv, causal=causal)

        def train():
            out = forward()
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                grads = torch.autograd.grad(out, (tq, tk, tv), grad)
            return out.detach(), grads

        return train
    if name == "torch SDPA":

        def run():
            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return sdpa(tq, tk, tv, is_causal=causal)

        return run
    if name == "torch tiled":

        def run():
            with torch.no_grad():
                return torch_tiled(tq, tk, tv, causal=causal)

        return run
    if name == "torch.compile":
        compiled = torch.compile(
            _formula_causal if causal else _formula_full, dynamic=False
        )

        def run():
            with torch.no_grad():
                return compiled(tq, tk, tv)

        run()  # compiles for this shape, before the clock starts
        return run
    raise ValueError(f"unknown torch contender {name!r}")


def _tf_contender(name, q, k, v, causal, tf):
    if name == "tf tiled fwd+bwd":
        from companion.tensorflow import attention_tiled as tf_tiled

        n = q.shape[1]
        # (1, 1, n, D)
        tq, tk, tv = (tf.constant(a[None]) for a in (q, k, v))
        grad = tf.constant(grad_output(n)[None])  # (1, 1, n, D)

        def train():
            with tf.GradientTape() as tape:
                tape.watch((tq, tk, tv))
                out = tf_tiled(tq, tk, tv, causal=causal)
            grads = tape.gradient(out, (tq, tk, tv), output_gradients=grad)
            return out, grads

        train()  # traces the kernels' graphs for this shape before the clock starts
        return train
    if name == "tf tiled":
        from companion.tensorflow import attention_tiled as tf_tiled

        # (1, 1, n, D)
        tq, tk, tv = (tf.constant(a[None]) for a in (q, k, v))

        def run():
            return tf_tiled(tq, tk, tv, causal=causal)

        run()  # traces its graph for this shape before the clock starts
        return run
    if name == "keras":
        import keras

        # (B, L, H, D) = (1, n, 1, D): Keras's layout
        tq, tk, tv = (tf.constant(a[:, :, None, :]) for a in (q, k, v))

        def attend(q, k, v):
            return keras.ops.dot_product_attention(q, k, v, is_causal=causal)

        traced = tf.function(attend, autograph=False)
        traced(tq, tk, tv)  # traced before the clock starts
        return lambda: traced(tq, tk, tv)
    raise ValueError(f"unknown TensorFlow contender {name!r}")


def contender(name: str, n: int, causal: bool, threads: int, modules: dict):
    """A zero-argument callable that runs ``name`` once on inputs of size ``n``."""
    q, k, v = inputs(n)
    if name == "textbook":
        return lambda: textbook(q, k, v, causal)
    if name == "reference":
        from companion.numpy import scaled_dot_product_attention_reference as reference

        return lambda: reference(q, k, v, causal=causal)
    if name == "tiled":
        from companion.numpy import attention_tiled

        # default blocks (chosen from the shapes and the cache), as a user calls it
        return lambda: attention_tiled(q, k, v, causal=causal, num_threads=threads)
    if name == "Q K^T":
        Q, K = q[0], k[0]
        return lambda: Q @ K.T  # (n, n)
    if name == "P V":
        # (n, n)
        P = np.random.default_rng(n).random((n, n), dtype=np.float32)
        V = v[0]
        return lambda: P @ V  # (n, D)
    if name in TORCH + TRAINING + COMPILED:
        return _torch_contender(name, q, k, v, n, causal, modules["torch"])
    if name in TENSORFLOW + TF_TRAINING:
        return _tf_contender(name, q, k, v, causal, modules["tensorflow"])
    raise ValueError(f"unknown attention contender {name!r}")


def available(modules: dict) -> list[str]:
    """Contenders whose framework is installed and that were not refused."""
    names = list(NUMPY)
    if modules.get("torch") is not None:
        names += TORCH + TRAINING + COMPILED
    if modules.get("tensorflow") is not None:
        names += TENSORFLOW + TF_TRAINING
    refused = modules.get("refused", {})
    return [m for m in names if m not in refused]


def _oracle(n: int, causal: bool):
    """Float64 output ``(n, D)`` and gradients of the reference (torch autograd)."""
    from companion.numpy import scaled_dot_product_attention_reference as reference

    q, k, v = inputs(n)
    out = reference(*(a.astype(np.float64) for a in (q, k, v)), causal=causal)[0]
    try:
        import torch

        import companion.torch as ct
    except ImportError:
        return out, None
    leaves = [
        torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (q, k, v)
    ]
    result = ct.scaled_dot_product_attention_reference(*leaves, causal=causal)
    grad = torch.from_numpy(grad_output(n).astype(np.float64))
    grads = torch.autograd.grad(result, leaves, grad)
    return out, [g.numpy()[0] for g in grads]


def check_outputs(modules: dict, n: int = 256) -> dict[str, float]:
    """Max |difference| of every contender from the float64 reference, full and causal.

    Gradients of the ``fwd+bwd`` contenders are compared too (relative to the largest
    gradient). A peer that cannot run its best path (``torch SDPA`` outside its flash
    kernel, ``torch.compile`` without a working compiler, ...) is refused: it is
    recorded with the reason in ``modules["refused"]`` and left out of every table.
    Raises ``AssertionError`` if a contender is off by more than float32 rounding.
    """
    from companion.testing import to_numpy

    refused = modules.setdefault("refused", {})
    worst = {}
    for causal in (False, True):
        oracle, oracle_grads = _oracle(n, causal)
        for name in available(modules):
            try:
                result = contender(name, n, causal, 1, modules)()
            except Exception as error:  # noqa: BLE001 - any failure refuses the peer
                if name not in PEERS:
                    raise
                refused[name] = f"{type(error).__name__}: {str(error)[:300]}"
                continue
            key = f"{name}{' causal' if causal else ''}"
            training = name in TRAINING + TF_TRAINING
            out, grads = result if training else (result, None)
            out = np.asarray(to_numpy(out), dtype=np.float64).reshape(n, D)
            diff = float(np.max(np.abs(out - oracle)))
            if grads is not None and oracle_grads is not None:
                for g, g_ref in zip(grads, oracle_grads):
                    g = np.asarray(to_numpy(g), dtype=np.float64).reshape(n, D)
                    scale = max(1.0, float(np.max(np.abs(g_ref))))
                    diff = max(diff, float(np.max(np.abs(g - g_ref))) / scale)
            worst[key] = diff
            if not diff <= 1e-4:
                raise AssertionError(
                    f"attention contender {key} differs from the float64 reference "
                    f"by {diff:.3g}"
                )
    return worst


def kernels_used(modules: dict, n: int = 256) -> dict:
    """The ``aten`` attention kernels each torch peer ran, from the profiler.

    ``{name: {"full"|"causal": [kernel names]}}``. ``torch SDPA`` must show
    ``_scaled_dot_product_flash_attention_for_cpu`` and no math fallback; a peer that
    shows the math path is refused (``modules["refused"]``).
    """
    torch = modules.get("torch")
    if torch is None:
        return {}
    from torch.profiler import ProfilerActivity, profile

    refused = modules.setdefault("refused", {})
    used = {}
    for name in [m for m in available(modules) if m in PEERS + TORCH + TRAINING]:
        if name in TENSORFLOW:
            continue
        for causal in (False, True):
            run = contender(name, n, causal, 1, modules)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            names = sorted(
                {
                    e.key
                    for e in prof.key_averages()
                    if "attention" in e.key or e.key in ("aten::bmm", "aten::_softmax")
                }
            )
            used.setdefault(name, {})["causal" if causal else "full"] = names
            if name.startswith("torch SDPA") and (
                not any("flash" in k for k in names) or any("math" in k for k in names)
            ):
                refused[name] = f"did not run the flash kernel: {names}"
    return used


def time_all(
    sizes,
    threads: int,
    rounds_for,
    modules: dict,
    progress,
    skip_textbook_above: int,
    skip_others_above: int = 1 << 30,
) -> dict:
    """Median seconds of every contender at every ``n``, full and causal, and bounds.

    Returns ``{"full"|"causal": {name: {n: seconds}}}``; names include ``bound`` and
    ``bound (peak)``.
    """
    from threadpoolctl import threadpool_limits

    peak_rate = matmul_peak_rate(threads)
    results = {"full": {}, "causal": {}}
    # forward passes only; torch.compile is timed at equal threads (one compile a size)
    names = [
        m for m in available(modules) if m not in TRAINING + TF_TRAINING + COMPILED
    ]
    timing.set_threads(threads, modules.get("torch"))
    for n in sizes:
        for causal in (False, True):
            kind = "causal" if causal else "full"
            here = [
                m
                for m in names
                if not (m == "textbook" and n > skip_textbook_above)
                and not (m in SLOW_ABOVE_OTHERS and n > skip_others_above)
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
    """Operations per second of a square float32 product at ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    with threadpool_limits(limits=threads, user_api="blas"):
        seconds = timing.race({"square": lambda: a @ b}, 5)["square"]
    return 2 * size**3 / seconds


def equal_threads(
    sizes,
    thread_counts,
    rounds_for,
    modules: dict,
    progress,
    framework_threads: int | None = None,
    compile_sizes=(),
) -> dict:
    """Every fair peer against the tiled kernels at 1, 2, ... threads.

    ``{threads: {kind: {name: {n: seconds}}}}``. TensorFlow's thread count is fixed when
    it starts (``framework_threads``), so its contenders appear only in that row;
    ``torch.compile`` only at ``compile_sizes`` (each size and thread count compiles
    again, before the clock starts).
    """
    from threadpoolctl import threadpool_limits

    torch = modules.get("torch")
    names = [m for m in available(modules) if m not in ("textbook", "reference")]
    results = {}
    for threads in thread_counts:
        timing.set_threads(threads, torch)
        if torch is not None and "torch.compile" in names:
            torch._dynamo.reset()  # compiled code may hold the thread count
        for n in sizes:
            here = [
                m
                for m in names
                if not (m in TENSORFLOW + TF_TRAINING and threads != framework_threads)
                and not (m in COMPILED and n not in compile_sizes)
            ]
            for causal in (False, True):
                kind = "causal" if causal else "full"
                progress(
                    f"equal threads: n={n} {kind}, {threads} thread(s): "
                    + ", ".join(here)
                )
                with threadpool_limits(limits=threads, user_api="blas"):
                    runs = {m: contender(m, n, causal, threads, modules) for m in here}
                    medians = timing.race(runs, rounds_for(n), warmup=n < WARMUP_BELOW)
                del runs
                for m, seconds in medians.items():
                    per_kind = results.setdefault(threads, {}).setdefault(kind, {})
                    per_kind.setdefault(m, {})[n] = seconds
    return results


# --- peak extra memory ----------------------------------------------------------------


def numpy_memory(
    sizes, threads: int, progress, skip_textbook_above: int, tiled_only_above: int
) -> dict:
    """Peak extra bytes (tracemalloc), numpy contenders: ``{kind: {name: {n: b}}}``."""
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
    """Peak extra resident bytes of torch/TensorFlow contenders, in fresh processes."""
    results = {"full": {}, "causal": {}}
    for group in (TORCH, TENSORFLOW):
        wanted = [m for m in names if m in group]
        if not wanted or not sizes:
            continue
        progress(
            f"memory (fresh process, resident size) n={list(sizes)}: "
            + ", ".join(wanted)
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
            failure = done.stderr.strip()[-500:]
            progress(f"memory probe failed for {', '.join(wanted)}: {failure}")
            continue
        for kind, per_name in json.loads(done.stdout.strip().splitlines()[-1]).items():
            for name, per_n in per_name.items():
                results[kind].setdefault(name, {}).update(
                    {int(n): b for n, b in per_n.items()}
                )
    return results


def probe(request: dict) -> dict:
    """In a fresh process (:mod:`companion.bench.memprobe`): resident peaks."""
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
