"""Mixture of experts: grouped dispatch against the per-expert loop and a dense MLP.

One MoE feed-forward layer in torch (float32, one thread): ``T`` tokens of width
``E``, ``N`` SwiGLU experts of hidden width ``F``, each token routed to its top ``k``.
Three ways, timed side by side, alternating call by call:

- ``loop``: :func:`companion.torch.moe.experts_forward` with ``implementation="loop"``
  (the per-expert loop of Hugging Face's ``MixtralExperts``, adding in place);
- ``grouped``: the same with ``implementation="grouped"`` (assignments sorted by
  expert once, torch's grouped matrix product over runs of sorted rows, no padding);
- ``dense``: one SwiGLU MLP of hidden width ``k F`` on every token, the same active
  FLOPs per token as the MoE layer, what the experts' dispatch would cost nothing
  beyond.

Each is timed forward (no gradient), and the loop and grouped dispatch also forward
and backward (the gradients of ``x``, the gates and both expert stacks: training,
where the loop's ``gate_up[e]`` costs a stack-sized gradient per expert). Each case
runs twice: a balanced router (random logits) and a skewed one (logits
plus a ramp from 3 to 0 across the experts: the first experts get several times the
mean load, the heaviest's share is recorded). The grouped and loop outputs are
checked equal first. The target ratios are the worst over the cases: the smallest
loop / grouped speed-up and the largest grouped / dense ratio.
"""

from __future__ import annotations

import os
import statistics
import time

# (name, T, E, N, k, F): DeepSeekMoE's fine-grained shape, then Mixtral's (8 experts,
# top 2) and a many-expert top 2 at the same widths
FULL = dict(
    cases=[
        ("fine-grained", 4096, 512, 64, 6, 128),
        ("8 experts", 4096, 256, 8, 2, 512),
        ("64 experts", 4096, 256, 64, 2, 512),
    ],
    rounds=7,
    backward_rounds=3,
)
QUICK = dict(FULL, rounds=3, backward_rounds=1)
TINY = dict(cases=[("tiny", 64, 16, 8, 2, 8)], rounds=1, backward_rounds=1)
LOADS = ("balanced", "skewed")


def _case(name, T, E, N, k, F, load, rounds, backward_rounds):
    import torch

    from companion.testing import assert_close, assert_close_to_oracle
    from companion.torch.moe import _ffn, experts_forward

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, E, generator=gen)  # (T, E)
    logits = torch.randn(T, N, generator=gen)  # (T, N)
    if load == "skewed":
        logits = logits + torch.linspace(3.0, 0.0, N)
    weights, indices = torch.topk(torch.softmax(logits, dim=-1), k)  # (T, k) each
    gate_up = torch.randn(N, 2 * F, E, generator=gen) / E**0.5  # (N, 2F, E)
    down = torch.randn(N, E, F, generator=gen) / F**0.5  # (N, E, F)
    # the dense MLP with the active FLOPs of k experts: (2 k F, E), (E, k F)
    dense_gate_up = torch.randn(2 * F * k, E, generator=gen) / E**0.5
    dense_down = torch.randn(E, F * k, generator=gen) / (F * k) ** 0.5
    counts = torch.bincount(indices.reshape(-1), minlength=N)
    ways = {
        "loop": lambda: experts_forward(
            x, indices, weights, gate_up, down, implementation="loop"
        ),
        "grouped": lambda: experts_forward(
            x, indices, weights, gate_up, down, implementation="grouped"
        ),
        "dense": lambda: _ffn(x, dense_gate_up, dense_down),
    }
    seconds = {way: [] for way in ways}
    with torch.no_grad():
        assert_close(ways["grouped"](), ways["loop"](), name="grouped vs loop")
        ways["dense"]()
        for _ in range(rounds):
            for way, call in ways.items():
                start = time.perf_counter()
                call()
                seconds[way].append(time.perf_counter() - start)
    ms = {way: 1e3 * statistics.median(s) for way, s in seconds.items()}
    train = [x, weights, gate_up, down]  # leaves whose gradients a step needs

    def step(implementation, dtype=torch.float32):
        x_, weights_, gate_up_, down_ = (
            t.detach().to(dtype).requires_grad_(True) for t in train
        )
        y = experts_forward(
            x_, indices, weights_, gate_up_, down_, implementation=implementation
        )
        y.square().sum().backward()
        return [t.grad for t in (x_, weights_, gate_up_, down_)]

    # gradients: the grouped dispatch at most 2x as far from float64 as the loop
    # (float64 grouped, equal to the loop to 1e-10 in the tests, is the oracle)
    backward = {impl: step(impl) for impl in ("loop", "grouped")}  # and warm
    oracle = step("grouped", torch.float64)
    for a, b, o, what in zip(
        backward["grouped"], backward["loop"], oracle, ("x", "gates", "gate_up", "down")
    ):
        assert_close_to_oracle(a, b, o, name=f"d {what}: grouped")
    seconds = {"loop": [], "grouped": []}
    for _ in range(backward_rounds):
        for impl in seconds:
            start = time.perf_counter()
            step(impl)
            seconds[impl].append(time.perf_counter() - start)
    for impl, s in seconds.items():
        ms[f"{impl} fwd+bwd"] = 1e3 * statistics.median(s)
    return {
        "case": name,
        "load": load,
        "size": dict(tokens=T, embed_dim=E, experts=N, top_k=k, hidden=F),
        "heaviest_over_mean": float(counts.max()) / (T * k / N),
        "ms": ms,
        "loop_over_grouped": ms["loop"] / ms["grouped"],
        "grouped_over_dense": ms["grouped"] / ms["dense"],
        "loop_over_grouped_fwd_bwd": ms["loop fwd+bwd"] / ms["grouped fwd+bwd"],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run_all(size: dict, progress, threads: int = 1) -> dict:
    """ms per call of each way in every case and load; the targets' two ratios are
    the worst over them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases = []
    try:
        for name, T, E, N, k, F in size["cases"]:
            for load in LOADS:
                progress(
                    f"mixture of experts, {name}, {load}: T = {T}, E = {E}, "
                    f"{N} experts of {F}, top {k}"
                )
                cases.append(
                    _case(
                        name,
                        T,
                        E,
                        N,
                        k,
                        F,
                        load,
                        size["rounds"],
                        size["backward_rounds"],
                    )
                )
    finally:
        torch.set_num_threads(before)
    return {
        "size": {
            "cases": [list(c) for c in size["cases"]],
            "rounds": size["rounds"],
            "backward_rounds": size["backward_rounds"],
        },
        "threads": threads,
        "cases": cases,
        "loop_over_grouped": min(c["loop_over_grouped"] for c in cases),
        "grouped_over_dense": max(c["grouped_over_dense"] for c in cases),
    }


def table(results: dict) -> str:
    from companion.bench.report import _table

    rows = []
    for c in results["cases"]:
        s = c["size"]
        rows.append(
            [
                f"{c['case']}: T {s['tokens']}, E {s['embed_dim']}, "
                f"{s['experts']} x {s['hidden']}, top {s['top_k']}",
                c["load"],
                f"{c['heaviest_over_mean']:.2f}",
                *(f"{c['ms'][way]:.2f}" for way in ("loop", "grouped", "dense")),
                f"{c['loop_over_grouped']:.2f}",
                f"{c['grouped_over_dense']:.2f}",
                f"{c['ms']['loop fwd+bwd']:.1f}",
                f"{c['ms']['grouped fwd+bwd']:.1f}",
                f"{c['loop_over_grouped_fwd_bwd']:.2f}",
                "-" if c["load_average"] is None else f"{c['load_average']:.1f}",
            ]
        )
    return (
        f"Mixture of experts, torch float32, {results['threads']} thread(s); "
        "dense MLP of hidden k F (the same active FLOPs); the targets' rows are the "
        "forward ratios, worst case\n"
        + _table(
            [
                "case",
                "load",
                "heaviest/mean",
                "loop ms",
                "grouped ms",
                "dense ms",
                "loop/grouped",
                "grouped/dense",
                "loop fwd+bwd ms",
                "grouped fwd+bwd ms",
                "loop/grouped fwd+bwd",
                "load avg",
            ],
            rows,
        )
    )
