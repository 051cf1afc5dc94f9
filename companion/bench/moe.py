"""Mixture of experts: grouped dispatch against the per-expert loop and a dense MLP.

One MoE feed-forward layer in torch (float32, one thread): ``T`` tokens of width
``E``, ``N`` SwiGLU experts of hidden width ``F``, each token routed to its top ``k``
(fine-grained experts, DeepSeekMoE's shape of layer). Three ways, timed side by side,
alternating call by call:

- ``loop``: :func:`companion.torch.moe.experts_forward` with ``implementation="loop"``
  (the per-expert loop of Hugging Face's ``MixtralExperts``);
- ``grouped``: the same with ``implementation="grouped"`` (assignments sorted by
  expert once, one scatter back);
- ``dense``: one SwiGLU MLP of hidden width ``k F`` on every token, the same active
  FLOPs per token as the MoE layer, what the experts' dispatch would cost nothing
  beyond.

The grouped and loop outputs are checked equal first.
"""

from __future__ import annotations

import statistics
import time

FULL = dict(tokens=4096, embed_dim=512, experts=64, top_k=6, hidden=128, rounds=7)
QUICK = dict(FULL, rounds=3)
TINY = dict(tokens=64, embed_dim=16, experts=8, top_k=2, hidden=8, rounds=1)


def run_all(size: dict, progress, threads: int = 1) -> dict:
    """ms per call of each way, and the two ratios of the targets."""
    import torch

    from companion.testing import assert_close
    from companion.torch.moe import _ffn, experts_forward

    T, E, N = size["tokens"], size["embed_dim"], size["experts"]
    k, F = size["top_k"], size["hidden"]
    progress(f"mixture of experts: T = {T}, E = {E}, {N} experts of {F}, top {k}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, E, generator=gen)  # (T, E)
        probs = torch.softmax(torch.randn(T, N, generator=gen), dim=-1)  # (T, N)
        weights, indices = torch.topk(probs, k)  # (T, k) each
        gate_up = torch.randn(N, 2 * F, E, generator=gen) / E**0.5  # (N, 2F, E)
        down = torch.randn(N, E, F, generator=gen) / F**0.5  # (N, E, F)
        # the dense MLP with the active FLOPs of k experts: (2 k F, E), (E, k F)
        dense_gate_up = torch.randn(2 * F * k, E, generator=gen) / E**0.5
        dense_down = torch.randn(E, F * k, generator=gen) / (F * k) ** 0.5
        ways = {
            "loop": lambda: experts_forward(
                x, indices, weights, gate_up, down, implementation="loop"
            ),
            "grouped": lambda: experts_forward(
                x, indices, weights, gate_up, down, implementation="grouped"
            ),
            "dense": lambda: _ffn(x, dense_gate_up, dense_down),
        }
        seconds = {name: [] for name in ways}
        with torch.no_grad():
            assert_close(ways["grouped"](), ways["loop"](), name="grouped vs loop")
            ways["dense"]()
            for _ in range(size["rounds"]):
                for name, way in ways.items():
                    start = time.perf_counter()
                    way()
                    seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    return {
        "size": dict(size),
        "threads": threads,
        "ms": ms,
        "loop_over_grouped": ms["loop"] / ms["grouped"],
        "grouped_over_dense": ms["grouped"] / ms["dense"],
    }


def table(results: dict) -> str:
    from companion.bench.report import _table

    s = results["size"]
    return (
        f"Mixture of experts, torch float32, {results['threads']} thread(s): "
        f"T = {s['tokens']}, E = {s['embed_dim']}, {s['experts']} experts of "
        f"{s['hidden']}, top {s['top_k']}; dense MLP of {s['top_k'] * s['hidden']}\n"
        + _table(
            ["way", "ms"], [[name, f"{ms:.2f}"] for name, ms in results["ms"].items()]
        )
    )
