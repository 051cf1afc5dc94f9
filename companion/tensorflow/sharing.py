r"""Parameter sharing in Keras/TensorFlow: a tied output layer and ALBERT's shared
layers.

Sharing is done by sharing the *object*: a Keras layer called twice uses its variables
twice, and a layer that reads another layer's variable uses that variable, not a copy.
Keras does the bookkeeping: ``model.weights`` lists each variable once, so
``model.count_params()`` counts a shared tensor once, and ``tf.GradientTape`` adds the
gradients of both uses into the one variable's gradient.

* Weight tying (Press & Wolf 2017; GPT-2): :class:`TiedOutput` maps hidden states to
  vocabulary logits with the embedding matrix ``W_E (V, E)`` itself,
  ``logits = h W_E^T``.
* Cross-layer sharing (ALBERT, Lan et al. 2020): one encoder layer applied
  ``num_layers`` times, plus a factorised embedding; :class:`TransformerEncoder`.

Keras has no parameter groups; to keep embeddings, norms and biases out of weight
decay (see :func:`companion.torch.sharing.param_groups_for_weight_decay` for why), pass
``exclude_from_weight_decay(var_list=...)`` of ``keras.optimizers.AdamW``;
:func:`no_weight_decay_variables` lists those variables for a model, each once.

Explained in the book chapters *Parameter sharing in code* and *Applications: language*.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from companion import _checks
from companion.tensorflow.multihead import MultiHeadAttention

__all__ = [
    "TiedOutput",
    "no_weight_decay_variables",
    "EncoderLayer",
    "TransformerEncoder",
]


# --- weight tying: the output layer reads the embedding's matrix ----------------------


class TiedOutput(layers.Layer):
    r"""Vocabulary logits from the embedding's own matrix: ``logits = h W_E^T (+ b)``.

    ``W_E (V, E)`` is ``embedding_layer.embeddings``, the same variable object: the
    layer adds no copy of it (``tied.tied_weight is embedding_layer.embeddings``), so a
    model that uses both counts ``V * E`` parameters once and trains one tensor that
    receives the gradients of both uses. A bias ``(V,)``, if asked for, is this layer's
    own.

    Parameters
    ----------
    embedding_layer:
        A ``keras.layers.Embedding`` (input_dim ``V``, output_dim ``E``).
    use_bias:
        Whether to add a learned per-token bias ``(V,)``.
    """

    def __init__(
        self, embedding_layer: layers.Embedding, *, use_bias: bool = False, **kwargs
    ):
        if not isinstance(embedding_layer, layers.Embedding):
            raise TypeError(
                "embedding_layer must be a keras.layers.Embedding, got "
                f"{type(embedding_layer).__name__}"
            )
        super().__init__(**kwargs)
        self.embedding_layer = embedding_layer
        self.use_bias = bool(use_bias)

    @property
    def tied_weight(self):
        """The shared matrix ``W_E (V, E)``, the embedding layer's variable."""
        return self.embedding_layer.embeddings

    def build(self, input_shape):
        vocab_size, dim = (
            self.embedding_layer.input_dim,
            self.embedding_layer.output_dim,
        )
        if input_shape[-1] is not None and input_shape[-1] != dim:
            raise ValueError(
                f"inputs must have last axis E={dim} (embedding ({vocab_size}, "
                f"{dim})), "
                f"got shape {tuple(input_shape)}"
            )
        if not self.embedding_layer.built:
            self.embedding_layer.build(None)
        self.bias = (
            self.add_weight(shape=(vocab_size,), initializer="zeros", name="bias")
            if self.use_bias
            else None
        )

    def call(self, hidden):
        """``hidden (..., E)`` -> ``logits (..., V)``."""
        weight = ops.cast(self.tied_weight, hidden.dtype)  # (V, E)
        logits = ops.matmul(hidden, ops.transpose(weight))  # (..., V): h W_E^T
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, hidden.dtype)  # + b
        return logits

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.embedding_layer.input_dim)


# --- weight decay: which variables to exclude -----------------------------------------


def no_weight_decay_variables(model: keras.Model) -> list:
    """The variables to keep out of weight decay: embeddings, norms, biases, each listed
    once.

    Use as ``opt = keras.optimizers.AdamW(weight_decay=0.1)`` then
    ``opt.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))`` (by
    object: ``var_names`` would match substrings of the short names ``"kernel"``,
    ``"bias"``, ...). A tied matrix is an embedding, so it is excluded, once.
    """
    found: dict[int, object] = {}
    # each layer once
    for layer in model._flatten_layers(include_self=True, recursive=True):
        is_norm = isinstance(
            layer,
            (
                layers.LayerNormalization,
                layers.BatchNormalization,
                layers.GroupNormalization,
                getattr(layers, "RMSNormalization", ()),
            ),
        )
        is_embedding = isinstance(layer, layers.Embedding)
        for var in layer.trainable_weights:
            if is_norm or is_embedding or len(var.shape) < 2:
                found.setdefault(id(var), var)
    return list(found.values())


# --- cross-layer sharing: ALBERT ------------------------------------------------------


def _gelu(x):
    r"""Exact GELU, :math:`x \Phi(x) = \tfrac{x}{2} (1 + \mathrm{erf}(x / \sqrt{2}))`,
    in the dtype of ``x``.

    ``keras.activations.gelu(approximate=False)`` uses a float32 ``sqrt(2)`` and so is
    off by ~4e-9 in float64; a Python float keeps float64 exact (as
    ``torch.nn.functional.gelu``).
    """
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))  # x Phi(x)


class EncoderLayer(layers.Layer):
    r"""One post-norm transformer encoder layer, as in BERT and ALBERT (Keras).

    .. math::

        x' = \mathrm{LN}(x + \mathrm{MHA}(x)), \qquad
        y = \mathrm{LN}(x' + W_2\, \mathrm{GELU}(W_1 x' + b_1) + b_2)

    ``x (B, L, E)`` -> ``(B, L, E)`` with ``E = hidden_size``. Attention is
    :class:`companion.tensorflow.multihead.MultiHeadAttention` with ``key_dim = E / H``
    (grouped-query with ``num_kv_heads``); ``attention_mask`` is ``True`` = attend,
    ``(B, L, L)`` or broadcastable ``(B, H, L, L)`` (e.g. ``padding_mask(lengths, L)``).
    LayerNorm epsilon is ``1e-5``, GELU exact: the same layer as
    :class:`companion.torch.sharing.EncoderLayer`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}"
            )
        # sublayers follow this layer's dtype policy
        same_dtype = {"dtype": self.dtype_policy}
        self.attention = MultiHeadAttention(
            num_heads, hidden_size // num_heads, num_kv_heads=num_kv_heads, **same_dtype
        )
        self.attention_norm = layers.LayerNormalization(epsilon=1e-5, **same_dtype)
        self.ffn_in = layers.Dense(intermediate_size, **same_dtype)
        self.ffn_out = layers.Dense(hidden_size, **same_dtype)
        self.ffn_norm = layers.LayerNormalization(epsilon=1e-5, **same_dtype)
        self.dropout = layers.Dropout(dropout, **same_dtype)

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)
        self.attention_norm.build(input_shape)
        self.ffn_in.build(input_shape)
        self.ffn_out.build((*input_shape[:-1], self.ffn_in.units))
        self.ffn_norm.build(input_shape)

    def call(self, x, attention_mask=None, training=None):
        attended = self.attention(x, x, attention_mask=attention_mask)  # (B, L, E)
        # (B, L, E): LN(x + MHA(x))
        x = self.attention_norm(x + self.dropout(attended, training=training))
        mlp = self.ffn_out(_gelu(self.ffn_in(x)))  # (B, L, I) -> (B, L, E)
        return self.ffn_norm(x + self.dropout(mlp, training=training))  # (B, L, E)


class TransformerEncoder(keras.Model):
    r"""An ALBERT-style encoder in Keras: factorised embeddings and (by default) one
    shared layer.

    The Keras twin of :class:`companion.torch.sharing.TransformerEncoder`, with the same
    arguments and parameter count: tokens ``(V, E_emb)`` plus positions
    ``(max_positions, E_emb)``, a LayerNorm, a projection ``E_emb -> E_hidden``, then
    ``num_layers`` applications of :class:`EncoderLayer`. With ``share_layers=True``
    ``model.encoder_layers`` holds the *same* layer object ``num_layers`` times, so
    ``count_params()`` is that of one layer plus the embeddings. (``model.layers`` is
    Keras's own list of sublayers, each once.)

    ``model(ids (B, L), attention_mask=None)`` -> ``(B, L, E_hidden)``.

    Explained in the book chapter *Parameter sharing in code*.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        *,
        share_layers: bool = True,
        num_kv_heads: int | None = None,
        max_positions: int = 512,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("vocab_size", vocab_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
            ("max_positions", max_positions),
        ):
            _checks.check_int(name, value)
        self.share_layers = bool(share_layers)
        self.max_positions = max_positions
        # sublayers follow the model's dtype policy
        same_dtype = {"dtype": self.dtype_policy}
        self.token_embedding = layers.Embedding(
            vocab_size, embedding_size, **same_dtype
        )
        self.position_embedding = layers.Embedding(
            max_positions, embedding_size, **same_dtype
        )
        self.embedding_norm = layers.LayerNormalization(epsilon=1e-5, **same_dtype)
        # E_emb -> E_hidden
        self.embedding_projection = layers.Dense(hidden_size, **same_dtype)
        self.dropout = layers.Dropout(dropout, **same_dtype)

        def new_layer() -> EncoderLayer:
            return EncoderLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                num_kv_heads=num_kv_heads,
                dropout=dropout,
                **same_dtype,
            )

        if self.share_layers:
            shared = new_layer()
            # one object, num_layers positions
            self.encoder_layers = [shared] * num_layers
        else:
            self.encoder_layers = [new_layer() for _ in range(num_layers)]

    def call(self, ids, attention_mask=None, training=None):
        if len(ids.shape) != 2 or "int" not in str(ids.dtype):
            raise ValueError(
                "ids must be integer token ids of shape (B, L), got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        L = ids.shape[1]
        if L is not None and L > self.max_positions:
            raise ValueError(
                f"ids has length L={L} but max_positions={self.max_positions}"
            )
        positions = ops.arange(ops.shape(ids)[1])  # (L,)
        # (B, L, E_emb)
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]
        x = self.dropout(self.embedding_norm(x), training=training)  # (B, L, E_emb)
        x = self.embedding_projection(x)  # (B, L, E_hidden)
        # the same object num_layers times when shared
        for layer in self.encoder_layers:
            # (B, L, E_hidden)
            x = layer(x, attention_mask=attention_mask, training=training)
        return x
