r"""Encoder-decoder models for torch: Vaswani et al.'s transformer and Bahdanau's GRU.

Cross-attention is attention whose queries come from one sequence and whose keys and
values come from another: the decoder's states ``(B, L, E)`` ask, the encoder's output
``(B, S, E)`` (the *memory*) answers, and the weights ``(B, H, L, S)`` say which source
position each target position reads, an alignment.

* :class:`Seq2SeqTransformer`: the encoder-decoder transformer (Vaswani et al. 2017),
  post-norm as in the paper or pre-norm, sinusoidal positions, the embedding scaled by
  ``sqrt(E)``, and ``share_embeddings`` = ``"none"`` (three matrices),
  ``"decoder-output"`` (the output layer reuses the target embedding, Press & Wolf 2017)
  or ``"all"`` (one matrix for source embedding, target embedding and output layer, the
  paper's three-way tying over a shared vocabulary).
  :meth:`Seq2SeqTransformer.from_torch` loads a ``torch.nn.Transformer``'s weights.
  :meth:`Seq2SeqTransformer.greedy_decode` and :meth:`Seq2SeqTransformer.beam_search`
  decode with a :class:`~companion.torch.multihead.KVCache` per decoder layer for
  self-attention and the encoder's keys and values computed once.
* :class:`BahdanauSeq2Seq`: a bidirectional GRU encoder and a GRU decoder reading the
  source through additive attention (Bahdanau et al. 2015), scored by
  :func:`companion.torch.scores.additive_scores`.

Masks follow :mod:`companion.conventions` (``True`` = attend). A source mask is boolean
``(B, S)``, ``True`` for real tokens; by default it is ``src != pad_id``.

Explained in the book chapter *Applications: translation with cross-attention*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from companion import _checks
from companion.torch.attention import scaled_dot_product_attention_reference, softmax
from companion.torch.multihead import KVCache, MultiHeadAttention
from companion.torch.positions import sinusoidal_positions
from companion.torch.scores import additive_scores
from companion.torch.sharing import TiedLMHead

__all__ = [
    "SHARE_EMBEDDINGS",
    "cross_attention_kv",
    "Seq2SeqEncoderLayer",
    "Seq2SeqDecoderLayer",
    "Seq2SeqTransformer",
    "BahdanauSeq2Seq",
]

#: The settings of ``share_embeddings``: which of the three vocabulary matrices are one.
SHARE_EMBEDDINGS = ("none", "decoder-output", "all")


def _check_ids(name: str, ids, vocab_size: int | None = None) -> None:
    """Token ids ``(B, length)``, ``B, length >= 1``, in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or 0 in ids.shape:
        raise ValueError(
            f"{name} must have shape (B, length) with B >= 1 and length >= 1, got "
            f"{tuple(ids.shape)}"
        )
    if vocab_size is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} holds token ids outside the vocabulary [0, {vocab_size}): "
                f"min {low}, max {high}"
            )


def _check_batches(src: torch.Tensor, tgt: torch.Tensor) -> None:
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(
            f"src and tgt must have the same batch size, got src {tuple(src.shape)} "
            f"and tgt {tuple(tgt.shape)}"
        )


def _key_mask(keep):
    """``(B, S)`` bool (True = token) -> ``(B, 1, 1, S)``, for all heads and queries."""
    return None if keep is None else keep[:, None, None, :]


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, heads * D)`` -> ``(B, heads, T, D)``."""
    B, T, width = x.shape
    return x.reshape(B, T, heads, width // heads).transpose(1, 2)


def cross_attention_kv(attention: MultiHeadAttention, memory: torch.Tensor):
    """Keys ``(B, H_kv, S, D)`` and values ``(B, H_kv, S, D)`` of ``memory (B, S, E)``.

    Computed once per source sentence and reused at every decoding step.
    """
    key = _split(attention.k_proj(memory), attention.num_kv_heads)  # (B, H_kv, S, D)
    value = _split(attention.v_proj(memory), attention.num_kv_heads)  # (B, H_kv, S, D)
    return key, value


def _attend_precomputed(attention: MultiHeadAttention, x, key, value, mask):
    """``attention(x, memory, mask=mask)`` with the memory's keys and values given."""
    q = _split(attention.q_proj(x), attention.num_heads)  # (B, H, L, D)
    # (B, H, L, D)
    heads = scaled_dot_product_attention_reference(q, key, value, mask=mask)
    B, H, L, D = heads.shape
    return attention.out_proj(heads.transpose(1, 2).reshape(B, L, H * D))  # (B, L, E)


class _FeedForward(nn.Module):
    def __init__(self, d_model, dim_feedforward, dropout, factory):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))  # (B, T, E)


class Seq2SeqEncoderLayer(nn.Module):
    r"""Self-attention and a ReLU MLP, each in a residual branch with a LayerNorm.

    post-norm (the paper): ``x = norm1(x + SA(x)); x = norm2(x + FF(x))``;
    pre-norm (``norm_first``): ``x = x + SA(norm1(x)); x = x + FF(norm2(x))``.
    Names of the parts as in ``torch.nn.TransformerEncoderLayer``.
    """

    def __init__(
        self,
        d_model,
        num_heads,
        dim_feedforward,
        *,
        dropout=0.0,
        norm_first=False,
        layer_norm_eps=1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, **factory)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, src_mask=None) -> torch.Tensor:
        """``x (B, S, E)``, ``src_mask (B, S)`` bool (True = token) -> ``(B, S, E)``."""
        mask = _key_mask(src_mask)
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), mask=mask))
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.self_attn(x, mask=mask)))
        return self.norm2(x + self.dropout2(self.ff(x)))


class Seq2SeqDecoderLayer(nn.Module):
    r"""Causal self-attention, cross-attention to the memory, a ReLU MLP.

    post-norm: ``x = norm1(x + SA(x)); x = norm2(x + CA(x, m)); x = norm3(x + FF(x))``;
    pre-norm: ``x = x + SA(norm1(x)); x = x + CA(norm2(x), m); x = x + FF(norm3(x))``.
    ``CA`` takes its queries from ``x (B, L, E)`` and its keys and values from the
    memory ``m (B, S, E)``: weights ``(B, H, L, S)``.
    """

    def __init__(
        self,
        d_model,
        num_heads,
        dim_feedforward,
        *,
        dropout=0.0,
        norm_first=False,
        layer_norm_eps=1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, **factory)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, **factory)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _cross(self, x, memory, memory_kv, mask, return_weights):
        if memory_kv is not None:
            return _attend_precomputed(self.cross_attn, x, *memory_kv, mask), None
        if return_weights:
            return self.cross_attn(x, memory, mask=mask, return_weights=True)
        return self.cross_attn(x, memory, mask=mask), None

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        src_mask=None,
        tgt_mask=None,
        cache: KVCache | None = None,
        memory_kv=None,
        return_weights: bool = False,
    ):
        """``x (B, L, E)``, ``memory (B, S, E)`` -> ``(B, L, E)`` (and cross weights).

        ``src_mask (B, S)`` and ``tgt_mask (B, L)`` are bool, True = token. ``cache``
        holds this layer's self-attention keys and values (the causal mask is
        bottom-right, so one new token at a time works); ``memory_kv`` the memory's
        keys and values from :func:`cross_attention_kv` (then ``memory`` is unused).
        With ``return_weights`` also the cross-attention weights ``(B, H, L, S)``.
        """
        memory_mask, self_mask = _key_mask(src_mask), _key_mask(tgt_mask)

        def self_attention(h):
            return self.self_attn(h, mask=self_mask, causal=True, cache=cache)

        if self.norm_first:
            x = x + self.dropout1(self_attention(self.norm1(x)))
            crossed, weights = self._cross(
                self.norm2(x), memory, memory_kv, memory_mask, return_weights
            )
            x = x + self.dropout2(crossed)
            x = x + self.dropout3(self.ff(self.norm3(x)))
        else:
            x = self.norm1(x + self.dropout1(self_attention(x)))
            crossed, weights = self._cross(
                x, memory, memory_kv, memory_mask, return_weights
            )
            x = self.norm2(x + self.dropout2(crossed))
            x = self.norm3(x + self.dropout3(self.ff(x)))
        return (x, weights) if return_weights else x


class Seq2SeqTransformer(nn.Module):
    r"""The encoder-decoder transformer of Vaswani et al. (2017), batch-first.

    .. code-block:: text

        memory = Encoder(E_src[src] * sqrt(E) + PE)                    (B, S, E)
        h      = Decoder(E_tgt[tgt] * sqrt(E) + PE, memory)            (B, L, E)
        logits = h W_out^T                                              (B, L, V_tgt)

    ``PE`` are the sinusoidal positions of
    :func:`companion.torch.positions.sinusoidal_positions`. ``share_embeddings``:

    * ``"none"``: ``E_src``, ``E_tgt`` and ``W_out`` are three matrices,
      ``(V_src + 2 V_tgt) E`` parameters;
    * ``"decoder-output"``: ``W_out`` is ``E_tgt``, ``(V_src + V_tgt) E``;
    * ``"all"``: one matrix, ``V E``; needs ``V_src == V_tgt`` (a shared vocabulary).

    The output layer has no bias. ``norm_first=False`` is the paper's post-norm;
    ``final_norm`` (default: ``norm_first``) adds a LayerNorm after each stack, as
    pre-norm models need and as ``torch.nn.Transformer`` always does. Embeddings are
    initialised ``N(0, 1/E)``, so that ``sqrt(E)`` scales them to unit size.
    ``pad_id`` (default 0, ``None`` for no padding) is the token that source and target
    masks leave out.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int | None = None,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        *,
        dropout: float = 0.0,
        norm_first: bool = False,
        final_norm: bool | None = None,
        share_embeddings: str = "none",
        pad_id: int | None = 0,
        layer_norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tgt_vocab_size = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        for name, value in (
            ("src_vocab_size", src_vocab_size),
            ("tgt_vocab_size", tgt_vocab_size),
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("dim_feedforward", dim_feedforward),
        ):
            _checks.check_int(name, value)
        if share_embeddings not in SHARE_EMBEDDINGS:
            raise ValueError(
                f"share_embeddings must be one of {SHARE_EMBEDDINGS}, "
                f"got {share_embeddings!r}"
            )
        if share_embeddings == "all" and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                "share_embeddings='all' needs one vocabulary: src_vocab_size="
                f"{src_vocab_size} != tgt_vocab_size={tgt_vocab_size}"
            )
        if pad_id is not None:  # the padding token of both vocabularies
            pad_id = _checks.check_token_id(
                "pad_id", pad_id, min(src_vocab_size, tgt_vocab_size)
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads = d_model, num_heads
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.share_embeddings, self.pad_id = share_embeddings, pad_id
        self.norm_first = norm_first
        final_norm = norm_first if final_norm is None else final_norm
        self.src_embedding = nn.Embedding(src_vocab_size, d_model, **factory)
        if share_embeddings == "all":
            self.tgt_embedding = self.src_embedding  # one module, one matrix
        else:
            self.tgt_embedding = nn.Embedding(tgt_vocab_size, d_model, **factory)
        for embedding in (self.src_embedding, self.tgt_embedding):
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
        if share_embeddings == "none":
            self.output = nn.Linear(d_model, tgt_vocab_size, bias=False, **factory)
        else:
            self.output = TiedLMHead(self.tgt_embedding)  # the same nn.Parameter
        layer = {
            "dropout": dropout,
            "norm_first": norm_first,
            "layer_norm_eps": layer_norm_eps,
            **factory,
        }
        self.encoder_layers = nn.ModuleList(
            Seq2SeqEncoderLayer(d_model, num_heads, dim_feedforward, **layer)
            for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            Seq2SeqDecoderLayer(d_model, num_heads, dim_feedforward, **layer)
            for _ in range(num_decoder_layers)
        )
        norm = {"eps": layer_norm_eps, **factory}
        self.encoder_norm = nn.LayerNorm(d_model, **norm) if final_norm else None
        self.decoder_norm = nn.LayerNorm(d_model, **norm) if final_norm else None
        self.dropout = nn.Dropout(dropout)

    # ----- pieces --------------------------------------------------------------------

    def embed(self, embedding: nn.Embedding, ids: torch.Tensor, offset: int = 0):
        """``ids (B, T)`` -> ``E[ids] sqrt(E) + PE[offset : offset + T]`` (B, T, E)."""
        T = ids.shape[1]
        x = embedding(ids) * math.sqrt(self.d_model)  # (B, T, E)
        # computed in float64, rounded once to the embedding's dtype: (T, E)
        table = sinusoidal_positions(offset + T, self.d_model, dtype=torch.float64)
        return self.dropout(x + table[offset:].to(dtype=x.dtype, device=x.device))

    def source_mask(self, src: torch.Tensor, src_mask=None):
        """``(B, S)`` bool, True = token: ``src_mask``, else ``src != pad_id``."""
        if src_mask is not None:
            if src_mask.dtype != torch.bool or src_mask.shape != src.shape:
                raise ValueError(
                    f"src_mask must be boolean of shape {tuple(src.shape)} (True = "
                    f"token), got {src_mask.dtype} {tuple(src_mask.shape)}"
                )
            return src_mask
        return None if self.pad_id is None else src != self.pad_id

    def encode(self, src: torch.Tensor, src_mask=None) -> torch.Tensor:
        """``src (B, S)`` token ids -> the memory ``(B, S, E)``."""
        _check_ids("src", src, self.src_vocab_size)
        src_mask = self.source_mask(src, src_mask)
        x = self.embed(self.src_embedding, src)  # (B, S, E)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        src_mask=None,
        tgt_mask=None,
        caches=None,
        memory_kv=None,
        return_weights: bool = False,
    ):
        """``tgt (B, L)``, ``memory (B, S, E)`` -> logits ``(B, L, V_tgt)``.

        ``src_mask (B, S)`` bool as returned by :meth:`source_mask`; ``tgt_mask (B, L)``
        bool, True = token (default: none). ``caches``: one
        :class:`~companion.torch.multihead.KVCache` per decoder layer (the positions
        continue from ``caches[0].seen``); ``memory_kv``: per layer the memory's ``(key,
        value)`` from :meth:`memory_keys_values`. With ``return_weights`` also a list of
        the cross-attention weights ``(B, H, L, S)`` per layer.
        """
        _check_ids("tgt", tgt, self.tgt_vocab_size)
        if memory is not None and memory.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"tgt and memory must have the same batch size, got tgt "
                f"{tuple(tgt.shape)} and memory {tuple(memory.shape)}"
            )
        offset = 0 if caches is None else caches[0].seen
        x = self.embed(self.tgt_embedding, tgt, offset)  # (B, L, E)
        all_weights = []
        for i, layer in enumerate(self.decoder_layers):
            out = layer(
                x,
                memory,
                src_mask=src_mask,
                tgt_mask=tgt_mask,
                cache=None if caches is None else caches[i],
                memory_kv=None if memory_kv is None else memory_kv[i],
                return_weights=return_weights,
            )
            if return_weights:
                x, weights = out
                all_weights.append(weights)
            else:
                x = out
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = self.output(x)  # (B, L, V_tgt)
        return (logits, all_weights) if return_weights else logits

    def forward(self, src, tgt, *, src_mask=None, tgt_mask=None):
        """Teacher forcing: ``src (B, S)``, ``tgt (B, L)`` -> logits ``(B, L, V_tgt)``.

        Position ``i`` of the logits predicts ``tgt[:, i + 1]``.
        """
        _check_ids("src", src, self.src_vocab_size)
        _check_ids("tgt", tgt, self.tgt_vocab_size)
        _check_batches(src, tgt)
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask)
        if tgt_mask is None and self.pad_id is not None:
            tgt_mask = tgt != self.pad_id
        return self.decode(tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask)

    def cross_attention_weights(self, src, tgt, *, src_mask=None):
        """The cross-attention weights ``(B, H, L, S)`` of every decoder layer (a list).

        Computed as :meth:`forward` computes them (the same masks).
        """
        _check_ids("src", src, self.src_vocab_size)
        _check_ids("tgt", tgt, self.tgt_vocab_size)
        _check_batches(src, tgt)
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask)
        tgt_mask = None if self.pad_id is None else tgt != self.pad_id
        _, weights = self.decode(
            tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask, return_weights=True
        )
        return weights

    def memory_keys_values(self, memory: torch.Tensor) -> list:
        """Per decoder layer, the cross-attention ``(key, value)`` ``(B, H, S, D)``."""
        return [
            cross_attention_kv(layer.cross_attn, memory)
            for layer in self.decoder_layers
        ]

    @classmethod
    def from_torch(
        cls,
        transformer: nn.Transformer,
        src_embedding: nn.Embedding,
        tgt_embedding: nn.Embedding,
        output: nn.Module,
        *,
        pad_id: int | None = 0,
    ) -> "Seq2SeqTransformer":
        """A copy of ``torch.nn.Transformer`` plus its embeddings and output layer.

        The model computed is ``output(transformer(E_src[src] sqrt(E) + PE,
        E_tgt[tgt] sqrt(E) + PE, ...))``. ``nn.Transformer`` normalises the output of
        both stacks (``final_norm=True`` here), its layers are post-norm unless
        ``norm_first``, and its boolean masks mean True = *ignore*:
        ``src_key_padding_mask = ~src_mask``. The tying of the three matrices is read
        from the objects: an ``output`` whose weight *is* ``tgt_embedding.weight``
        gives ``"decoder-output"``, and ``"all"`` when ``src_embedding.weight`` is the
        same tensor too. ``output`` has no bias.
        """
        if not isinstance(transformer, nn.Transformer):
            raise TypeError(
                "transformer must be a torch.nn.Transformer, got "
                f"{type(transformer).__name__}"
            )
        return _from_torch(
            cls, transformer, src_embedding, tgt_embedding, output, pad_id
        )

    # ----- decoding ------------------------------------------------------------------

    @torch.no_grad()
    def greedy_decode(
        self,
        src,
        *,
        bos_id: int,
        eos_id: int,
        max_length: int,
        src_mask=None,
        use_cache: bool = True,
    ):
        """The most likely next token at each step: ``(tokens (B, T), scores (B,))``.

        ``tokens`` start with ``bos_id`` and hold at most ``max_length`` generated
        tokens; after ``eos_id`` a sequence is padded with ``pad_id`` (or ``eos_id``).
        ``scores`` are the summed log-probabilities of the generated tokens up to and
        including ``eos_id``. ``use_cache=False`` reruns the decoder on the whole
        prefix at every step (the same result, slower).
        """
        return self.beam_search(
            src,
            bos_id=bos_id,
            eos_id=eos_id,
            max_length=max_length,
            beam_size=1,
            src_mask=src_mask,
            use_cache=use_cache,
        )

    @torch.no_grad()
    def beam_search(
        self,
        src,
        *,
        bos_id: int,
        eos_id: int,
        max_length: int,
        beam_size: int = 4,
        src_mask=None,
        use_cache: bool = True,
    ):
        """The best of ``beam_size`` hypotheses, ``(tokens (B, T), scores (B,))``.

        Keeps the ``K = beam_size`` prefixes of highest summed log-probability; a
        finished prefix (it emitted ``eos_id``) keeps its score and is padded. The
        memory is encoded once; with ``use_cache`` its cross-attention keys and values
        are computed once per layer and each decoder layer appends one token per step to
        its :class:`~companion.torch.multihead.KVCache` (reordered when beams are
        selected). Scores are not length-normalised.
        """
        _checks.check_int("beam_size", beam_size)
        _checks.check_int("max_length", max_length)
        if beam_size < 1 or max_length < 1:
            raise ValueError(
                f"beam_size and max_length must be >= 1, got {beam_size}, {max_length}"
            )
        bos_id = _checks.check_token_id("bos_id", bos_id, self.tgt_vocab_size)
        eos_id = _checks.check_token_id("eos_id", eos_id, self.tgt_vocab_size)
        _check_ids("src", src, self.src_vocab_size)
        K = beam_size
        fill = eos_id if self.pad_id is None else self.pad_id
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask)  # (B, S, E)
        B = memory.shape[0]
        if use_cache:
            # the encoder's keys and values, once per layer, then one row per beam
            memory_kv = [
                (k.repeat_interleave(K, 0), v.repeat_interleave(K, 0))
                for k, v in self.memory_keys_values(memory)
            ]
            caches = [KVCache() for _ in self.decoder_layers]
        memory = memory.repeat_interleave(K, 0)  # (B K, S, E)
        beam_mask = None if src_mask is None else src_mask.repeat_interleave(K, 0)
        tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=memory.device)
        scores = torch.full(
            (B, K), float("-inf"), dtype=memory.dtype, device=memory.device
        )
        scores[:, 0] = 0.0  # one live beam at the start
        finished = torch.zeros(B * K, dtype=torch.bool, device=memory.device)
        for _ in range(max_length):
            if use_cache:
                logits = self.decode(
                    tokens[:, -1:],
                    None,
                    src_mask=beam_mask,
                    caches=caches,
                    memory_kv=memory_kv,
                )
            else:
                logits = self.decode(tokens, memory, src_mask=beam_mask)
            log_probs = torch.log_softmax(logits[:, -1], dim=-1)  # (B K, V)
            V = log_probs.shape[-1]
            # a finished beam continues with the fill token at no cost
            done = torch.full_like(log_probs, float("-inf"))
            done[:, fill] = 0.0
            log_probs = torch.where(finished[:, None], done, log_probs)
            candidates = scores[:, :, None] + log_probs.view(B, K, V)  # (B, K, V)
            scores, flat = candidates.view(B, K * V).topk(K, dim=-1)  # (B, K)
            beam, token = flat // V, flat % V
            rows = (beam + torch.arange(B, device=beam.device)[:, None] * K).view(-1)
            tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
            finished = finished[rows] | (token.view(-1) == eos_id)
            if use_cache:
                caches = [_reorder(cache, rows) for cache in caches]
            if finished.all():
                break
        best = tokens.view(B, K, -1)[:, 0]  # topk sorts: beam 0 is the best
        return best, scores[:, 0]


def _reorder(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A cache holding ``cache``'s batch rows ``rows``: beams follow their parents."""
    if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
        return cache
    moved = KVCache()
    moved.append(cache.key[rows], cache.value[rows])
    return moved


# ------------------------------------------------------------------------------------
# loading torch.nn.Transformer
# --------------------------------------------------------------------------------------


def _copy_linear(ours: nn.Linear, theirs: nn.Linear) -> None:
    ours.weight.copy_(theirs.weight)
    ours.bias.copy_(theirs.bias)


def _copy_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm) -> None:
    ours.weight.copy_(theirs.weight)
    ours.bias.copy_(theirs.bias)


def _load_layer(ours, theirs, attention_names) -> None:
    if getattr(theirs, "activation_relu_or_gelu", 1) != 1:
        raise ValueError("only ReLU layers can be loaded (activation='relu')")
    for name_ours, name_theirs in attention_names:
        setattr(
            ours, name_ours, MultiHeadAttention.from_torch(getattr(theirs, name_theirs))
        )
    _copy_linear(ours.ff.linear1, theirs.linear1)
    _copy_linear(ours.ff.linear2, theirs.linear2)
    for i in (1, 2, 3):
        if hasattr(ours, f"norm{i}"):
            _copy_norm(getattr(ours, f"norm{i}"), getattr(theirs, f"norm{i}"))


@torch.no_grad()
def _from_torch(cls, transformer, src_embedding, tgt_embedding, output, pad_id):
    first = transformer.encoder.layers[0]
    E = first.linear1.in_features
    model = cls(
        src_embedding.num_embeddings,
        tgt_embedding.num_embeddings,
        E,
        first.self_attn.num_heads,
        len(transformer.encoder.layers),
        len(transformer.decoder.layers),
        first.linear1.out_features,
        norm_first=first.norm_first,
        final_norm=True,
        share_embeddings=_sharing(src_embedding, tgt_embedding, output),
        pad_id=pad_id,
        layer_norm_eps=first.norm1.eps,
        device=first.linear1.weight.device,
        dtype=first.linear1.weight.dtype,
    )
    for ours, theirs in zip(model.encoder_layers, transformer.encoder.layers):
        _load_layer(ours, theirs, [("self_attn", "self_attn")])
    for ours, theirs in zip(model.decoder_layers, transformer.decoder.layers):
        names = [("self_attn", "self_attn"), ("cross_attn", "multihead_attn")]
        _load_layer(ours, theirs, names)
    _copy_norm(model.encoder_norm, transformer.encoder.norm)
    _copy_norm(model.decoder_norm, transformer.decoder.norm)
    model.src_embedding.weight.copy_(src_embedding.weight)
    model.tgt_embedding.weight.copy_(tgt_embedding.weight)
    model.output.weight.copy_(output.weight)
    return model


def _sharing(src_embedding, tgt_embedding, output) -> str:
    if getattr(output, "bias", None) is not None:
        raise ValueError(
            "the output layer must have no bias (Seq2SeqTransformer's has none)"
        )
    if output.weight is tgt_embedding.weight:
        return (
            "all" if src_embedding.weight is tgt_embedding.weight else "decoder-output"
        )
    if src_embedding.weight is tgt_embedding.weight:
        raise ValueError("shared source and target embeddings need a tied output layer")
    return "none"


# ------------------------------------------------------------------------------------
# Bahdanau: a GRU encoder-decoder with additive attention
# --------------------------------------------------------------------------------------


class BahdanauSeq2Seq(nn.Module):
    r"""A GRU encoder-decoder that aligns while it translates (Bahdanau et al. 2015).

    .. code-block:: text

        h_j   = [fwd GRU; bwd GRU](E_src[x_j])           (B, S, 2H)  annotations
        e_ij  = v^T tanh(W_q s_{i-1} + W_k h_j)          (B, 1, S)   additive_scores
        a_ij  = softmax_j(e_ij)   (source padding masked) (B, 1, S)
        c_i   = sum_j a_ij h_j                           (B, 2H)     context
        s_i   = GRUCell([E_tgt[y_{i-1}]; c_i], s_{i-1})  (B, H)
        logit = W_o [s_i; c_i; E_tgt[y_{i-1}]]           (B, V_tgt)

    with ``s_0 = tanh(W_s h_1^{bwd})``. The score is
    :func:`companion.torch.scores.additive_scores` with parameters ``w_q (H, A)``,
    ``w_k (2H, A)``, ``v (A,)``.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_dim: int = 32,
        hidden_size: int = 64,
        attention_dim: int = 64,
        *,
        pad_id: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (
            ("src_vocab_size", src_vocab_size),
            ("tgt_vocab_size", tgt_vocab_size),
            ("embed_dim", embed_dim),
            ("hidden_size", hidden_size),
            ("attention_dim", attention_dim),
        ):
            _checks.check_int(name, value)
        # the padding token of both vocabularies
        pad_id = _checks.check_token_id(
            "pad_id", pad_id, min(src_vocab_size, tgt_vocab_size)
        )
        factory = {"device": device, "dtype": dtype}
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.pad_id, self.hidden_size = pad_id, hidden_size
        H, A = hidden_size, attention_dim
        self.src_embedding = nn.Embedding(src_vocab_size, embed_dim, **factory)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embed_dim, **factory)
        self.encoder = nn.GRU(
            embed_dim, H, batch_first=True, bidirectional=True, **factory
        )
        self.init_state = nn.Linear(H, H, **factory)
        self.w_q = nn.Parameter(torch.empty(H, A, **factory))
        self.w_k = nn.Parameter(torch.empty(2 * H, A, **factory))
        self.v = nn.Parameter(torch.empty(A, **factory))
        for p in (self.w_q, self.w_k):
            nn.init.xavier_uniform_(p)
        nn.init.uniform_(self.v, -(A**-0.5), A**-0.5)
        self.decoder = nn.GRUCell(embed_dim + 2 * H, H, **factory)
        self.output = nn.Linear(H + 2 * H + embed_dim, tgt_vocab_size, **factory)

    def encode(self, src: torch.Tensor):
        """``src (B, S)`` -> states ``(B, S, 2H)``, mask ``(B, S)``, ``s_0 (B, H)``."""
        _check_ids("src", src, self.src_vocab_size)
        mask = src != self.pad_id  # (B, S)
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError(
                "src: every source sentence needs at least one token that is not "
                f"pad_id={self.pad_id}"
            )
        packed = nn.utils.rnn.pack_padded_sequence(
            self.src_embedding(src),
            lengths.cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        out, last = self.encoder(packed)  # last: (2, B, H)
        annotations, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=src.shape[1]
        )  # (B, S, 2H)
        return annotations, mask, torch.tanh(self.init_state(last[1]))

    def step(self, prev_token, state, annotations, mask):
        """One decoder step: ``(logits (B, V), state (B, H), weights (B, S))``."""
        # e_ij = v^T tanh(W_q s_{i-1} + W_k h_j): (B, 1, S)
        scores = additive_scores(
            state[:, None, :], annotations, self.w_q, self.w_k, self.v
        )
        weights = softmax(scores, mask=mask[:, None, :])[:, 0]  # (B, S)
        context = (weights[:, :, None] * annotations).sum(1)  # (B, 2H)
        embedded = self.tgt_embedding(prev_token)  # (B, embed)
        state = self.decoder(torch.cat([embedded, context], -1), state)  # (B, H)
        logits = self.output(torch.cat([state, context, embedded], -1))  # (B, V)
        return logits, state, weights

    def forward(self, src, tgt, *, return_weights: bool = False):
        """Teacher forcing: ``src (B, S)``, ``tgt (B, L)`` -> logits ``(B, L, V_tgt)``.

        Position ``i`` predicts ``tgt[:, i + 1]``; with ``return_weights`` also the
        attention weights ``(B, L, S)``.
        """
        _check_ids("src", src, self.src_vocab_size)
        _check_ids("tgt", tgt, self.tgt_vocab_size)
        _check_batches(src, tgt)
        annotations, mask, state = self.encode(src)
        logits, weights = [], []
        for i in range(tgt.shape[1]):
            out, state, w = self.step(tgt[:, i], state, annotations, mask)
            logits.append(out)
            weights.append(w)
        logits = torch.stack(logits, 1)  # (B, L, V)
        return (logits, torch.stack(weights, 1)) if return_weights else logits

    @torch.no_grad()
    def greedy_decode(self, src, *, bos_id: int, eos_id: int, max_length: int):
        """``(tokens (B, T), weights (B, T - 1, S))``; tokens start with bos_id."""
        bos_id = _checks.check_token_id("bos_id", bos_id, self.tgt_vocab_size)
        eos_id = _checks.check_token_id("eos_id", eos_id, self.tgt_vocab_size)
        max_length = _checks.check_int("max_length", max_length)
        annotations, mask, state = self.encode(src)
        B = src.shape[0]
        token = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
        tokens, weights = [token], []
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_length):
            logits, state, w = self.step(token, state, annotations, mask)
            token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            tokens.append(token)
            weights.append(w)
            finished |= token == eos_id
            if finished.all():
                break
        return torch.stack(tokens, 1), torch.stack(weights, 1)
