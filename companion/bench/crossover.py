"""``python -m companion.bench crossover``: where ``implementation="auto"`` switches.

``"auto"`` picks, per call, the reference kernel (one ``L x S`` score matrix) or the
tiled kernel (online softmax over blocks) from the number of scores per head,
``L * S``. This measures both on square problems of growing ``n`` (float32, ``H`` heads
of ``d = 64``, full and causal), in interleaved rounds, and reports the smallest ``n``
from which the tiled kernel is at least as fast as the reference at every measured
size: ``n * n`` is the threshold to use on this machine. Each backend's default
(``NUMPY_TILED_FROM_SCORES`` and its twins in ``companion/_implementation.py``) cites
the run it came from. One thread (``--threads 1``) gives the steadiest answer on a
loaded machine.
"""

from __future__ import annotations

import time

import numpy as np

from companion.bench import timing

__all__ = ["SIZES", "run", "table", "main"]

#: n (L = S) measured per run size; "tiny" is a smoke test of the code path only.
SIZES = {
    "full": (128, 256, 384, 512, 768, 1024, 1536, 2048),
    "quick": (256, 512, 1024, 2048),
    "tiny": (16, 32),
}
HEADS, HEAD_DIM = 4, 64


def _contenders(backend: str, module, n: int, causal: bool):
    """(reference, tiled) callables for ``backend`` on (1, H, n, d) float32."""
    rng = np.random.default_rng(0)
    q, k, v = (
        rng.standard_normal((1, HEADS, n, HEAD_DIM)).astype(np.float32)
        for _ in range(3)
    )
    if backend == "numpy":
        import companion.numpy as cn

        ref, tiled = cn.scaled_dot_product_attention_reference, cn.attention_tiled
    elif backend == "torch":
        import companion.torch as ct

        q, k, v = (module.from_numpy(x) for x in (q, k, v))
        ref, tiled = ct.scaled_dot_product_attention_reference, ct.attention_tiled
    else:
        import companion.tensorflow as ctf

        q, k, v = (module.constant(x) for x in (q, k, v))
        ref, tiled = ctf.scaled_dot_product_attention_reference, ctf.attention_tiled

    def reference():
        return ref(q, k, v, causal=causal)

    def fast():
        return tiled(q, k, v, causal=causal)

    return reference, fast


def crossover_n(times: dict) -> int | None:
    """The smallest ``n`` from which ``tiled <= reference`` at every measured size
    (``None``: the reference wins at the largest size). ``times``: n -> (ref, tiled).
    """
    sizes = sorted(times)
    for i, n in enumerate(sizes):
        if all(times[m][1] <= times[m][0] for m in sizes[i:]):
            return n
    return None


def run(size: str = "full", *, threads: int | None = None, without=(), progress=None):
    """Time reference and tiled per backend; the crossovers as a JSON-ready dict."""
    progress = progress or (lambda message: None)
    sizes = SIZES[size]
    rounds = 1 if size == "tiny" else 5
    threads = threads or timing.cores()
    out = {
        "size": size,
        "sizes": list(sizes),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "threads": threads,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": timing.cpu_record(),
        "load_average_start": timing.load_average(),
        "backends": {},
    }
    backends = {"numpy": np}
    for name in ("torch", "tensorflow"):
        module = None if name in without else timing.framework(name)
        if module is not None:
            backends[name] = module
    if "torch" in backends:
        timing.set_threads(threads, backends["torch"])
    if "tensorflow" in backends:
        try:  # only before TensorFlow starts; afterwards it keeps its own count
            backends["tensorflow"].config.threading.set_intra_op_parallelism_threads(
                threads
            )
        except RuntimeError:
            pass
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        _measure(out, backends, sizes, rounds, progress)
    out["load_average_end"] = timing.load_average()
    return out


def _measure(out, backends, sizes, rounds, progress) -> None:
    for backend, module in backends.items():
        result = {"times": {}, "crossover": {}}
        for kind in ("full", "causal"):
            times = {}
            for n in sizes:
                progress(f"crossover {backend} {kind} n = {n}")
                reference, fast = _contenders(backend, module, n, kind == "causal")
                t = timing.race({"reference": reference, "tiled": fast}, rounds)
                times[n] = (t["reference"], t["tiled"])
            result["times"][kind] = {
                str(n): {"reference": r, "tiled": f} for n, (r, f) in times.items()
            }
            result["crossover"][kind] = crossover_n(times)
        found = list(result["crossover"].values())
        # both kinds must have crossed; the later of the two, so "auto" never slows
        # down either
        n = None if None in found else max(found)
        result["n"] = n
        result["tiled_from_scores"] = None if n is None else n * n
        out["backends"][backend] = result


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"implementation='auto' crossover: tiled vs reference, float32, (1, "
        f"{result['heads']}, n, {result['head_dim']}), {result['threads']} thread(s); "
        f"{machine.get('cpu_model', '?')} ({machine.get('isa', '?')}, L2 "
        f"{machine.get('l2_bytes', 0) // 1024} KiB), {result['date']}, load average "
        f"{result['load_average_start']} (start), {result['load_average_end']} (end)",
        "",
        "| backend | kind | " + " | ".join(f"n={n}" for n in result["sizes"]) + " |",
        "|---|---|" + "---|" * len(result["sizes"]),
    ]
    for backend, r in result["backends"].items():
        for kind, times in r["times"].items():
            cells = [f"{t['tiled'] / t['reference']:.2f}x" for t in (times.values())]
            lines.append(f"| {backend} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "(tiled / reference time; below 1 the tiled kernel is faster)", ""]
    for backend, r in result["backends"].items():
        if r["n"] is None:
            value = (
                f"the reference is faster up to n = {result['sizes'][-1]}: keep a "
                f"threshold above {result['sizes'][-1]} ** 2"
            )
        else:
            value = (
                f"{backend.upper()}_TILED_FROM_SCORES = {r['tiled_from_scores']}  "
                f"# {r['n']} x {r['n']} (full from n = {r['crossover']['full']}, "
                f"causal from n = {r['crossover']['causal']})"
            )
        lines.append(f"{backend}: {value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m companion.bench crossover",
        description="Measure, per backend, the sequence length from which the tiled "
        "kernel beats the reference on this machine, and print the "
        "implementation='auto' threshold to use (scores per head, L * S).",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument(
        "--without",
        action="append",
        choices=("torch", "tensorflow"),
        default=[],
        help="leave a framework out (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    progress = timing.Progress(quiet=args.quiet)
    result = run(
        args.size, threads=args.threads, without=set(args.without), progress=progress
    )
    print(table(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1, default=float)
    return 0
