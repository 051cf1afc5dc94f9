r"""The long-context chapter's measurements on the capstone GPT.

``python -m companion.experiments_long`` trains the base model of
:mod:`companion.experiments` (tied, RoPE, 4 layers, ``E = 64``, 4 heads, context
``T = 64``, 200 steps of Tiny Shakespeare) for each seed and measures, on fixed
validation windows:

* **quantised KV caches**: the validation loss when every layer decodes token by
  token through a :class:`~companion.torch.quantized_cache.QuantizedKVCache` or
  :class:`~companion.torch.quantized_cache.KIVICache` instead of a full-precision
  ``KVCache``
  (the change is paired: same windows, same weights), the relative error of the
  cached keys and values, and the exact bytes per token;
* **attention sinks** beyond the training length: texts of ``4 T`` tokens read with
  full causal attention, with a sliding window, and with a window plus the first
  ``sinks`` tokens (StreamingLLM, Xiao et al. 2023), the sinks at the paper's cache
  positions (:func:`sink_attention`) or at their absolute positions; each at two cache
  sizes, the loss split into positions inside and beyond ``T``; and how much
  attention weight the first token gets (a sink gets far more than its share).

Float32 on the CPU, one thread per run, ``workers`` runs side by side. The record
goes to ``book/_data/long_context_experiments.json``, which ``book/long_context.ipynb``
reads.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from companion.experiments import (
    BASE_MODEL,
    BUDGET,
    _machine,
    _tokenizer,
    _train_config,
    _write_record,
)

__all__ = [
    "QUANTIZED",
    "SINKS",
    "gpt_forward",
    "causal_rope_attention",
    "sink_attention",
    "quantized_losses",
    "sink_losses",
    "first_token_weight",
    "long_context_experiments",
    "main",
]

#: cache name -> (class name, keyword arguments); D = E / H = 16 in the base model
QUANTIZED = {
    "int8 per token": ("QuantizedKVCache", dict(bits=8)),
    "int4, groups of 8": ("QuantizedKVCache", dict(bits=4, group_size=8)),
    "int2, groups of 8": ("QuantizedKVCache", dict(bits=2, group_size=8)),
    "int2, G 8, R 16": ("QuantizedKVCache", dict(bits=2, group_size=8, residual=16)),
    "KIVI-4 (G 8, R 16)": ("KIVICache", dict(bits=4, group_size=8, residual=16)),
    "KIVI-2 (G 8, R 16)": ("KIVICache", dict(bits=2, group_size=8, residual=16)),
}

#: Settings of the sinks measurement, on texts of ``length_factor * T`` tokens with
#: caches of ``cache_sizes`` positions (a window of that size, or ``sinks`` + the rest).
SINKS = dict(length_factor=4, sinks=4, cache_sizes=(16, 64), batches=4)


def _split(x, heads: int):
    B, T, width = x.shape
    return x.reshape(B, T, heads, width // heads).transpose(1, 2)  # (B, heads, T, D)


def gpt_forward(model, ids, attend):
    """The logits of :class:`~companion.torch.gpt.GPT` (pre-norm, RoPE) with its
    attention core replaced: ``attend(q, k, v, rope)`` gets the unrotated queries
    ``(B, H, T, D)``, keys and values ``(B, H_kv, T, D)`` of each layer and returns
    ``(B, H, T, D)``. With :func:`causal_rope_attention` it is ``model(ids)``."""
    x = model.embedding(ids)  # (B, T, E)
    for block in model.layers:
        h = block.norm1(x)
        att = block.attention
        q = _split(att.q_proj(h), att.num_heads)  # (B, H, T, D)
        k = _split(att.k_proj(h), att.num_kv_heads)  # (B, H_kv, T, D)
        v = _split(att.v_proj(h), att.num_kv_heads)  # (B, H_kv, T, D)
        heads = attend(q, k, v, att.rope)  # (B, H, T, D)
        B, H, T, D = heads.shape
        x = x + att.out_proj(heads.transpose(1, 2).reshape(B, T, H * D))
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x))  # (B, T, V)


def _rotate(x, positions, rope):
    from companion.torch import rotary_embedding

    return rotary_embedding(
        x,
        positions,
        base=rope.base,
        interleaved=rope.interleaved,
        rotary_dim=rope.rotary_dim,
    )


def _softmax_attention(scores, v, allowed):
    import torch

    group = scores.shape[1] // v.shape[1]
    scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, dim=-1)  # (B, H, T, T)
    return weights @ v.repeat_interleave(group, dim=1)  # (B, H, T, D)


def causal_rope_attention(q, k, v, rope):
    """Full causal attention at absolute positions (what the GPT computes)."""
    return sink_attention(q, k, v, rope, sinks=0, window=None)


def sink_attention(q, k, v, rope, *, sinks: int, window, positions="slots"):
    r"""One pass that equals decoding through a ``SinkCache(sinks, window)``.

    Query ``i`` sees key ``j <= i`` when ``j < sinks`` or ``i - j < window``
    (``window=None``: every key). ``positions="absolute"`` rotates every query and
    key at its position in the text. ``positions="slots"`` is StreamingLLM's rule:
    positions are slots in the cache, so once the cache is full (``i >= sinks +
    window``) the query sits at slot ``sinks + window - 1`` and sink ``s`` at slot
    ``s``; the window's keys keep their distance ``i - j`` to the query (a rotation
    only sees differences), and only the sinks' scores change: they are computed
    with the query rotated at ``min(i, sinks + window - 1)``.
    """
    import torch

    from companion import _checks, _sinks

    if positions not in ("slots", "absolute"):
        raise ValueError(f"positions must be 'slots' or 'absolute', got {positions!r}")
    if window is None:  # full attention: the sinks see what every key sees
        sinks = _checks.check_int("sinks", sinks, 0)
    else:  # the SinkCache's own check: 0 <= sinks <= window, window >= 1
        sinks, window = _sinks.check_sinks(sinks, window)
    T, D = q.shape[-2], q.shape[-1]
    pos = torch.arange(T)
    group = q.shape[1] // k.shape[1]
    k_rot = _rotate(k, pos, rope).repeat_interleave(group, dim=1)  # (B, H, T, D)
    q_rot = _rotate(q, pos, rope)
    scores = q_rot @ k_rot.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    i, j = pos[:, None], pos[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & ((j < sinks) | (i - j < window))
        if sinks and positions == "slots":
            slot = torch.clamp(pos, max=sinks + window - 1)  # the query's slot
            q_slot = _rotate(q, slot, rope)
            sink_scores = q_slot @ k_rot[:, :, :sinks].transpose(-1, -2) / math.sqrt(D)
            scores = torch.cat([sink_scores, scores[..., sinks:]], dim=-1)
    return _softmax_attention(scores, v, allowed)


def first_token_weight(model, windows, *, start: int, stop: int) -> dict:
    """Per layer, the mean attention weight that queries at positions ``start ..
    stop - 1`` give to position 0 (full causal attention, every head), beside what
    uniform weights would give, ``mean(1 / (i + 1))``: a sink gets far more."""
    import torch

    sums = [0.0] * model.config["num_layers"]
    calls = [0]  # layers run so far: gpt_forward calls attend once per layer

    def attend(q, k, v, rope):
        T, D = q.shape[-2], q.shape[-1]
        pos = torch.arange(T)
        group = q.shape[1] // k.shape[1]
        k_rot = _rotate(k, pos, rope).repeat_interleave(group, dim=1)
        scores = _rotate(q, pos, rope) @ k_rot.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(pos[None, :] > pos[:, None], -math.inf)
        weights = torch.softmax(scores, dim=-1)  # (B, H, T, T)
        i = calls[0] % len(sums)
        calls[0] += 1
        sums[i] += weights[:, :, start:stop, 0].mean().item()
        return weights @ v.repeat_interleave(group, dim=1)

    with torch.no_grad():
        for x, _ in windows:
            gpt_forward(model, x[:, :stop], attend)
    uniform = sum(1 / (i + 1) for i in range(start, stop)) / (stop - start)
    return dict(layers=[w / len(windows) for w in sums], uniform=uniform)


def _validation_windows(tokenizer, length: int, batch: int, batches: int):
    """``batches`` fixed batches of validation windows ``(batch, length)`` and their
    next-token targets (the same for every run)."""
    import torch

    from companion.corpora import corpus
    from companion.train import _encode, _windows

    tokens = _encode(tokenizer, corpus(BUDGET["corpus"]).validation)
    generator = torch.Generator().manual_seed(10_007)
    return [_windows(tokens, batch, length, generator) for _ in range(batches)]


def _losses(logits, targets):
    import torch

    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, reduction="none"
    ).double()  # (B, T)


def sink_losses(model, windows, *, train_length: int, sinks: int, cache_sizes):
    """Mean loss (nats per token) inside and beyond ``train_length`` for full
    attention, windows and windows with sinks (slots and absolute positions)."""
    import torch

    variants = {"full attention": dict(sinks=0, window=None)}
    for size in cache_sizes:
        variants[f"window {size}"] = dict(sinks=0, window=size)
        variants[f"{sinks} sinks + window {size - sinks}"] = dict(
            sinks=sinks, window=size - sinks
        )
        variants[f"{sinks} sinks + window {size - sinks}, absolute positions"] = dict(
            sinks=sinks, window=size - sinks, positions="absolute"
        )
    result = {}
    with torch.no_grad():
        for name, kwargs in variants.items():
            per = [
                _losses(
                    gpt_forward(
                        model,
                        x,
                        lambda q, k, v, r, kw=kwargs: sink_attention(q, k, v, r, **kw),
                    ),
                    y,
                )
                for x, y in windows
            ]
            loss = torch.cat(per)  # (windows, length)
            result[name] = dict(
                inside=loss[:, :train_length].mean().item(),
                beyond=loss[:, train_length:].mean().item(),
            )
    return result


def _make_cache(name: str):
    import companion.torch as ct

    kind, kwargs = QUANTIZED[name]
    return getattr(ct, kind)(**kwargs)


def quantized_losses(model, windows):
    """For each cache of :data:`QUANTIZED`: the mean loss decoding token by token
    through it, its change from the full-precision cache (paired), the relative
    error of the cached keys and values, and the bytes it holds per token."""
    import torch

    from companion.torch import KVCache

    layers = model.config["num_layers"]
    names = ["float32", *QUANTIZED]
    sums = {name: dict(loss=0.0, key=0.0, value=0.0) for name in names}
    nbytes = {}
    with torch.no_grad():
        for x, y in windows:
            caches, losses = {}, {}
            for name in names:
                make = KVCache if name == "float32" else (lambda n=name: _make_cache(n))
                caches[name] = [make() for _ in range(layers)]
                steps = [
                    model(x[:, t : t + 1], caches=caches[name])
                    for t in range(x.shape[1])
                ]
                losses[name] = _losses(torch.cat(steps, dim=1), y).mean().item()
                held = [
                    # the filled part of a full-precision cache, not its capacity
                    c.nbytes
                    if name != "float32"
                    else 4 * (c.key.numel() + c.value.numel())
                    for c in caches[name]
                ]
                nbytes[name] = sum(held) / (x.shape[0] * x.shape[1])
            for name in names:
                sums[name]["loss"] += losses[name]
                for part in ("key", "value"):
                    exact = torch.cat([getattr(c, part) for c in caches["float32"]])
                    approx = torch.cat([getattr(c, part) for c in caches[name]])
                    error = (approx - exact).norm() / exact.norm()
                    sums[name][part] += error.item()
    n = len(windows)
    base = sums["float32"]["loss"] / n
    return {
        name: dict(
            loss=sums[name]["loss"] / n,
            loss_change=sums[name]["loss"] / n - base,
            key_relative_error=sums[name]["key"] / n,
            value_relative_error=sums[name]["value"] / n,
            bytes_per_token=nbytes[name],
        )
        for name in names
    }


def _run(job: tuple) -> dict:
    """Train one seed; measure the quantised caches and the sinks."""
    seed, budget, base, quant_batches = job
    import torch

    torch.set_num_threads(1)
    from companion.torch.gpt import GPT
    from companion.train import train

    tokenizer = _tokenizer(budget["corpus"], budget["vocab_size"], None)
    result = train(_train_config(budget, base, seed), tokenizer=tokenizer)
    T = budget["context"]
    model = result.model.eval()
    quant_windows = _validation_windows(
        tokenizer, T, budget["batch_size"], quant_batches
    )
    length = SINKS["length_factor"] * T
    longer = GPT(budget["vocab_size"], length, **base).eval()
    longer.load_state_dict(model.state_dict())
    sink_windows = _validation_windows(
        tokenizer, length, budget["batch_size"], SINKS["batches"]
    )
    return dict(
        seed=seed,
        validation_loss=result.evaluations[-1][1],
        quantized=quantized_losses(model, quant_windows),
        first_token_weight=first_token_weight(
            model, quant_windows, start=T // 2, stop=T
        ),
        sinks=sink_losses(
            longer,
            sink_windows,
            train_length=T,
            sinks=SINKS["sinks"],
            cache_sizes=SINKS["cache_sizes"],
        ),
        seconds=result.seconds,
    )


def long_context_experiments(
    *, seeds=(0, 1, 2), budget=None, base_model=None, quant_batches=4, workers=2
) -> dict:
    """Every seed's record (see the module docstring), JSON-ready. Smaller
    ``budget`` values make a quick check; the defaults are what the book stores."""
    budget = {**BUDGET, **(budget or {})}
    base = dict(BASE_MODEL if base_model is None else base_model)
    if not seeds or workers < 1:
        raise ValueError(f"need seeds and workers >= 1, got {seeds!r}, {workers!r}")
    started = time.perf_counter()
    jobs = [(seed, budget, base, quant_batches) for seed in seeds]
    if workers == 1:
        runs = [_run(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            runs = list(pool.map(_run, jobs))
    return dict(
        command="python -m companion.experiments_long",
        budget=budget,
        base_model=base,
        seeds=list(seeds),
        quantized_caches={k: [c, dict(v)] for k, (c, v) in QUANTIZED.items()},
        sink_settings=dict(SINKS),
        runs=runs,
        machine=_machine(workers),
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.experiments_long [--out PATH] [--seeds 0 1 2]``."""
    parser = argparse.ArgumentParser(prog="python -m companion.experiments_long")
    parser.add_argument("--out", default="book/_data/long_context_experiments.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    budget = {} if args.steps is None else {"steps": args.steps}
    record = long_context_experiments(
        seeds=tuple(args.seeds), budget=budget, workers=args.workers
    )
    _write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
