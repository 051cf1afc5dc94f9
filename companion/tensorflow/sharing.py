r"""Parameter sharing in Keras/TensorFlow: a tied output layer and ALBERT's shared layers.

Sharing is done by sharing the *object*: a Keras layer called twice uses its variables
twice, and a layer that reads another layer's variable uses that variable, not a copy.
Keras does the bookkeeping: ``model.weights`` lists each variable once, so
``model.count_params()`` counts a shared tensor once, and ``tf.GradientTape`` adds the
gradients of both uses into the one variable's gradient.

* Weight tying (Press & Wolf 2017; GPT-2): :class:`TiedOutput` maps hidden states to
  vocabulary logits with the embedding matrix ``W_E (V, E)`` itself, ``logits = h W_E^T``.
* Cross-layer sharing (ALBERT, Lan et al. 2020): one encoder layer applied ``num_layers``
  times, plus a factorised embedding; :class:`TransformerEncoder`.

Keras has no parameter groups; to keep embeddings, norms and biases out of weight
decay (see :func:`companion.torch.sharing.param_groups_for_weight_decay` for why), pass
``exclude_from_weight_decay(var_list=...)`` of ``keras.optimizers.AdamW``;
:func:`no_weight_decay_variables` lists those variables for a model, each once.

Explained in the book chapters *Parameter sharing in code* and *Applications: language*.
"""

from __future__ import annotations

import keras
from keras import layers, ops

__all__ = ["TiedOutput", "no_weight_decay_variables"]


# --- weight tying: the output layer reads the embedding's matrix ---------------------------

class TiedOutput(layers.Layer):
    r"""Vocabulary logits from the embedding's own matrix: ``logits = h W_E^T (+ b)``.

    ``W_E (V, E)`` is ``embedding_layer.embeddings``, the same variable object: the layer
    adds no copy of it (``tied.tied_weight is embedding_layer.embeddings``), so a model
    that uses both counts ``V * E`` parameters once and trains one tensor that receives
    the gradients of both uses. A bias ``(V,)``, if asked for, is this layer's own.

    Parameters
    ----------
    embedding_layer:
        A ``keras.layers.Embedding`` (input_dim ``V``, output_dim ``E``).
    use_bias:
        Whether to add a learned per-token bias ``(V,)``.
    """

    def __init__(self, embedding_layer: layers.Embedding, *, use_bias: bool = False, **kwargs):
        if not isinstance(embedding_layer, layers.Embedding):
            raise TypeError(f"embedding_layer must be a keras.layers.Embedding, got {type(embedding_layer).__name__}")
        super().__init__(**kwargs)
        self.embedding_layer = embedding_layer
        self.use_bias = bool(use_bias)

    @property
    def tied_weight(self):
        """The shared matrix ``W_E (V, E)``, the embedding layer's variable."""
        return self.embedding_layer.embeddings

    def build(self, input_shape):
        vocab_size, dim = self.embedding_layer.input_dim, self.embedding_layer.output_dim
        if input_shape[-1] is not None and input_shape[-1] != dim:
            raise ValueError(f"inputs must have last axis E={dim} (embedding ({vocab_size}, {dim})), "
                             f"got shape {tuple(input_shape)}")
        if not self.embedding_layer.built:
            self.embedding_layer.build(None)
        self.bias = self.add_weight(shape=(vocab_size,), initializer="zeros", name="bias") if self.use_bias else None

    def call(self, hidden):
        """``hidden (..., E)`` -> ``logits (..., V)``."""
        weight = ops.cast(self.tied_weight, hidden.dtype)  # (V, E)
        logits = ops.matmul(hidden, ops.transpose(weight))  # (..., V): h W_E^T
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, hidden.dtype)  # + b
        return logits

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.embedding_layer.input_dim)


# --- weight decay: which variables to exclude ----------------------------------------------

def no_weight_decay_variables(model: keras.Model) -> list:
    """The variables to keep out of weight decay: embeddings, norms, biases, each listed once.

    Use as ``opt = keras.optimizers.AdamW(weight_decay=0.1)`` then
    ``opt.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))`` (by
    object: ``var_names`` would match substrings of the short names ``"kernel"``,
    ``"bias"``, ...). A tied matrix is an embedding, so it is excluded, once.
    """
    found: dict[int, object] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):  # each layer once
        is_norm = isinstance(layer, (layers.LayerNormalization, layers.BatchNormalization,
                                     layers.GroupNormalization, getattr(layers, "RMSNormalization", ())))
        is_embedding = isinstance(layer, layers.Embedding)
        for var in layer.trainable_weights:
            if is_norm or is_embedding or len(var.shape) < 2:
                found.setdefault(id(var), var)
    return list(found.values())
