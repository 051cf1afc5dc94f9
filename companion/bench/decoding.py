"""Decoding: generate with a :class:`companion.numpy.KVCache`, or recompute the prefix.

A small decoder, float64 so that the two ways agree to the last bit of every choice:
token embeddings ``(V, E)`` tied to the output layer, ``layers`` causal self-attention
blocks with residual connections (:func:`companion.numpy.multi_head_attention`), greedy
choice of the next token.

- ``cached``: the prompt once, then one token per step; each layer's keys and values
  are appended to its own ``KVCache`` and attention reads everything cached.
- ``recompute``: at every step the whole prefix goes through every layer again and the
  last position's logits choose the token.

Both produce the same tokens (checked) and the same logits up to rounding (the largest
difference is reported). KV-cache bytes are measured for multi-head (``H_kv = H``),
grouped-query (``H_kv = H / 4``) and multi-query (``H_kv = 1``) heads.
"""

from __future__ import annotations

import time

import numpy as np

MODEL = dict(vocab=128, embed_dim=128, num_heads=8, layers=1, prompt=8)
TINY_MODEL = dict(vocab=32, embed_dim=16, num_heads=4, layers=1, prompt=4)


class TinyDecoder:
    """Embeddings tied to the output; ``layers`` residual causal attention blocks."""

    def __init__(
        self,
        vocab: int,
        embed_dim: int,
        num_heads: int,
        layers: int,
        num_kv_heads=None,
        seed: int = 0,
    ):
        from companion.numpy import MultiHeadParams

        rng = np.random.default_rng(seed)
        # (V, E)
        self.embedding = rng.standard_normal((vocab, embed_dim)) / np.sqrt(embed_dim)
        self.blocks = [
            MultiHeadParams.random(
                embed_dim, num_heads, num_kv_heads, seed=seed + 1 + i
            )
            for i in range(layers)
        ]

    def logits(self, tokens: np.ndarray, caches=None) -> np.ndarray:
        """Logits of the last position ``(B, V)`` for ``tokens (B, L)``.

        With caches, ``tokens`` are the new ones only.
        """
        from companion.numpy import multi_head_attention

        h = self.embedding[tokens]  # (B, L, E)
        for i, params in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            # (B, L, E)
            h = h + multi_head_attention(h, h, params, causal=True, cache=cache)
        return h[:, -1] @ self.embedding.T  # (B, V)


def generate(model: TinyDecoder, prompt: np.ndarray, steps: int, cached: bool):
    """Greedy tokens ``(B, steps)``, logits ``(steps, B, V)``, caches, step seconds."""
    from companion.numpy import KVCache

    caches = [KVCache() for _ in model.blocks] if cached else None
    tokens, all_logits, seconds = prompt, [], []
    new = prompt  # (B, L): the positions not seen yet
    for _ in range(steps):
        start = time.perf_counter()
        logits = model.logits(new if cached else tokens, caches)  # (B, V)
        choice = logits.argmax(axis=-1)[:, None]  # (B, 1)
        seconds.append(time.perf_counter() - start)
        all_logits.append(logits)
        tokens = np.concatenate([tokens, choice], axis=1)  # (B, L + 1)
        new = choice
    return tokens[:, prompt.shape[1] :], np.stack(all_logits), caches, seconds


def run_all(steps: int, model_size: dict, rounds: int, progress) -> dict:
    """Times, speed-up, same outputs, KV-cache bytes (multi-head, grouped, multi-query).

    Multi-head heads race ``cached`` against ``recompute`` for ``rounds`` interleaved
    rounds; grouped-query and multi-query heads run ``cached`` ``rounds`` times and
    ``recompute`` once (to check the tokens). BLAS runs on one thread: these products
    are small.
    """
    from threadpoolctl import threadpool_limits

    from companion.params import kv_cache_bytes

    sizes = dict(model_size)
    prompt_len = sizes.pop("prompt")
    H = sizes["num_heads"]
    # (B=1, prompt)
    prompt = np.random.default_rng(1).integers(0, sizes["vocab"], size=(1, prompt_len))
    results = {"steps": steps, "model": dict(model_size), "heads": {}}
    for label, H_kv in (
        ("multi-head", H),
        ("grouped-query", max(1, H // 4)),
        ("multi-query", 1),
    ):
        model = TinyDecoder(**sizes, num_kv_heads=H_kv)
        progress(
            f"decoding {steps} tokens, {label} (H={H}, H_kv={H_kv}): "
            "cached vs recompute"
        )
        seconds = {"cached": [], "recompute": []}
        per_step = {"cached": [], "recompute": []}
        outputs = {}
        with threadpool_limits(limits=1, user_api="blas"):
            for round_ in range(rounds):
                for way in ("cached", "recompute"):
                    if way == "recompute" and label != "multi-head" and round_ > 0:
                        continue
                    start = time.perf_counter()
                    outputs[way] = generate(
                        model, prompt, steps, cached=(way == "cached")
                    )
                    seconds[way].append(time.perf_counter() - start)
                    per_step[way].append(outputs[way][3])
        (tok_c, log_c, caches, _), (tok_r, log_r, _, _) = (
            outputs["cached"],
            outputs["recompute"],
        )
        identical = bool(np.array_equal(tok_c, tok_r))
        if not identical:
            raise AssertionError(
                f"decoding ({label}): cached and recomputed tokens differ"
            )
        length = prompt_len + steps - 1  # positions cached after the last step
        head_dim = sizes["embed_dim"] // H
        results["heads"][label] = {
            "num_kv_heads": H_kv,
            "seconds": {way: float(np.median(s)) for way, s in seconds.items()},
            "per_token_ms": {
                way: 1e3 * float(np.median(s)) / steps for way, s in seconds.items()
            },
            "step_ms": {
                way: (1e3 * np.median(np.array(s), axis=0)).tolist()
                for way, s in per_step.items()
            },
            "identical_tokens": identical,
            "max_abs_logit_diff": float(np.max(np.abs(log_c - log_r))),
            "cache_filled_bytes": sum(c.key.nbytes + c.value.nbytes for c in caches),
            "cache_formula_bytes": kv_cache_bytes(
                len(model.blocks), H_kv, head_dim, length, 1, dtype_bytes=8
            ),
            "cache_held_bytes": sum(c.nbytes for c in caches),
        }
    return results
