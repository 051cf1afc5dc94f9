"""The capstone GPT's training step with each attention ``implementation``.

One forward + backward (cross-entropy on a random batch) of
:class:`companion.torch.gpt.GPT` at the capstone's budget (``companion.experiments``:
context, batch, vocabulary and base model), once with ``implementation="tiled"`` (the
package's FlashAttention-2 kernel with its own backward) and once with ``"sdpa"``
(torch's fused kernel, forward and backward run inside
``torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION])`` as the attention
section runs it: a fallback to the math path would raise), same weights and batch,
timed interleaved. Losses and
gradients are checked equal first. The target of issue 28: tiled / sdpa <= 1.5x.
"""

from __future__ import annotations

import contextlib
import copy

from companion.bench import timing

__all__ = ["FULL", "QUICK", "TINY", "run_all", "table"]

FULL = dict(rounds=9, model=None, budget=None)  # None: the capstone's own
QUICK = dict(FULL, rounds=3)
TINY = dict(
    rounds=1,
    model=dict(embed_dim=16, num_heads=2, num_layers=1),
    budget=dict(vocab_size=32, context=8, batch_size=2),
)
IMPLEMENTATIONS = ("sdpa", "tiled")


def run_all(size: dict, progress, threads: int) -> dict:
    """Median seconds per training step for each implementation, and their ratio."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from companion import experiments
    from companion.torch.gpt import GPT

    timing.set_threads(threads, torch)
    budget = {**experiments.BUDGET, **(size["budget"] or {})}
    config = dict(size["model"] or experiments.BASE_MODEL)
    V, T, B = budget["vocab_size"], budget["context"], budget["batch_size"]
    torch.manual_seed(0)
    base = GPT(V, T, **config, implementation="sdpa")
    models = {}
    for implementation in IMPLEMENTATIONS:
        model = copy.deepcopy(base)
        model.set_implementation(implementation)
        models[implementation] = model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(V, (B, T), generator=generator)
    targets = torch.randint(V, (B, T), generator=generator)

    def step(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        # "sdpa" may run only the CPU flash kernel, forward and backward
        restrict = (
            sdpa_kernel([SDPBackend.FLASH_ATTENTION])
            if name == "sdpa"
            else contextlib.nullcontext()
        )
        with restrict:
            logits = model(ids)  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
            loss.backward()
        return loss.detach()

    progress(f"gpt training step: checking {', '.join(IMPLEMENTATIONS)} agree")
    losses = {name: float(step(name)) for name in models}
    grads = {
        name: [p.grad for p in model.parameters() if p.grad is not None]
        for name, model in models.items()
    }
    grad_diff = max(
        float((a - b).abs().max())
        for a, b in zip(grads["sdpa"], grads["tiled"], strict=True)
    )
    loss_diff = abs(losses["sdpa"] - losses["tiled"])
    if not (loss_diff < 1e-4 and grad_diff < 1e-3):
        raise RuntimeError(
            f"tiled and sdpa training steps disagree: loss {loss_diff:.2e}, "
            f"gradient {grad_diff:.2e}"
        )
    progress(f"gpt training step: timing ({size['rounds']} rounds)")
    seconds = timing.race(
        {name: (lambda name=name: step(name)) for name in models},
        size["rounds"],
    )
    return {
        "threads": threads,
        "budget": {k: budget[k] for k in ("vocab_size", "context", "batch_size")},
        "model": config,
        "seconds": seconds,
        "ratio": seconds["tiled"] / seconds["sdpa"],
        "sdpa_backend": "FLASH_ATTENTION",  # the only one sdpa_kernel allowed
        "max_abs_diff": {"loss": loss_diff, "grad": grad_diff},
    }


def table(results: dict) -> str:
    b, m = results["budget"], results["model"]
    head = (
        f"GPT training step (forward + backward), torch float32, context "
        f"{b['context']}, batch {b['batch_size']}, vocabulary {b['vocab_size']}, "
        f"{m}; {results['threads']} thread(s); same weights and batch, gradients equal "
        f"(max |difference| {results['max_abs_diff']['grad']:.1e})"
    )
    rows = [f"| {name} | {s * 1e3:.2f} |" for name, s in results["seconds"].items()]
    return "\n".join(
        [head, "| implementation | ms / step |", "|---|---|", *rows]
        + [f"tiled / sdpa: {results['ratio']:.2f}x"]
    )
