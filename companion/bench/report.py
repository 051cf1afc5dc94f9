"""The benchmark's tables, its targets with PASS/FAIL, and its figures."""

from __future__ import annotations

from companion.bench.timing import MiB

ATTENTION_ORDER = (
    "textbook",
    "reference",
    "tiled",
    "torch tiled",
    "tf tiled",
    "torch SDPA",
    "torch.compile",
    "keras",
    "torch tiled fwd+bwd",
    "torch SDPA fwd+bwd",
    "tf tiled fwd+bwd",
    "bound",
    "bound (peak)",
)
# each contender of the equal-threads table is divided by the SDPA call doing its work
SDPA_FOR = {
    "torch tiled fwd+bwd": "torch SDPA fwd+bwd",
    "tf tiled fwd+bwd": "torch SDPA fwd+bwd",
}


def _fmt_ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _fmt_mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join(
        [
            line(header),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *map(line, rows),
        ]
    )


def attention_tables(att: dict) -> str:
    out = []
    for kind in ("full", "causal"):
        times = att["times"][kind]
        names = [m for m in ATTENTION_ORDER if m in times]
        sizes = sorted({n for m in names for n in times[m]})
        rows = []
        for n in sizes:
            tiled = times["tiled"].get(n)
            row = [str(n)]
            for m in names:
                t = times[m].get(n)
                row.append("-" if t is None else f"{_fmt_ms(t)} ({t / tiled:.2f}x)")
            rows.append(row)
        out.append(
            f"Attention, {kind}, one head, d = 64, float32, "
            f"{att['threads']} thread(s): "
            f"median ms (time / tiled)"
        )
        out.append(_table(["n", *names], rows))
    for threads, per_kind in sorted(att.get("equal_threads", {}).items()):
        out.append(
            f"Equal threads ({threads}): median ms (time / torch SDPA flash, 4-D "
            "(1, 1, n, 64), is_causal; fwd+bwd: / SDPA fwd+bwd)"
        )
        out.append(equal_threads_table(per_kind))
    mem = att["memory"]
    for kind in ("full", "causal"):
        per_name = mem[kind]
        names = [m for m in ATTENTION_ORDER if m in per_name]
        sizes = sorted({n for m in names for n in per_name[m]})
        rows = [
            [
                str(n),
                _fmt_mib(4 * n * n),
                *(_fmt_mib(per_name[m].get(n)) for m in names),
            ]
            for n in sizes
        ]
        out.append(
            f"Peak extra memory, {kind}, MiB (numpy: tracemalloc; "
            "torch/tf: resident size, fresh "
            f"process); 'n x n f32' is one score matrix, for scale"
        )
        out.append(_table(["n", "n x n f32", *names], rows))
    return "\n\n".join(out)


def equal_threads_table(per_kind: dict) -> str:
    """One row per (kind, n); a column per contender: ``ms (ratio to SDPA)``."""
    names = [
        m for m in ATTENTION_ORDER if any(m in per_kind[kind] for kind in per_kind)
    ]
    rows = []
    for kind in ("full", "causal"):
        res = per_kind.get(kind, {})
        for n in sorted({n for m in res.values() for n in m}, key=int):
            row = [kind, str(n)]
            for m in names:
                t = res.get(m, {}).get(n)
                sdpa = res.get(SDPA_FOR.get(m, "torch SDPA"), {}).get(n)
                if t is None:
                    row.append("-")
                elif sdpa is None or m in ("torch SDPA", "torch SDPA fwd+bwd"):
                    row.append(_fmt_ms(t))
                else:
                    row.append(f"{_fmt_ms(t)} ({t / sdpa:.2f}x)")
            rows.append(row)
    return _table(["kind", "n", *names], rows)


def conv_tables(conv: dict, cases: dict) -> str:
    rows = []
    for case, per_threads in conv["times"].items():
        for threads, times in sorted(per_threads.items()):
            im2col = times["im2col"]
            cells = []
            for m in ("reference", "im2col", "torch", "tf"):
                t = times.get(m)
                cells.append("-" if t is None else f"{_fmt_ms(t)} ({t / im2col:.2f}x)")
            rows.append([f"{case} {cases[case]}", str(threads), *cells])
    diffs = "; ".join(
        f"{case}: " + ", ".join(f"{m} {d:.1e}" for m, d in per.items())
        for case, per in conv["max_abs_diff"].items()
    )
    return (
        "Convolution, float32, (N, C_in, H, W, C_out, k), padding 1: "
        "median ms (time / im2col)\n"
        + _table(["case", "threads", "reference", "im2col", "torch", "tf"], rows)
        + "\nmax |difference| (small: from the float64 loops; resnet: from torch): "
        + diffs
    )


def decoding_table(dec: dict) -> str:
    rows = []
    for label, r in dec["heads"].items():
        rows.append(
            [
                label,
                str(r["num_kv_heads"]),
                f"{r['per_token_ms']['cached']:.2f}",
                f"{r['per_token_ms']['recompute']:.2f}",
                f"{r['seconds']['recompute'] / r['seconds']['cached']:.1f}x",
                "yes" if r["identical_tokens"] else "NO",
                f"{r['max_abs_logit_diff']:.1e}",
                f"{r['cache_filled_bytes'] / 1024:.0f}",
                f"{r['cache_formula_bytes'] / 1024:.0f}",
                f"{r['cache_held_bytes'] / 1024:.0f}",
            ]
        )
    m = dec["model"]
    return (
        f"Decoding {dec['steps']} tokens (greedy, float64; V={m['vocab']}, "
        f"E={m['embed_dim']}, H={m['num_heads']}, layers={m['layers']}, "
        f"prompt={m['prompt']}): ms per token\n"
        + _table(
            [
                "heads",
                "H_kv",
                "cached",
                "recompute",
                "speed-up",
                "same tokens",
                "max |logit diff|",
                "cache KiB",
                "formula KiB",
                "held KiB (capacity)",
            ],
            rows,
        )
    )


# --- targets --------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Every target of the issue: the measured value, the limit and PASS/FAIL/n/a."""
    rows = []

    def add(name, value, limit, at_most: bool, unit="x"):
        if value is None:
            rows.append(
                dict(
                    target=name,
                    value=None,
                    limit=limit,
                    at_most=at_most,
                    status="n/a",
                    unit=unit,
                )
            )
            return
        ok = value <= limit if at_most else value >= limit
        rows.append(
            dict(
                target=name,
                value=value,
                limit=limit,
                at_most=at_most,
                status="PASS" if ok else "FAIL",
                unit=unit,
            )
        )

    att = results.get("attention")
    if att:
        full = att["times"]["full"]

        def t_at(m, n, kind="full"):
            return att["times"][kind].get(m, {}).get(n)

        n0 = 4096
        ratio = (
            None if t_at("tiled", n0) is None else t_at("tiled", n0) / t_at("bound", n0)
        )
        add(
            f"tiled (numpy, f32, n = {n0}, {att['threads']} threads) "
            "/ matrix-product bound",
            ratio,
            1.8,
            True,
        )
        speedups = [
            t_at("textbook", n, kind) / t_at("tiled", n, kind)
            for kind in ("full", "causal")
            for n in full.get("textbook", {})
            if n >= 2048 and t_at("textbook", n, kind)
        ]
        add(
            "textbook / tiled, n >= 2048 (full and causal, the smallest)",
            min(speedups) if speedups else None,
            3.0,
            False,
        )
        equal = {
            int(t): per_kind for t, per_kind in att.get("equal_threads", {}).items()
        }

        def versus(name, threads, kind):
            """``name`` / its SDPA peer at ``n0`` and ``threads`` (None if absent)."""
            res = equal.get(threads, {}).get(kind, {})
            t = res.get(name, {}).get(n0)
            sdpa = res.get(SDPA_FOR.get(name, "torch SDPA"), {}).get(n0)
            return None if t is None or sdpa is None else t / sdpa

        sdpa = "torch SDPA (flash, (1, 1, n, 64), is_causal)"
        for threads in (1, 2):
            for kind in ("full", "causal"):
                add(
                    f"numpy tiled / {sdpa}, {kind}, n = {n0}, {threads} thread(s)",
                    versus("tiled", threads, kind),
                    1.2,
                    True,
                )
        for name, label in (
            ("torch tiled", "torch tiled / torch SDPA"),
            ("torch tiled fwd+bwd", "torch tiled fwd+bwd / torch SDPA fwd+bwd"),
        ):
            for threads in (1, 2):
                for kind in ("full", "causal"):
                    add(
                        f"{label}, {kind}, n = {n0}, {threads} thread(s)",
                        versus(name, threads, kind),
                        2.0,
                        True,
                    )
        tf_threads = att.get("framework_threads")
        for kind in ("full", "causal"):
            add(
                f"tf tiled / torch SDPA, {kind}, n = {n0}, "
                f"{tf_threads or '-'} thread(s)",
                versus("tf tiled", tf_threads, kind),
                3.0,
                True,
            )
        for kind in ("full", "causal"):
            add(
                f"tf tiled fwd+bwd (tape) / torch SDPA fwd+bwd, {kind}, n = {n0}, "
                f"{tf_threads or '-'} thread(s)",
                versus("tf tiled fwd+bwd", tf_threads, kind),
                3.0,
                True,
            )
        for n, limit in ((16384, 16), (32768, 32)):
            peaks = [
                att["memory"][kind].get("tiled", {}).get(n)
                for kind in ("full", "causal")
            ]
            peaks = [p for p in peaks if p is not None]
            add(
                f"tiled peak extra memory, n = {n} (full and causal)",
                max(peaks) / MiB if peaks else None,
                limit,
                True,
                "MiB",
            )
    conv = results.get("conv")
    if conv:
        small = conv["times"].get("small", {}).get(1, {})
        add(
            "conv2d_im2col vs conv2d_reference, small case, 1 thread (speed-up)",
            small["reference"] / small["im2col"] if "reference" in small else None,
            150,
            False,
        )
        for threads, limit in ((1, 2.2), (2, 2.6)):
            times = conv["times"].get("resnet", {}).get(threads, {})
            add(
                f"conv2d_im2col / torch conv2d, ResNet-like layer, {threads} thread(s)",
                times["im2col"] / times["torch"] if "torch" in times else None,
                limit,
                True,
            )
    dec = results.get("decoding")
    if dec:
        r = dec["heads"]["multi-head"]
        speedup = (
            r["seconds"]["recompute"] / r["seconds"]["cached"]
            if r["identical_tokens"]
            else 0.0
        )
        add(
            f"KV-cache decoding vs recomputation, {dec['steps']} tokens, "
            "identical tokens (speed-up)",
            speedup,
            5.0,
            False,
        )
    paged = results.get("paged")
    if paged:
        size = paged["size"]
        for backend in ("numpy", "torch"):
            for S in size["contexts"]:
                for forks in size["forks"]:
                    row = paged["paged"].get(backend, {}).get(f"{S}, forks {forks}")
                    add(
                        f"paged / contiguous-cache decoding, {backend}, S = {S}, "
                        f"{forks} fork(s), per sequence",
                        None if row is None else row["ratio"],
                        1.25,
                        True,
                    )
        g = size["grouped"]
        add(
            f"grouped decoding (L = 1, S = {g['S']}, H = {g['H']}, H_kv = "
            f"{g['H_kv']}, D = {g['D']}): torch reference / SDPA 4-D enable_gqa",
            paged["grouped"]["ratio"]["reference"] if "grouped" in paged else None,
            1.3,
            True,
        )
    if "moe" in results:  # None: asked for, but torch is missing
        moe = results["moe"]
        add(
            "MoE grouped dispatch vs per-expert loop (speed-up)",
            None if moe is None else moe["loop_over_grouped"],
            5.0,
            False,
        )
        add(
            "MoE grouped dispatch / dense MLP of the same active FLOPs",
            None if moe is None else moe["grouped_over_dense"],
            1.5,
            True,
        )
    if "gpt" in results:  # None: asked for, but torch is missing
        gpt = results["gpt"]
        context = "" if gpt is None else f" (context {gpt['budget']['context']})"
        add(
            f"GPT training step, forward+backward{context}: implementation='tiled' "
            "/ 'sdpa'",
            None if gpt is None else gpt["ratio"],
            1.5,
            True,
        )
    return rows


def targets_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        value = (
            "-"
            if r["value"] is None
            else f"{r['value']:.2f}{' ' + r['unit'] if r['unit'] != 'x' else 'x'}"
        )
        sign = "<=" if r.get("at_most", True) else ">="
        limit = f"{sign} {r['limit']:g}{' ' + r['unit'] if r['unit'] != 'x' else 'x'}"
        body.append([r["target"], value, limit, r["status"]])
    return "Targets\n" + _table(["target", "measured", "target", "result"], body)


# --- figures --------------------------------------------------------------------------


def plot(results: dict, directory) -> list[str]:
    """PNG figures into ``directory``: attention time and memory, decoding per token."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    att = results.get("attention")
    if att:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, kind in zip(axes, ("full", "causal")):
            for m in ATTENTION_ORDER:
                per_n = att["times"][kind].get(m)
                if not per_n:
                    continue
                ns = sorted(per_n)
                style = (
                    dict(linestyle="--", color="black")
                    if m == "bound"
                    else dict(linestyle=":", color="grey")
                    if m == "bound (peak)"
                    else dict(marker="o", markersize=3)
                )
                ax.loglog(ns, [1e3 * per_n[n] for n in ns], label=m, **style)
            ax.set_title(
                f"{kind} attention, d = 64, float32, {att['threads']} thread(s)"
            )
            ax.set_xlabel("sequence length n")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("median time (ms)")
        axes[1].legend(fontsize=8)
        written.append(_save(fig, directory, "attention_time.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        per_name = att["memory"]["full"]
        for m in ATTENTION_ORDER:
            per_n = {n: b for n, b in per_name.get(m, {}).items() if b}
            if per_n:
                ns = sorted(per_n)
                ax.loglog(
                    ns, [per_n[n] / MiB for n in ns], marker="o", markersize=3, label=m
                )
        ns = sorted({n for per_n in per_name.values() for n in per_n})
        ax.loglog(
            ns,
            [4 * n * n / MiB for n in ns],
            linestyle="--",
            color="black",
            label="one n x n f32 matrix",
        )
        ax.set_xlabel("sequence length n")
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title("Peak extra memory, full attention")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, directory, "attention_memory.png"))
    dec = results.get("decoding")
    if dec:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        r = dec["heads"]["multi-head"]
        for way in ("recompute", "cached"):
            steps = r["step_ms"][way]
            ax.semilogy(
                range(1, len(steps) + 1),
                steps,
                label=f"{way} ({r['per_token_ms'][way]:.2f} ms/token)",
            )
        ax.set_xlabel("generated token")
        ax.set_ylabel("time of the step (ms)")
        ax.set_title(
            f"Decoding {dec['steps']} tokens: KV cache vs recomputing the prefix"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, directory, "decoding_per_token.png"))
    return written


def _save(fig, directory, name) -> str:
    import os

    import matplotlib.pyplot as plt

    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
