"""Long context: cache memory per token and time per generated token (torch, float32).

One attention layer decodes ``steps`` tokens after a context of ``n`` positions
(``n`` = 4096 and 16384 in the full run), with each kind of cache:

- ``full``: multi-head attention, :class:`companion.torch.KVCache` (``H_kv = H``);
- ``grouped``: grouped-query heads, ``H_kv = H / 4``;
- ``latent``: multi-head latent attention (DeepSeek-V2), absorbed form, the cache
  holding ``d_c + d_h^R`` numbers per token (:func:`companion.torch.latent_attention`);
- ``windowed``: multi-head attention over a rolling ``KVCache(max_length=W)``;
- ``paged``: multi-head attention through the block table of a
  :class:`companion.torch.PagedKVCache` (block size 16, vLLM's default);
- ``paged, forks``: ``forks`` continuations of one ``n``-position prompt decoded
  together, the prompt's blocks shared (memory and time per sequence).

The caches are filled with random keys (the prefill is not what is measured), so that
the context ends at ``n`` after the last step. Each kind decodes ``steps`` tokens per
round, the kinds interleaved round by round; the time per token is the median step.
Memory is the bytes of the positions the cache keeps (``filled``) and of the storage
it holds (``held``, with a growing cache's spare capacity), per token of context.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

FULL = dict(
    contexts=(4096, 16384),
    embed_dim=1024,
    num_heads=16,
    kv_heads=4,
    latent_dim=256,
    rope_dim=32,
    window=1024,
    block_size=16,
    forks=4,
    steps=16,
    rounds=3,
)
QUICK = dict(FULL, contexts=(4096,), steps=8, rounds=2)
TINY = dict(
    FULL,
    contexts=(128,),
    embed_dim=64,
    num_heads=4,
    kv_heads=2,
    latent_dim=16,
    rope_dim=8,
    window=32,
    block_size=8,
    forks=2,
    steps=2,
    rounds=1,
)
KINDS = ("full", "grouped", "latent", "windowed", "paged", "paged, forks")


def _tensor_bytes(t) -> int:
    return t.element_size() * t.numel()


class _Case:
    """One kind of cache at one context: ``step()`` decodes one token per sequence."""

    def __init__(self, kind: str, n: int, prefill: int, size: dict, torch):
        import companion.torch as ct
        from companion.numpy import MultiHeadParams
        from companion.numpy.latent import LatentAttentionParams

        self.kind, self.torch, self.ct = kind, torch, ct
        E, H = size["embed_dim"], size["num_heads"]
        D = E // H
        gen = torch.Generator().manual_seed(n)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32)

        self.sequences = size["forks"] if kind == "paged, forks" else 1
        self.x = randn(self.sequences, 1, E)  # (B, 1, E): the token fed at each step
        if kind == "latent":
            params = LatentAttentionParams.random(
                E, H, D, size["latent_dim"], size["rope_dim"], dtype="float32"
            )
            self.params = LatentAttentionParams(
                **{
                    k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                    for k, v in vars(params).items()
                }
            )
            self.folded = self.params.absorbed()  # folded once
            self.cache = ct.KVCache()
            d_c, d_R = size["latent_dim"], size["rope_dim"]
            # (B, 1, S, d_c) latents and (B, 1, S, d_h^R) rotary keys
            self.cache.append(randn(1, 1, prefill, d_c), randn(1, 1, prefill, d_R))
            return
        H_kv = size["kv_heads"] if kind == "grouped" else H
        params = MultiHeadParams.random(E, H, H_kv, dtype="float32")
        if kind.startswith("paged"):
            self.weights = {
                k: torch.as_tensor(getattr(params, k))
                for k in ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
            }
            S = prefill + size["steps"] * size["rounds"] + 1
            blocks = self.sequences * math.ceil(S / size["block_size"]) + 8
            self.cache = ct.PagedKVCache(blocks, size["block_size"], H, D)
            first = self.cache.new_sequence()
            # (H_kv, S, D): the prompt
            self.cache.append(first, randn(H, prefill, D), randn(H, prefill, D))
            self.seqs = [first] + [
                self.cache.fork(first) for _ in range(self.sequences - 1)
            ]
            return
        self.layer = ct.MultiHeadAttention.from_params(params, dtype=torch.float32)
        window = size["window"] if kind == "windowed" else None
        self.cache = ct.KVCache(max_length=window)
        # (B, H_kv, S, D)
        self.cache.append(randn(1, H_kv, prefill, D), randn(1, H_kv, prefill, D))

    def step(self) -> None:
        torch, ct = self.torch, self.ct
        with torch.no_grad():
            if self.kind == "latent":
                ct.latent_attention(
                    self.x, self.params, cache=self.cache, absorbed=self.folded
                )
            elif self.kind.startswith("paged"):
                self._paged_step()
            else:
                self.layer(self.x, causal=True, cache=self.cache)

    def _paged_step(self) -> None:
        w, ct = self.weights, self.ct
        B, E = self.x.shape[0], self.x.shape[2]
        H = self.cache.num_kv_heads
        D = E // H

        def heads(y):  # (B, 1, H * D) -> (B, H, 1, D)
            return y.reshape(B, 1, H, D).transpose(1, 2)

        q = heads(self.x @ w["w_q"] + w["b_q"])
        k = heads(self.x @ w["w_k"] + w["b_k"])
        v = heads(self.x @ w["w_v"] + w["b_v"])
        for b, seq in enumerate(self.seqs):
            self.cache.append(seq, k[b], v[b])  # (H, 1, D)
        out = ct.paged_attention(q, self.cache, self.seqs, causal=True)
        out.transpose(1, 2).reshape(B, 1, H * D) @ w["w_o"] + w["b_o"]

    def memory(self) -> dict:
        """Bytes kept (filled) and held, per sequence."""
        if self.kind.startswith("paged"):
            filled = held = self.cache.nbytes_in_use
        else:
            filled = _tensor_bytes(self.cache.key) + _tensor_bytes(self.cache.value)
            held = self.cache.nbytes
        return {
            "filled_bytes": filled / self.sequences,
            "held_bytes": held / self.sequences,
        }


def run_all(size: dict, progress, threads: int | None = None) -> dict:
    """Time per generated token and cache bytes per token for every kind and context.

    ``threads``: torch's intra-op threads for the run (default: leave torch's own).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    results = {"size": dict(size), "contexts": {}, "threads": torch.get_num_threads()}
    steps, rounds = size["steps"], size["rounds"]
    for n in size["contexts"]:
        prefill = n - steps * rounds - 1  # the context ends at n
        progress(
            f"long context n = {n}: filling {len(KINDS)} caches, then "
            f"{rounds} x {steps} steps each"
        )
        cases = {kind: _Case(kind, n, prefill, size, torch) for kind in KINDS}
        for case in cases.values():
            case.step()  # warm-up: one position, counted in the prefill
        seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(rounds):
            for kind, case in cases.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    case.step()
                    seconds[kind].append(time.perf_counter() - start)
        rows = {}
        for kind, case in cases.items():
            per_token = statistics.median(seconds[kind]) / case.sequences
            memory = case.memory()
            rows[kind] = {
                "ms_per_token": 1e3 * per_token,
                "filled_bytes_per_token": memory["filled_bytes"] / n,
                "held_bytes_per_token": memory["held_bytes"] / n,
                "filled_mib": memory["filled_bytes"] / 2**20,
            }
        results["contexts"][str(n)] = rows
        del cases
    return results


def table(results: dict) -> str:
    """The memory and time table, one block per context."""
    from companion.bench.report import _table

    s = results["size"]
    D = s["embed_dim"] // s["num_heads"]
    header = (
        f"Long context, one attention layer, torch float32 (E={s['embed_dim']}, "
        f"H={s['num_heads']}, D={D}; grouped H_kv={s['kv_heads']}; latent "
        f"d_c={s['latent_dim']}, d_h^R={s['rope_dim']}; window W={s['window']}; "
        f"paged block {s['block_size']}, {s['forks']} forks share the prompt; "
        f"{results.get('threads', '?')} thread(s)): "
        "cache bytes per token of context and ms per generated token (per sequence)"
    )
    rows = []
    for n, kinds in results["contexts"].items():
        full = kinds["full"]
        for kind, r in kinds.items():
            saved = full["filled_bytes_per_token"] / r["filled_bytes_per_token"]
            rows.append(
                [
                    n,
                    kind,
                    f"{r['filled_bytes_per_token']:.0f}",
                    f"{r['held_bytes_per_token']:.0f}",
                    f"{r['filled_mib']:.1f}",
                    f"{saved:.1f}x",
                    f"{r['ms_per_token']:.2f}",
                ]
            )
    return (
        header
        + "\n"
        + _table(
            [
                "n",
                "cache",
                "B/token kept",
                "B/token held",
                "MiB kept",
                "memory vs full",
                "ms/token",
            ],
            rows,
        )
    )
