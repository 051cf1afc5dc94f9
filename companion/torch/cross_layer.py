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
* :class:`CrossLayerGPT`: the three as keywords of the book's
  :class:`companion.torch.gpt.GPT` (``embedding_size``, ``kv_sharing``,
  ``step_embeddings``), so that they train at the GPT chapter's budget
  (``python -m companion.experiments gpt``).

Explained in the book chapter *A small GPT on real text* (sharing across layers).
"""

from __future__ import annotations

import torch
from torch import nn

from companion.torch.attention import (
    attention_tiled,
    scaled_dot_product_attention_reference,
)
from companion.torch.gpt import GPT
from companion.torch.models import TransformerBlock, make_norm
from companion.torch.multihead import KVCache
from companion.torch.positions import alibi_bias, rotary_embedding
from companion.torch.sharing import TiedLMHead
from companion.torch.vit import EncoderBlock

__all__ = [
    "FactorizedEmbedding",
    "CrossLayerTransformerLM",
    "UniversalTransformer",
    "CrossLayerGPT",
    "FactorizedTiedHead",
]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_ids_and_caches(ids, caches, groups: int) -> None:
    """``ids`` an integer ``(B, T)`` tensor; ``caches`` ``None`` or one per group."""
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.dtype.is_floating_point
    ):
        raise ValueError(
            "ids must be an integer tensor of shape (B, T), got "
            f"{getattr(ids, 'shape', type(ids).__name__)}"
        )
    if caches is not None and len(caches) != groups:
        raise ValueError(
            "caches must hold one KVCache per group of kv_sharing layers "
            f"({groups}), got {len(caches)}"
        )


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
        groups = len(self.blocks) // self.kv_sharing
        _check_ids_and_caches(ids, caches, groups)
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


# --- the three in the book's GPT ----------------------------------------------------


class FactorizedTiedHead(nn.Module):
    r"""The output layer tied to a bias-free :class:`FactorizedEmbedding`:
    ``logits = h W_P W_E^T``, the transpose of the lookup's ``V x H`` map
    ``W_E W_P^T``, with no parameter of its own."""

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        if embedding.projection.bias is not None:
            raise ValueError("a tied factorised head needs a projection without bias")
        self.embedding = embedding  # the same module: its parameters counted once

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., H)`` -> ``logits (..., V)``."""
        narrow = hidden @ self.embedding.projection.weight  # (..., E): h W_P
        return narrow @ self.embedding.embedding.weight.T  # (..., V): h W_P W_E^T


class CrossLayerGPT(GPT):
    r""":class:`companion.torch.gpt.GPT` with the three kinds of sharing across layers
    as keywords (every other keyword as in ``GPT``; the defaults give ``GPT``'s
    function):

    * ``embedding_size=E`` (< ``embed_dim``): ALBERT's :class:`FactorizedEmbedding`,
      ``V x E + E x H`` parameters instead of ``V x H``, bias-free; with ``tied`` the
      output layer is :class:`FactorizedTiedHead` (the transpose of the lookup);
    * ``kv_sharing=s``: cross-layer attention, as :class:`CrossLayerTransformerLM`:
      layer ``s i + j`` (``0 < j < s``) has no key/value projections and attends to
      the keys and values of layer ``s i`` (already rotated, with RoPE), and
      :meth:`new_caches` holds ``num_layers / s`` caches;
    * ``step_embeddings=True``: the Universal Transformer's learned step table
      ``S (num_layers, E)``, from zero, added before each layer (with
      ``shared_blocks=True``, one block applied ``num_layers`` times).

    ``config`` holds the three beside ``GPT``'s keywords, so checkpoints round-trip.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        *,
        embedding_size: int | None = None,
        kv_sharing: int = 1,
        step_embeddings: bool = False,
        **gpt_kwargs,
    ):
        super().__init__(vocab_size, context, **gpt_kwargs)
        config = self.config
        kv_sharing = _check_positive_int("kv_sharing", kv_sharing)
        if config["num_layers"] % kv_sharing:
            raise ValueError(
                f"kv_sharing={kv_sharing} must divide num_layers={config['num_layers']}"
            )
        if kv_sharing > 1 and config["shared_blocks"]:
            raise ValueError(
                f"kv_sharing={kv_sharing} needs distinct blocks (shared_blocks=False): "
                "a shared block has one set of key/value projections for every layer"
            )
        if not isinstance(step_embeddings, bool):
            raise TypeError(
                f"step_embeddings must be True or False, got {step_embeddings!r}"
            )
        H = config["embed_dim"]
        if embedding_size is not None:
            _check_positive_int("embedding_size", embedding_size)
            if embedding_size >= H:
                raise ValueError(
                    f"embedding_size must be smaller than embed_dim={H}, got "
                    f"{embedding_size}"
                )
            self.embedding = FactorizedEmbedding(
                vocab_size, embedding_size, H, bias=False
            )
            nn.init.normal_(self.embedding.embedding.weight, std=0.02)
            if config["tied"]:
                self.head = FactorizedTiedHead(self.embedding)
        config.update(
            embedding_size=embedding_size,
            kv_sharing=kv_sharing,
            step_embeddings=step_embeddings,
        )
        self.kv_sharing = kv_sharing
        for i, block in enumerate(self.blocks):
            if i % kv_sharing:  # reads the keys and values of layer i - i % s
                block.attention.k_proj = None
                block.attention.v_proj = None
        self.step_embedding = (
            nn.Parameter(torch.zeros(config["num_layers"], H))  # S (L, E)
            if step_embeddings
            else None
        )

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`KVCache` per group of ``kv_sharing`` layers."""
        return [KVCache() for _ in range(self.config["num_layers"] // self.kv_sharing)]

    #: Bytes held by a list of caches (as :meth:`CrossLayerTransformerLM.cache_bytes`).
    cache_bytes = staticmethod(CrossLayerTransformerLM.cache_bytes)

    def _kernel(self, q, k, v, mask):
        """Causal attention (bottom-right) of ``q (B, H, T, D)`` on ``k, v (B, H_kv,
        S, D)`` with the model's ``implementation``."""
        T, S = q.shape[2], k.shape[2]
        if self.implementation == "sdpa" and mask is None and T == S:
            sdpa = torch.nn.functional.scaled_dot_product_attention
            gqa = q.shape[1] != k.shape[1]
            return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        if self.implementation == "tiled":
            return attention_tiled(q, k, v, mask=mask, causal=True)
        return scaled_dot_product_attention_reference(q, k, v, mask=mask, causal=True)

    def _attend(self, attention, h, shared, cache, start, mask):
        """One layer's attention on its normed input ``h (B, T, E)``; ``shared`` is
        ``None`` (this layer computes keys and values) or its group's ``(k, v)``."""
        B, T, _ = h.shape
        H, H_kv, D = attention.num_heads, attention.num_kv_heads, attention.head_dim

        def heads(linear, count):  # (B, T, count * D) -> (B, count, T, D)
            return linear(h).reshape(B, T, count, D).transpose(1, 2)

        rope = attention.rope
        positions = torch.arange(start, start + T, device=h.device)  # (T,)

        def rotate(x):  # RoPE at the absolute positions start..start + T - 1
            if rope is None:
                return x
            return rotary_embedding(
                x,
                positions,
                base=rope.base,
                interleaved=rope.interleaved,
                rotary_dim=rope.rotary_dim,
            )

        # [book: cla gpt attention]
        q = rotate(heads(attention.q_proj, H))  # (B, H, T, D)
        if shared is None:  # the first layer of a group: its own keys and values
            k = rotate(heads(attention.k_proj, H_kv))  # (B, H_kv, T, D)
            v = heads(attention.v_proj, H_kv)  # (B, H_kv, T, D)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H_kv, S, D) each
            shared = (k, v)
        k, v = shared  # the other layers of the group read them
        out = self._kernel(q, k, v, mask)  # (B, H, T, D)
        # [/book: cla gpt attention]
        merged = out.transpose(1, 2).reshape(B, T, H * D)
        return attention.out_proj(merged), shared  # (B, T, E)

    def forward(self, ids: torch.Tensor, *, caches: list[KVCache] | None = None):
        """``ids (B, T)`` -> ``logits (B, T, V)``; with ``caches`` (one per group of
        ``kv_sharing`` layers), ``ids`` continue the cached sequence."""
        config = self.config
        groups = config["num_layers"] // self.kv_sharing
        _check_ids_and_caches(ids, caches, groups)
        start = 0 if caches is None else caches[0].seen
        T = ids.shape[1]
        if start + T > config["context"]:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed context={config['context']}"
            )
        x = self.embedding(ids)  # (B, T, E)
        if self.position_embedding is not None:
            positions = torch.arange(start, start + T, device=ids.device)  # (T,)
            x = x + self.position_embedding(positions)  # (B, T, E)
        mask = None
        if config["positions"] == "alibi":
            mask = alibi_bias(config["num_heads"], T, start + T, dtype=x.dtype)
            mask = mask.to(x.device)  # (H, T, S)
        shared = None
        for i, block in enumerate(self.layers):
            group, j = divmod(i, self.kv_sharing)
            if j == 0:
                shared = None  # a new group computes its keys and values
            if self.step_embedding is not None:
                x = x + self.step_embedding[i]  # (B, T, E): the step's embedding
            cache = None if caches is None else caches[group]
            h = block.norm1(x)  # (B, T, E)
            attended, shared = self._attend(
                block.attention, h, shared, cache, start, mask
            )
            x = x + attended  # (B, T, E)
            x = x + block.mlp(block.norm2(x))  # (B, T, E)
        return self.head(self.norm(x))  # (B, T, V)
