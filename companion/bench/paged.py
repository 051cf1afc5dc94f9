"""Paged decoding against a contiguous cache, and grouped-head decoding against SDPA.

Two races, each run side by side, alternating step by step (float32, one thread
unless ``threads`` says otherwise):

- ``paged``: one decoding step is the append of the new position's keys and values
  plus attention of its query over every cached position. ``contiguous`` appends to a
  :class:`KVCache` and calls the backend's ``scaled_dot_product_attention_reference``
  (what a decoding layer runs); ``paged`` appends to a :class:`PagedKVCache` (blocks
  of 16) and calls ``paged_attention``. With ``forks`` > 1, that many continuations of
  one prompt share its blocks and decode together; the time is per sequence. numpy
  and torch, contexts ``S``.
- ``grouped``: one query (``L = 1``) over ``S = 16384`` keys, ``H = 32`` query heads,
  ``H_kv = 8`` key/value heads, ``D = 128``: the torch reference (the group folded into
  the rows) and tiled kernels against ``scaled_dot_product_attention`` on 4-D inputs
  with ``enable_gqa=True``, called inside
  ``torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION])`` as the attention
  section calls it: if the flash kernel could not run, the call would raise instead of
  falling back to the math path.

The outputs of both sides are checked against each other first (paged = contiguous).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

FULL = dict(
    contexts=(4096, 16384),
    forks=(1, 4),
    num_heads=16,
    head_dim=64,
    block_size=16,
    steps=8,
    rounds=3,
    grouped=dict(H=32, H_kv=8, S=16384, D=128, rounds=9),
)
QUICK = dict(FULL, contexts=(4096,), rounds=2, grouped=dict(FULL["grouped"], rounds=3))
TINY = dict(
    FULL,
    contexts=(128,),
    forks=(1, 2),
    num_heads=4,
    head_dim=8,
    block_size=8,
    steps=2,
    rounds=1,
    grouped=dict(H=4, H_kv=2, S=256, D=16, rounds=1),
)


class _Race:
    """A contiguous and a paged cache of one context, decoding the same positions."""

    def __init__(self, backend: str, S: int, forks: int, size: dict):
        if backend == "torch":
            import torch

            import companion.torch as lib

            self.convert = torch.from_numpy
        else:
            import companion.numpy as lib

            self.convert = np.asarray
        self.lib, self.forks = lib, forks
        H, D, bs = size["num_heads"], size["head_dim"], size["block_size"]
        self.rng = np.random.default_rng(S + forks)
        steps = size["steps"] * (size["rounds"] + 1) + 2
        prompt = S - steps  # the context reaches S on the last step

        def randn(*shape):
            return self.rng.standard_normal(shape, dtype=np.float32)

        k, v = randn(H, prompt, D), randn(H, prompt, D)
        self.contiguous = lib.KVCache()
        # (1, H_kv, S, D)
        self.contiguous.append(self.convert(k[None].copy()), self.convert(v[None]))
        blocks = forks * -(-S // bs) + 8
        self.paged = lib.PagedKVCache(blocks, bs, H, D)
        first = self.paged.new_sequence()
        self.paged.append(first, self.convert(k), self.convert(v))  # (H_kv, S, D)
        self.seqs = [first] + [self.paged.fork(first) for _ in range(forks - 1)]
        # the next token's query, key and value: (B, H, 1, D) and (H, 1, D)
        # (every fork asks the same query: the outputs are checked against one cache)
        self.q = self.convert(np.repeat(randn(1, H, 1, D), forks, axis=0))
        self.k, self.v = self.convert(randn(H, 1, D)), self.convert(randn(H, 1, D))

    def step_contiguous(self):
        key, value = self.contiguous.append(self.k[None], self.v[None])
        return self.lib.scaled_dot_product_attention_reference(
            self.q[:1], key, value, causal=True
        )  # (1, H, 1, D)

    def step_paged(self):
        for seq in self.seqs:
            self.paged.append(seq, self.k, self.v)
        # (B, H, 1, D)
        return self.lib.paged_attention(self.q, self.paged, self.seqs, causal=True)


def _median_ms(seconds) -> float:
    return 1e3 * statistics.median(seconds)


def run_paged(size: dict, backends, progress) -> dict:
    """ms per token and per sequence, contiguous and paged, per backend, S and forks."""
    from companion.testing import assert_close, to_numpy

    results = {}
    for backend in backends:
        rows = results.setdefault(backend, {})
        for S in size["contexts"]:
            for forks in size["forks"]:
                progress(
                    f"paged vs contiguous decoding: {backend}, S = {S}, {forks} fork(s)"
                )
                race = _Race(backend, S, forks, size)
                # warm-up step, and the check: every fork equals the contiguous cache
                expected = to_numpy(race.step_contiguous())[0]
                paged = to_numpy(race.step_paged())
                for b in range(forks):
                    assert_close(paged[b], expected, name=f"paged fork {b}, S = {S}")
                seconds = {"contiguous": [], "paged": []}
                ways = [
                    ("contiguous", race.step_contiguous),
                    ("paged", race.step_paged),
                ]
                # the two ways alternate step by step, in ABBA order, so that a change
                # of the machine's load falls on both alike
                for i in range(size["rounds"] * size["steps"]):
                    for way, step in ways if i % 2 == 0 else ways[::-1]:
                        start = time.perf_counter()
                        step()
                        seconds[way].append(time.perf_counter() - start)
                contiguous = _median_ms(seconds["contiguous"])
                paged_ms = _median_ms(seconds["paged"]) / forks
                rows[f"{S}, forks {forks}"] = {
                    "S": S,
                    "forks": forks,
                    "contiguous_ms": contiguous,
                    "paged_ms_per_sequence": paged_ms,
                    "ratio": paged_ms / contiguous,
                }
                del race
    return results


def run_grouped(size: dict, progress) -> dict:
    """ms of one grouped-head decoding step: ours (reference, tiled) and SDPA."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import companion.torch as ct
    from companion.testing import assert_close

    g = size["grouped"]
    H, H_kv, S, D = g["H"], g["H_kv"], g["S"], g["D"]
    progress(f"grouped decoding: L = 1, S = {S}, H = {H}, H_kv = {H_kv}, D = {D}")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, D, generator=gen)  # (B, H, 1, D)
    k = torch.randn(1, H_kv, S, D, generator=gen)  # (B, H_kv, S, D)
    v = torch.randn(1, H_kv, S, D, generator=gen)

    def sdpa():
        # restricted to the CPU flash kernel: a fallback to the math path would raise
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, enable_gqa=True
            )

    ways = {
        "sdpa (4-D, enable_gqa)": sdpa,
        "reference": lambda: ct.scaled_dot_product_attention_reference(
            q, k, v, causal=True
        ),
        "tiled": lambda: ct.attention_tiled(q, k, v, causal=True),
    }
    seconds = {name: [] for name in ways}
    with torch.no_grad():
        expected = ways["sdpa (4-D, enable_gqa)"]()
        for name, way in ways.items():
            assert_close(way(), expected, name=f"grouped decoding, {name}")
        for _ in range(g["rounds"]):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                seconds[name].append(time.perf_counter() - start)
    times = {name: _median_ms(s) for name, s in seconds.items()}
    base = times["sdpa (4-D, enable_gqa)"]
    return {
        "shape": dict(H=H, H_kv=H_kv, S=S, D=D, L=1),
        "ms": times,
        "ratio": {name: t / base for name, t in times.items()},
        "sdpa_backend": "FLASH_ATTENTION",  # the only one sdpa_kernel allowed
    }


def run_all(size: dict, progress, threads: int | None = None, torch_ok=True) -> dict:
    """Both races; BLAS (numpy) and torch at ``threads`` threads (default 1)."""
    from threadpoolctl import threadpool_limits

    threads = 1 if threads is None else threads
    results = {"size": dict(size), "threads": threads}
    backends = ("numpy", "torch") if torch_ok else ("numpy",)
    with threadpool_limits(limits=threads, user_api="blas"):
        if torch_ok:
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            results["paged"] = run_paged(size, backends, progress)
            if torch_ok:
                results["grouped"] = run_grouped(size, progress)
        finally:
            if torch_ok:
                torch.set_num_threads(before)
    return results


def table(results: dict) -> str:
    """Paged / contiguous per backend, context and forks; grouped decoding vs SDPA."""
    from companion.bench.report import _table

    s = results["size"]
    rows = [
        [
            backend,
            r["S"],
            r["forks"],
            f"{r['contiguous_ms']:.2f}",
            f"{r['paged_ms_per_sequence']:.2f}",
            f"{r['ratio']:.2f}x",
        ]
        for backend, cases in results["paged"].items()
        for r in cases.values()
    ]
    text = (
        f"Paged vs contiguous decoding, float32, H = {s['num_heads']}, "
        f"D = {s['head_dim']}, blocks of {s['block_size']}, {results['threads']} "
        "thread(s): ms per token (paged: per sequence)\n"
        + _table(
            ["backend", "S", "forks", "contiguous", "paged", "paged / contiguous"],
            rows,
        )
    )
    if "grouped" in results:
        g = results["grouped"]
        shape = ", ".join(f"{k} = {v}" for k, v in g["shape"].items())
        text += (
            f"\n\nGrouped-head decoding, torch float32 ({shape}): ms per step\n"
            + _table(
                ["kernel", "ms", "/ SDPA"],
                [
                    [name, f"{ms:.2f}", f"{g['ratio'][name]:.2f}x"]
                    for name, ms in g["ms"].items()
                ],
            )
        )
    return text
