r"""Counting parameters, FLOPs and bytes, framework free: what sharing saves, in
numbers.

Formulas for single layers (dense, convolution, locally connected, attention with
grouped-query heads, the KV cache) and for whole transformers
(:class:`TransformerConfig`, :data:`PRESETS`, :func:`transformer_parameter_count`),
counting exactly as the reference implementations count their models:

* GPT-2 (Hugging Face ``GPT2LMHeadModel``): the LM head is **tied** to the token
  embedding, so it adds nothing; ``gpt2`` (small) has 124,439,808 parameters.
* BERT (``BertModel``, with its pooler): ``bert-base-uncased`` 109,482,240,
  ``bert-large-uncased`` 335,141,888.
* ALBERT (``AlbertModel``, with its pooler): factorised embeddings (size 128, projected
  to the hidden size) and **one** transformer layer shared by all layers:
  ``albert-base-v2`` 11,683,584.

:func:`count_parameters` counts the parameters of a torch module or a Keras model,
counting a shared tensor once. This module imports nothing but the standard library;
frameworks are recognised by duck typing.

Explained in the book chapters *Background* and *Parameter sharing: algorithm and math*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "dense_parameter_count",
    "conv2d_parameter_count",
    "locally_connected2d_parameter_count",
    "attention_parameter_count",
    "kv_cache_bytes",
    "factorized_embedding_parameter_count",
    "TransformerConfig",
    "PRESETS",
    "transformer_parameter_count",
    "parameter_breakdown",
    "EncoderDecoderConfig",
    "ENCODER_DECODER_PRESETS",
    "encoder_decoder_parameter_count",
    "encoder_decoder_parameter_breakdown",
    "training_flops_per_token",
    "inference_flops_per_token",
    "weight_bytes",
    "count_parameters",
    "DTYPE_BYTES",
]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- single layers --------------------------------------------------------------------


def dense_parameter_count(
    in_features: int, out_features: int, *, bias: bool = True
) -> int:
    r"""A dense layer ``y = W x + b``: :math:`d_{in} d_{out} + d_{out}`."""
    return in_features * out_features + (out_features if bias else 0)


def conv2d_parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size,
    *,
    groups: int = 1,
    bias: bool = True,
) -> int:
    r"""A conv2d layer: :math:`C_{out} (C_{in}/g)\, k_H k_W + C_{out}`, whatever the
    input size.

    The count does not depend on the image size: the kernel is shared by every position.
    """
    kH, kW = _pair(kernel_size)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and "
            f"out_channels={out_channels}"
        )
    return out_channels * (in_channels // groups) * kH * kW + (
        out_channels if bias else 0
    )


def locally_connected2d_parameter_count(
    in_channels: int, out_channels: int, kernel_size, output_size, *, bias: bool = True
) -> int:
    r"""A locally connected layer: :math:`H_{out} W_{out} (C_{out} C_{in} k_H k_W +
    C_{out})`.

    The convolution's count times the number of output positions (bias unshared too, as
    in :func:`companion.numpy.locally_connected2d`).
    """
    kH, kW = _pair(kernel_size)
    H_out, W_out = _pair(output_size)
    return (
        H_out
        * W_out
        * (out_channels * in_channels * kH * kW + (out_channels if bias else 0))
    )


def attention_parameter_count(
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    bias: bool = True,
) -> int:
    r"""Multi-head attention with ``num_kv_heads`` key/value heads (grouped-query
    attention).

    .. math::

        \underbrace{E\, H D}_{W_Q} + \underbrace{2\, E\, H_{kv} D}_{W_K, W_V}
        + \underbrace{H D\, E}_{W_O} \;+\; \text{biases } (H D + 2 H_{kv} D + E)

    ``head_dim`` defaults to ``E / H``. ``H_kv = H`` is ordinary multi-head attention,
    ``H_kv = 1`` multi-query attention: the key/value projections shrink by
    ``H / H_kv``.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
        )
    if head_dim is None:
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                "give head_dim"
            )
        head_dim = embed_dim // num_heads
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    weights = embed_dim * q + 2 * embed_dim * kv + q * embed_dim  # W_Q, W_K, W_V, W_O
    biases = q + 2 * kv + embed_dim if bias else 0
    return weights + biases


def kv_cache_bytes(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch: int = 1,
    dtype_bytes: int = 2,
) -> int:
    r"""Memory of a KV cache: :math:`2 \cdot n_{layers} \cdot B \cdot H_{kv} \cdot S
    \cdot D \cdot \text{bytes}`.

    The 2 is keys and values. It grows with the number of key/value heads, so
    grouped-query attention (``H_kv < H``) divides the cache by ``H / H_kv``.
    """
    return 2 * num_layers * batch * num_kv_heads * seq_len * head_dim * dtype_bytes


def factorized_embedding_parameter_count(
    vocab_size: int, embedding_size: int, hidden_size: int, *, bias: bool = True
) -> int:
    r"""ALBERT's factorised token embedding: :math:`V E + E H (+ H)`, against the
    :math:`V H` of one table (:class:`companion.torch.FactorizedEmbedding`).

    A ``V x E`` table and an ``E x H`` projection (with its bias, as Hugging Face
    ``AlbertModel``'s ``embedding_hidden_mapping_in``); without the bias, fewer
    parameters than ``V H`` whenever ``E < V H / (V + H)``.
    """
    projection = embedding_size * hidden_size + (hidden_size if bias else 0)
    return vocab_size * embedding_size + projection


# --- whole transformers ---------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """The sizes of a transformer, enough to count its parameters exactly.

    Attributes
    ----------
    vocab_size
        rows of the token embedding
    max_positions
        rows of the learned position embedding
    hidden_size
        ``E``, the width of every layer
    num_layers
        the number of transformer layers
    num_heads
        query heads; ``num_kv_heads`` (``None`` = ``num_heads``) below it is
        grouped-query
    intermediate_size
        the MLP's inner width (``4 E`` in GPT-2 and BERT)
    embedding_size
        ALBERT's factorised embedding width (``None`` = ``hidden_size``, no
        projection); smaller, it adds a projection ``embedding_size -> hidden_size``
    type_vocab_size
        BERT/ALBERT segment embeddings (2), 0 for GPT-2
    tie_embeddings
        the LM head reuses the token embedding (GPT-2); ``False`` with
        ``lm_head`` counts a separate ``E x V`` output matrix
    lm_head
        whether the model has an output head over the vocabulary
    share_layers
        ALBERT: one layer's parameters used by all ``num_layers`` layers
    pooler
        BERT/ALBERT's ``E x E`` dense layer on the first token
    embedding_norm
        a LayerNorm after the embeddings (BERT, ALBERT)
    final_norm
        a LayerNorm after the last layer (pre-LN models: GPT-2)
    attention_bias
        biases in the attention projections
    mlp_bias
        biases in the MLP's projections
    """

    vocab_size: int
    max_positions: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    embedding_size: int | None = None
    type_vocab_size: int = 0
    tie_embeddings: bool = True
    lm_head: bool = False
    share_layers: bool = False
    pooler: bool = False
    embedding_norm: bool = False
    final_norm: bool = False
    attention_bias: bool = True
    mlp_bias: bool = True

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


def _gpt2(hidden: int, layers: int, heads: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=50257,
        max_positions=1024,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden,
        tie_embeddings=True,
        lm_head=True,
        final_norm=True,
    )


def _bert(hidden: int, layers: int, heads: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=30522,
        max_positions=512,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden,
        type_vocab_size=2,
        pooler=True,
        embedding_norm=True,
    )


def _albert(hidden: int, layers: int, heads: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=30000,
        max_positions=512,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden,
        embedding_size=128,
        type_vocab_size=2,
        share_layers=True,
        pooler=True,
        embedding_norm=True,
    )


#: The published configurations (Hugging Face ``config.json`` of each checkpoint).
PRESETS: dict[str, TransformerConfig] = {
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "bert-base": _bert(768, 12, 12),
    "bert-large": _bert(1024, 24, 16),
    "albert-base": _albert(768, 12, 12),
    "albert-large": _albert(1024, 24, 16),
    "albert-xlarge": _albert(2048, 24, 16),
    "albert-xxlarge": _albert(4096, 12, 64),
}


def parameter_breakdown(config: TransformerConfig) -> dict[str, int]:
    r"""The parameters of ``config`` by component; the values sum to
    :func:`transformer_parameter_count`.

    Keys: ``embeddings`` (token, position, segment embeddings, their LayerNorm and
    ALBERT's projection), ``attention`` (``Q, K, V, O`` of all *distinct* layers),
    ``mlp``, ``norms`` (the layers' LayerNorms and the final one), ``pooler``, ``head``
    (0 when tied). Per distinct layer, with ``E`` hidden, ``I`` intermediate:

    .. math::

        \text{attention} = \text{attention\_parameter\_count}(E, H, H_{kv}), \quad
        \text{mlp} = 2 E I + I + E, \quad \text{norms} = 2 \cdot 2E

    With ``share_layers`` there is one distinct layer, whatever ``num_layers`` is.
    """
    c = config
    E, V = c.hidden_size, c.vocab_size
    e = c.embedding_size or E
    # token, position, segment tables
    embeddings = (V + c.max_positions + c.type_vocab_size) * e
    if c.embedding_norm:
        # LayerNorm(e): gamma, beta
        embeddings += 2 * e
    if e != E:
        # ALBERT's e -> E projection
        embeddings += dense_parameter_count(e, E)
    distinct_layers = 1 if c.share_layers else c.num_layers
    attention = attention_parameter_count(
        E, c.num_heads, c.num_kv_heads, bias=c.attention_bias
    )
    mlp = dense_parameter_count(
        E, c.intermediate_size, bias=c.mlp_bias
    ) + dense_parameter_count(c.intermediate_size, E, bias=c.mlp_bias)
    norms = distinct_layers * 2 * (2 * E) + (2 * E if c.final_norm else 0)
    pooler = dense_parameter_count(E, E) if c.pooler else 0
    head = V * E if (c.lm_head and not c.tie_embeddings) else 0
    return {
        "embeddings": embeddings,
        "attention": distinct_layers * attention,
        "mlp": distinct_layers * mlp,
        "norms": norms,
        "pooler": pooler,
        "head": head,
    }


def transformer_parameter_count(config: TransformerConfig) -> int:
    """Total parameters of ``config``, counted as the reference implementation counts
    them.

    A tied head counts once (it is the token embedding); shared layers count once. See
    :func:`parameter_breakdown` for the components.
    """
    return sum(parameter_breakdown(config).values())


# --- encoder-decoder transformers (Vaswani et al. 2017) -------------------------------


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """The sizes of an encoder-decoder transformer (as ``Seq2SeqTransformer`` builds
    it).

    Sinusoidal positions have no parameters, so no maximum length is needed.

    Attributes
    ----------
    vocab_size
        the source vocabulary (and the target one unless ``tgt_vocab_size`` is given)
    hidden_size
        ``E``, the width of every layer
    num_heads
        attention heads ``H``
    num_encoder_layers
        the encoder's depth
    num_decoder_layers
        the decoder's depth
    intermediate_size
        the MLP's inner width (``4 E`` in the paper)
    tgt_vocab_size
        the target vocabulary (``None`` = ``vocab_size``, a shared vocabulary)
    share_embeddings
        ``"none"`` (source embedding, target embedding and output layer: three
        matrices), ``"decoder-output"`` (the output layer is the target embedding) or
        ``"all"`` (one matrix for all three; needs one vocabulary)
    final_norm
        a LayerNorm after each stack (pre-norm models, ``torch.nn.Transformer``)
    bias
        biases in the attention and MLP projections (the output layer has none)
    """

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    intermediate_size: int
    tgt_vocab_size: int | None = None
    share_embeddings: str = "all"
    final_norm: bool = False
    bias: bool = True

    def replace(self, **changes) -> "EncoderDecoderConfig":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


#: The base and big models of Vaswani et al. (2017, Table 3) for English-German, with a
#: shared source-target vocabulary of about 37000 BPE tokens and three-way tied
#: embeddings. The paper reports 65M and 213M parameters.
ENCODER_DECODER_PRESETS: dict[str, EncoderDecoderConfig] = {
    "transformer-base": EncoderDecoderConfig(
        vocab_size=37000,
        hidden_size=512,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        intermediate_size=2048,
    ),
    "transformer-big": EncoderDecoderConfig(
        vocab_size=37000,
        hidden_size=1024,
        num_heads=16,
        num_encoder_layers=6,
        num_decoder_layers=6,
        intermediate_size=4096,
    ),
}


def encoder_decoder_parameter_breakdown(config: EncoderDecoderConfig) -> dict[str, int]:
    r"""The parameters of an encoder-decoder transformer by component.

    Keys: ``embeddings`` (the distinct vocabulary matrices: ``(V_s + 2 V_t) E``,
    ``(V_s + V_t) E`` or ``V E`` for ``share_embeddings`` none / decoder-output / all),
    ``encoder`` (per layer: self-attention, MLP, two LayerNorms), ``decoder`` (per
    layer: self-attention, cross-attention, MLP, three LayerNorms) and ``final_norms``.
    """
    c = config
    E, Vs = c.hidden_size, c.vocab_size
    Vt = Vs if c.tgt_vocab_size is None else c.tgt_vocab_size
    matrices = {"none": (Vs + 2 * Vt), "decoder-output": Vs + Vt, "all": Vs}
    if c.share_embeddings not in matrices:
        raise ValueError(
            f"share_embeddings must be one of {tuple(matrices)}, got "
            f"{c.share_embeddings!r}"
        )
    if c.share_embeddings == "all" and Vs != Vt:
        raise ValueError(
            f"share_embeddings='all' needs one vocabulary, got {Vs} and {Vt}"
        )
    attention = attention_parameter_count(E, c.num_heads, bias=c.bias)
    mlp = dense_parameter_count(E, c.intermediate_size, bias=c.bias)
    mlp += dense_parameter_count(c.intermediate_size, E, bias=c.bias)
    norm = 2 * E  # gamma, beta
    return {
        "embeddings": matrices[c.share_embeddings] * E,
        "encoder": c.num_encoder_layers * (attention + mlp + 2 * norm),
        "decoder": c.num_decoder_layers * (2 * attention + mlp + 3 * norm),
        "final_norms": 2 * norm if c.final_norm else 0,
    }


def encoder_decoder_parameter_count(config: EncoderDecoderConfig) -> int:
    """Total parameters of an encoder-decoder transformer, each shared matrix once."""
    return sum(encoder_decoder_parameter_breakdown(config).values())


# --- compute and memory ---------------------------------------------------------------

#: Bytes per element of the usual dtypes.
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "float8": 1,
    "int4": 0.5,
}


def training_flops_per_token(n_params: int) -> float:
    r"""About :math:`6N` floating-point operations per token for training (Kaplan et al.
    2020).

    ``2N`` for the forward pass (a multiply and an add per weight) and ``4N`` for the
    backward pass; attention over the context and embedding lookups are left out.
    Sharing layers (ALBERT) cuts ``N`` in memory but **not** this compute: a shared
    layer is still run ``num_layers`` times, so use the unshared count here.
    """
    return 6.0 * n_params


def inference_flops_per_token(n_params: int) -> float:
    r"""About :math:`2N` floating-point operations per token for a forward pass."""
    return 2.0 * n_params


def weight_bytes(n_params: int, dtype: str = "float32") -> int:
    """Memory of ``n_params`` weights stored in ``dtype`` (a name of
    :data:`DTYPE_BYTES`)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return math.ceil(n_params * DTYPE_BYTES[dtype])


# --- counting a framework model -------------------------------------------------------


def _numel(shape) -> int:
    return math.prod(int(s) for s in tuple(shape))


def count_parameters(model, *, trainable_only: bool = False) -> int:
    """Number of parameters of a torch module or a Keras model, **each shared tensor
    once**.

    torch: ``model.named_parameters(remove_duplicate=True)``, deduplicated again by
    object identity (a tied embedding/head is one ``Parameter``), buffers excluded.
    Keras: ``model.weights`` (trainable and non-trainable, as ``count_params()``),
    deduplicated by identity and by variable path. ``trainable_only`` keeps the
    parameters that require gradients (torch) or ``model.trainable_weights`` (Keras). No
    framework is imported: the model is recognised by its methods.
    """
    # torch.nn.Module
    if hasattr(model, "named_parameters"):
        seen: dict[int, object] = {}
        for _, p in model.named_parameters(remove_duplicate=True):
            if trainable_only and not p.requires_grad:
                continue
            seen.setdefault(id(p), p)
        return sum(p.numel() for p in seen.values())
    # keras Model / Layer
    if hasattr(model, "weights"):
        weights = model.trainable_weights if trainable_only else model.weights
        ids, paths, total = set(), set(), 0
        for w in weights:
            path = getattr(w, "path", None)
            if id(w) in ids or (path is not None and path in paths):
                continue
            ids.add(id(w))
            if path is not None:
                paths.add(path)
            total += _numel(w.shape)
        return total
    raise TypeError(
        "model must be a torch.nn.Module or a keras Model/Layer, got "
        f"{type(model).__name__}"
    )
