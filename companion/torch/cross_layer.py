r"""Sharing across layers: ALBERT's factorised embedding, cross-layer attention (one KV
cache for adjacent layers) and the Universal Transformer's one block with step
embeddings. Built from :class:`companion.torch.models.TransformerBlock`.

* :class:`FactorizedEmbedding` (ALBERT, Lan et al. 2020): a ``V x E`` table and an
  ``E x H`` projection instead of one ``V x H`` table;
  :func:`companion.params.factorized_embedding_parameter_count` counts it.
* :class:`CrossLayerTransformerLM` (cross-layer attention, Brandon et al. 2024): the
  language model of :class:`companion.torch.models.TinyTransformerLM` in which layer
  ``s i + j`` (``0 < j < s``, ``s = kv_sharing``) has no key/value projections and
  attends to the keys and values computed by layer ``s i``; the KV cache has
  ``num_layers / s`` entries instead of ``num_layers``. ``kv_sharing=1`` is the
  ordinary model.
* :class:`UniversalTransformer` (Dehghani et al. 2019): one block applied
  ``num_steps`` times, a learned step embedding added before each step, so depth
  costs no parameters beyond ``num_steps * E``.

Explained in the book chapter *Parameter sharing in code* (sharing across layers).
"""

from __future__ import annotations

import torch
from torch import nn

from companion.torch.attention import scaled_dot_product_attention_reference
from companion.torch.models import TransformerBlock, make_norm
from companion.torch.multihead import KVCache
from companion.torch.sharing import TiedLMHead
from companion.torch.vit import EncoderBlock

__all__ = [
    "FactorizedEmbedding",
    "CrossLayerTransformerLM",
    "UniversalTransformer",
]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# --- ALBERT's factorised embedding ----------------------------------------------------


class FactorizedEmbedding(nn.Module):
    r"""ALBERT's token embedding: ``ids (B, T) -> (B, T, H)`` through a width ``E``.

    .. math:: x = W_E[\text{ids}]\, W_P^\top + b, \qquad
              W_E \in \mathbb{R}^{V \times E},\; W_P \in \mathbb{R}^{H \times E}

    ``V E + E H (+ H)`` parameters instead of the ``V H`` of one table: for
    ALBERT-base (``V = 30000``, ``E = 128``, ``H = 768``) 3,939,072 instead of
    23,040,000. ``embedding`` and ``projection`` are Hugging Face ``AlbertModel``'s
    ``embeddings.word_embeddings`` and ``encoder.embedding_hidden_mapping_in``.
    """

    def __init__(
        self, vocab_size: int, embedding_size: int, hidden_size: int, *, bias=True
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
        ):
            _check_positive_int(name, value)
        # [book: factorised embedding]
        self.embedding = nn.Embedding(vocab_size, embedding_size)  # W_E (V, E)
        self.projection = nn.Linear(embedding_size, hidden_size, bias=bias)  # (H, E)
        # [/book: factorised embedding]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (B, T)`` -> ``(B, T, H)``."""
        return self.projection(self.embedding(ids))  # (B, T, E) -> (B, T, H)


# --- cross-layer attention ----------------------------------------------------------


class CrossLayerTransformerLM(nn.Module):
    r"""A decoder-only LM whose adjacent layers share one key/value cache (CLA).

    Layers are grouped by ``kv_sharing = s`` (which must divide ``num_layers``): the
    first layer of a group computes keys and values from its own input, as usual; the
    other ``s - 1`` layers compute only queries and attend to those keys and values.
    The shared layers have no ``k_proj``/``v_proj``, and the cache
    (:meth:`new_caches`) holds ``num_layers / s`` entries, so its bytes
    (:meth:`cache_bytes`) are divided by ``s``. ``kv_sharing=1`` is
    :class:`companion.torch.models.TinyTransformerLM` with learned positions and a
    pre-norm stack: same parameter names, same outputs.

    ``ids (B, T)`` -> ``logits (B, T, V)``; with ``caches`` the ids continue the cached
    sequence, one token at a time or more. ``num_kv_heads`` (grouped-query), ``norm``,
    ``norm_eps``, ``mlp`` and ``tied`` as in ``TinyTransformerLM``.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        *,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        kv_sharing: int = 2,
        num_kv_heads: int | None = None,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        mlp: str = "gelu",
        tied: bool = True,
    ):
        super().__init__()
        num_layers = _check_positive_int("num_layers", num_layers)
        kv_sharing = _check_positive_int("kv_sharing", kv_sharing)
        if num_layers % kv_sharing:
            raise ValueError(
                f"kv_sharing={kv_sharing} must divide num_layers={num_layers}"
            )
        self.vocab_size, self.max_length = vocab_size, max_length
        self.kv_sharing, self.num_heads = kv_sharing, num_heads
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # W_E (V, E)
        self.position_embedding = nn.Embedding(max_length, embed_dim)  # P (L, E)
        block = dict(num_kv_heads=num_kv_heads, norm=norm, norm_eps=norm_eps, mlp=mlp)
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, **block) for _ in range(num_layers)
        )
        # [book: cla drops the shared projections]
        for i, layer in enumerate(self.blocks):
            if i % kv_sharing:  # reads the keys and values of layer i - i % s
                layer.attention.k_proj = None
                layer.attention.v_proj = None
        # [/book: cla drops the shared projections]
        self.norm = make_norm(norm, embed_dim, eps=norm_eps)
        if tied:
            self.head = TiedLMHead(self.embedding)
        else:
            self.head = nn.Linear(embed_dim, vocab_size, bias=False)
        for weight in (
            self.embedding.weight,
            self.position_embedding.weight,
            self.head.weight,
        ):
            nn.init.normal_(weight, std=0.02)

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`KVCache` per group of ``kv_sharing`` layers."""
        return [KVCache() for _ in range(len(self.blocks) // self.kv_sharing)]

    @staticmethod
    def cache_bytes(caches: list[KVCache]) -> int:
        """Bytes of the keys and values held (the filled positions, not the capacity):
        ``2 * layers_with_a_cache * B * H_kv * S * D * itemsize``."""
        return sum(
            (c.key.numel() + c.value.numel()) * c.key.element_size()
            for c in caches
            if c.key is not None
        )

    def _attend(self, layer: TransformerBlock, h, shared, cache):
        """Attention of one block on its normed input ``h (B, T, E)``; ``shared`` is
        ``None`` (this layer computes keys and values) or the group's ``(k, v)``."""
        attention = layer.attention
        B, T, _ = h.shape
        D = attention.head_dim

        def heads(linear, count):  # (B, T, count * D) -> (B, count, T, D)
            return linear(h).reshape(B, T, count, D).transpose(1, 2)

        # [book: cla attention]
        q = heads(attention.q_proj, attention.num_heads)  # (B, H, T, D)
        if shared is None:  # the first layer of a group: its own keys and values
            k = heads(attention.k_proj, attention.num_kv_heads)  # (B, H_kv, T, D)
            v = heads(attention.v_proj, attention.num_kv_heads)  # (B, H_kv, T, D)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H_kv, S, D) each
            shared = (k, v)
        k, v = shared  # the others read the group's keys and values
        out = scaled_dot_product_attention_reference(q, k, v, causal=True)
        # [/book: cla attention]
        merged = out.transpose(1, 2).reshape(B, T, attention.num_heads * D)
        return attention.out_proj(merged), shared  # (B, T, E)

    def forward(
        self, ids: torch.Tensor, *, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """``ids (B, T)`` -> ``logits (B, T, V)``."""
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.dtype.is_floating_point
        ):
            raise ValueError(
                "ids must be an integer tensor of shape (B, T), got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        groups = len(self.blocks) // self.kv_sharing
        if caches is not None and len(caches) != groups:
            raise ValueError(
                f"caches must hold one KVCache per group of kv_sharing layers "
                f"({groups}), got {len(caches)}"
            )
        start = 0 if caches is None else caches[0].seen
        T = ids.shape[1]
        if start + T > self.max_length:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed "
                f"max_length={self.max_length}"
            )
        positions = torch.arange(start, start + T, device=ids.device)  # (T,)
        x = self.embedding(ids) + self.position_embedding(positions)  # (B, T, E)
        shared = None
        for i, layer in enumerate(self.blocks):
            group, first = divmod(i, self.kv_sharing)
            if first == 0:
                shared = None  # a new group computes its keys and values
            cache = None if caches is None else caches[group]
            attended, shared = self._attend(layer, layer.norm1(x), shared, cache)
            x = x + attended  # (B, T, E)
            x = x + layer.mlp(layer.norm2(x))  # (B, T, E)
        return self.head(self.norm(x))  # (B, T, V)


# --- the Universal Transformer's shared block ---------------------------------------


class UniversalTransformer(nn.Module):
    r"""One block applied ``num_steps`` times, with a step embedding before each step.

    .. math:: h_{t+1} = \text{block}(h_t + S_t), \qquad t = 0, \dots, \text{steps} - 1

    ``x (B, T, E)`` -> ``(B, T, E)``. The block (``causal=True``:
    :class:`companion.torch.models.TransformerBlock`; ``causal=False``:
    :class:`companion.torch.vit.EncoderBlock`) holds every weight of every step; the
    step table ``S (num_steps, E)`` (Dehghani et al.'s timestep embedding, here
    learned, from zero) lets a step know its depth. Parameters: one block plus
    ``num_steps * E``, against ``num_steps`` blocks unshared. Without adaptive
    computation time: every position takes every step. ``block_kwargs`` go to the
    block (``norm``, ``mlp``, ``num_kv_heads``, ...).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_steps: int,
        *,
        causal: bool = True,
        **block_kwargs,
    ):
        super().__init__()
        self.num_steps = _check_positive_int("num_steps", num_steps)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        kind = TransformerBlock if causal else EncoderBlock
        # [book: universal transformer parts]
        self.block = kind(embed_dim, num_heads, **block_kwargs)  # one set of weights
        self.step_embedding = nn.Parameter(torch.zeros(num_steps, embed_dim))  # S
        # [/book: universal transformer parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, E)`` -> ``(B, T, E)`` after ``num_steps`` applications."""
        # [book: universal transformer forward]
        for step in range(self.num_steps):
            x, _ = self.block(x + self.step_embedding[step])  # (B, T, E)
        return x
        # [/book: universal transformer forward]
