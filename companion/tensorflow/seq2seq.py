r"""The encoder-decoder transformer as a Keras 3 model (TensorFlow backend).

The same model as :class:`companion.torch.seq2seq.Seq2SeqTransformer` (Vaswani et al.
2017): post-norm or pre-norm layers, cross-attention from the decoder's states ``(B, L,
E)`` to the encoder's output ``(B, S, E)``, sinusoidal positions, the embedding scaled
by ``sqrt(E)``, and ``share_embeddings`` = ``"none"``, ``"decoder-output"`` or ``"all"``
(the paper's three-way tying). :meth:`Seq2SeqTransformer.load_from_torch` copies the
weights of the torch model, and the two then compute the same function.
:meth:`Seq2SeqTransformer.greedy_decode` and :meth:`Seq2SeqTransformer.beam_search`
decode with a :class:`~companion.tensorflow.multihead.KVCache` per decoder layer for
self-attention and the encoder's keys and values computed once.

Masks follow :mod:`companion.conventions` (``True`` = attend); a source mask is boolean
``(B, S)``, ``True`` for real tokens, by default ``src != pad_id``.

Explained in the book chapter *Applications: translation with cross-attention*.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from companion import _checks
from companion.tensorflow.attention import scaled_dot_product_attention_reference
from companion.tensorflow.multihead import KVCache, MultiHeadAttention
from companion.tensorflow.positions import sinusoidal_positions
from companion.tensorflow.sharing import TiedOutput

__all__ = [
    "SHARE_EMBEDDINGS",
    "cross_attention_kv",
    "Seq2SeqEncoderLayer",
    "Seq2SeqDecoderLayer",
    "Seq2SeqTransformer",
]

#: The settings of ``share_embeddings``: which of the three vocabulary matrices are one.
SHARE_EMBEDDINGS = ("none", "decoder-output", "all")


def _key_mask(keep):
    """``(B, S)`` bool (True = token) -> ``(B, 1, 1, S)``, for all heads and queries."""
    return None if keep is None else keep[:, None, None, :]


def cross_attention_kv(attention: MultiHeadAttention, memory):
    """Keys ``(B, H_kv, S, D)`` and values ``(B, H_kv, S, D_v)`` of ``memory``."""
    dtype = memory.dtype

    def project(kernel, bias):
        y = tf.einsum("bse,ehd->bhsd", memory, tf.cast(kernel, dtype))
        return y if bias is None else y + tf.cast(bias, dtype)[None, :, None, :]

    key = project(attention.key_kernel, attention.key_bias)
    value = project(attention.value_kernel, attention.value_bias)
    return key, value


def _attend_precomputed(attention: MultiHeadAttention, x, key, value, mask):
    """``attention(x, memory, attention_mask=mask)`` with the memory's K and V given."""
    dtype = x.dtype
    q = tf.einsum("ble,ehd->bhld", x, tf.cast(attention.query_kernel, dtype))
    if attention.query_bias is not None:
        q = q + tf.cast(attention.query_bias, dtype)[None, :, None, :]  # (B, H, L, D)
    # (B, H, L, D_v)
    heads = scaled_dot_product_attention_reference(q, key, value, mask=mask)
    out = tf.einsum("bhld,hde->ble", heads, tf.cast(attention.output_kernel, dtype))
    if attention.output_bias is not None:
        out = out + tf.cast(attention.output_bias, dtype)
    return out  # (B, L, E)


class _FeedForward(keras.layers.Layer):
    def __init__(self, d_model, dim_feedforward, dropout, **kwargs):
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype")
        self.linear1 = keras.layers.Dense(
            dim_feedforward, activation="relu", dtype=dtype
        )
        self.linear2 = keras.layers.Dense(d_model, dtype=dtype)
        self.dropout = keras.layers.Dropout(dropout, dtype=dtype)

    def call(self, x, training=None):
        return self.linear2(self.dropout(self.linear1(x), training=training))


class Seq2SeqEncoderLayer(keras.layers.Layer):
    """Self-attention and a ReLU MLP, residuals and LayerNorms (post- or pre-norm)."""

    def __init__(
        self,
        d_model,
        num_heads,
        dim_feedforward,
        *,
        dropout=0.0,
        norm_first=False,
        layer_norm_eps=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype")
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            num_heads, d_model // num_heads, dtype=dtype
        )
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, dtype=dtype)
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_eps, dtype=dtype
        )
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_eps, dtype=dtype
        )
        self.dropout1 = keras.layers.Dropout(dropout, dtype=dtype)
        self.dropout2 = keras.layers.Dropout(dropout, dtype=dtype)

    def call(self, x, src_mask=None, training=None):
        """``x (B, S, E)``, ``src_mask (B, S)`` bool (True = token) -> ``(B, S, E)``."""
        mask = _key_mask(src_mask)

        def sa(h):
            out = self.self_attn(h, h, attention_mask=mask)
            return self.dropout1(out, training=training)

        def ff(h):
            return self.dropout2(self.ff(h, training=training), training=training)

        if self.norm_first:
            x = x + sa(self.norm1(x))
            return x + ff(self.norm2(x))
        x = self.norm1(x + sa(x))
        return self.norm2(x + ff(x))


class Seq2SeqDecoderLayer(keras.layers.Layer):
    """Causal self-attention, cross-attention to the memory, a ReLU MLP."""

    def __init__(
        self,
        d_model,
        num_heads,
        dim_feedforward,
        *,
        dropout=0.0,
        norm_first=False,
        layer_norm_eps=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype")
        self.norm_first = norm_first
        head_dim = d_model // num_heads
        self.self_attn = MultiHeadAttention(num_heads, head_dim, dtype=dtype)
        self.cross_attn = MultiHeadAttention(num_heads, head_dim, dtype=dtype)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, dtype=dtype)
        self.norms = [
            keras.layers.LayerNormalization(epsilon=layer_norm_eps, dtype=dtype)
            for _ in range(3)
        ]
        self.dropouts = [keras.layers.Dropout(dropout, dtype=dtype) for _ in range(3)]

    def call(
        self,
        x,
        memory,
        src_mask=None,
        tgt_mask=None,
        cache=None,
        memory_kv=None,
        return_weights=False,
        training=None,
    ):
        """``x (B, L, E)``, ``memory (B, S, E)`` -> ``(B, L, E)`` (and the weights)."""
        memory_mask, self_mask = _key_mask(src_mask), _key_mask(tgt_mask)
        norm1, norm2, norm3 = self.norms
        drop1, drop2, drop3 = self.dropouts
        weights = None

        def sa(h):
            out = self.self_attn(
                h, h, attention_mask=self_mask, use_causal_mask=True, cache=cache
            )
            return drop1(out, training=training)

        def ca(h):
            nonlocal weights
            if memory_kv is not None:
                out = _attend_precomputed(self.cross_attn, h, *memory_kv, memory_mask)
            elif return_weights:
                out, weights = self.cross_attn(
                    h, memory, attention_mask=memory_mask, return_attention_scores=True
                )
            else:
                out = self.cross_attn(h, memory, attention_mask=memory_mask)
            return drop2(out, training=training)

        def ff(h):
            return drop3(self.ff(h, training=training), training=training)

        if self.norm_first:
            x = x + sa(norm1(x))
            x = x + ca(norm2(x))
            x = x + ff(norm3(x))
        else:
            x = norm1(x + sa(x))
            x = norm2(x + ca(x))
            x = norm3(x + ff(x))
        return (x, weights) if return_weights else x


class Seq2SeqTransformer(keras.Model):
    r"""The encoder-decoder transformer of Vaswani et al. (2017), batch-first, Keras 3.

    Arguments and semantics as :class:`companion.torch.seq2seq.Seq2SeqTransformer`:
    ``share_embeddings`` ``"none"`` (three ``V x E`` matrices), ``"decoder-output"``
    (:class:`companion.tensorflow.sharing.TiedOutput` reads the target embedding) or
    ``"all"`` (one embedding layer for source and target, and the output reads it); the
    output layer has no bias; ``final_norm`` defaults to ``norm_first``. ``dtype`` (e.g.
    ``"float64"``) is passed to every layer. Call ``model(src, tgt)`` -> logits ``(B, L,
    V_tgt)``.
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
        dtype=None,
        **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
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
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} must be a multiple of num_heads={num_heads}"
            )
        if pad_id is not None:  # the padding token of both vocabularies
            pad_id = _checks.check_token_id(
                "pad_id", pad_id, min(src_vocab_size, tgt_vocab_size)
            )
        self.d_model, self.num_heads = d_model, num_heads
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.share_embeddings, self.pad_id, self.norm_first = (
            share_embeddings,
            pad_id,
            norm_first,
        )
        final_norm = norm_first if final_norm is None else final_norm
        init = keras.initializers.RandomNormal(stddev=d_model**-0.5)
        self.src_embedding = keras.layers.Embedding(
            src_vocab_size, d_model, embeddings_initializer=init, dtype=dtype
        )
        if share_embeddings == "all":
            self.tgt_embedding = self.src_embedding
        else:
            self.tgt_embedding = keras.layers.Embedding(
                tgt_vocab_size, d_model, embeddings_initializer=init, dtype=dtype
            )
        if share_embeddings == "none":
            self.output_layer = keras.layers.Dense(
                tgt_vocab_size, use_bias=False, dtype=dtype
            )
        else:
            self.output_layer = TiedOutput(self.tgt_embedding, dtype=dtype)
        layer = {
            "dropout": dropout,
            "norm_first": norm_first,
            "layer_norm_eps": layer_norm_eps,
            "dtype": dtype,
        }
        self.encoder_layers = [
            Seq2SeqEncoderLayer(d_model, num_heads, dim_feedforward, **layer)
            for _ in range(num_encoder_layers)
        ]
        self.decoder_layers = [
            Seq2SeqDecoderLayer(d_model, num_heads, dim_feedforward, **layer)
            for _ in range(num_decoder_layers)
        ]
        norm = {"epsilon": layer_norm_eps, "dtype": dtype}
        self.encoder_norm = (
            keras.layers.LayerNormalization(**norm) if final_norm else None
        )
        self.decoder_norm = (
            keras.layers.LayerNormalization(**norm) if final_norm else None
        )
        self.embed_dropout = keras.layers.Dropout(dropout, dtype=dtype)

    # ----- pieces --------------------------------------------------------------------

    def embed(self, embedding, ids, offset: int = 0, training=None):
        """``ids (B, T)`` -> ``E[ids] sqrt(E) + PE[offset : offset + T]`` (B, T, E)."""
        ids = tf.convert_to_tensor(ids)
        T = ids.shape[1]
        x = embedding(ids) * math.sqrt(self.d_model)  # (B, T, E)
        table = sinusoidal_positions(offset + T, self.d_model, dtype=tf.float64)
        x = x + tf.cast(table[offset:], x.dtype)
        return self.embed_dropout(x, training=training)

    def source_mask(self, src, src_mask=None):
        """``(B, S)`` bool, True = token: ``src_mask``, else ``src != pad_id``."""
        if src_mask is not None:
            src_mask = tf.convert_to_tensor(src_mask)
            if src_mask.dtype != tf.bool or src_mask.shape != src.shape:
                raise ValueError(
                    f"src_mask must be boolean of shape {tuple(src.shape)} (True = "
                    f"token), got {src_mask.dtype.name} {tuple(src_mask.shape)}"
                )
            return src_mask
        return None if self.pad_id is None else tf.not_equal(src, self.pad_id)

    def encode(self, src, src_mask=None, training=None):
        """``src (B, S)`` token ids -> the memory ``(B, S, E)``."""
        src = _ids("src", src, self.src_vocab_size)
        src_mask = self.source_mask(src, src_mask)
        x = self.embed(self.src_embedding, src, training=training)
        for layer in self.encoder_layers:
            x = layer(x, src_mask=src_mask, training=training)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(
        self,
        tgt,
        memory,
        *,
        src_mask=None,
        tgt_mask=None,
        caches=None,
        memory_kv=None,
        return_weights=False,
        training=None,
    ):
        """``tgt (B, L)``, ``memory (B, S, E)`` -> logits ``(B, L, V_tgt)``.

        As :meth:`companion.torch.seq2seq.Seq2SeqTransformer.decode`: ``caches`` one
        :class:`~companion.tensorflow.multihead.KVCache` per decoder layer,
        ``memory_kv`` per layer the memory's ``(key, value)``, ``return_weights`` adds
        the cross-attention weights.
        """
        tgt = _ids("tgt", tgt, self.tgt_vocab_size)
        if memory is not None:
            _check_batches("tgt", tgt, "memory", memory)
        offset = 0 if caches is None else caches[0].seen
        x = self.embed(self.tgt_embedding, tgt, offset, training=training)
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
                training=training,
            )
            if return_weights:
                x, weights = out
                all_weights.append(weights)
            else:
                x = out
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = self.output_layer(x)  # (B, L, V_tgt)
        return (logits, all_weights) if return_weights else logits

    def call(self, src, tgt, src_mask=None, tgt_mask=None, training=None):
        """``src (B, S)``, ``tgt (B, L)`` -> ``(B, L, V_tgt)`` logits."""
        src = _ids("src", src, self.src_vocab_size)
        tgt = _ids("tgt", tgt, self.tgt_vocab_size)
        _check_batches("src", src, "tgt", tgt)
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask, training=training)
        if tgt_mask is None and self.pad_id is not None:
            tgt_mask = tf.not_equal(tgt, self.pad_id)
        return self.decode(
            tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask, training=training
        )

    def cross_attention_weights(self, src, tgt, *, src_mask=None):
        """Cross-attention weights ``(B, H, L, S)`` of each decoder layer (a list)."""
        src = _ids("src", src, self.src_vocab_size)
        tgt = _ids("tgt", tgt, self.tgt_vocab_size)
        _check_batches("src", src, "tgt", tgt)
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask)
        tgt_mask = None if self.pad_id is None else tf.not_equal(tgt, self.pad_id)
        _, weights = self.decode(
            tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask, return_weights=True
        )
        return weights

    def memory_keys_values(self, memory) -> list:
        """Per decoder layer, the cross-attention ``(key, value)`` ``(B, H, S, D)``."""
        return [
            cross_attention_kv(layer.cross_attn, memory)
            for layer in self.decoder_layers
        ]

    # ----- loading the torch model ---------------------------------------------------

    def load_from_torch(self, model) -> "Seq2SeqTransformer":
        """Copy the weights of the torch model (in place).

        ``model`` is a :class:`companion.torch.seq2seq.Seq2SeqTransformer`.

        The sizes and ``share_embeddings`` must agree. Returns ``self``.
        """
        if model.share_embeddings != self.share_embeddings:
            raise ValueError(
                f"share_embeddings differ: torch {model.share_embeddings!r}, "
                f"keras {self.share_embeddings!r}"
            )
        if len(model.encoder_layers) != len(self.encoder_layers) or len(
            model.decoder_layers
        ) != len(self.decoder_layers):
            raise ValueError("the two models have different numbers of layers")
        if (model.encoder_norm is None) != (self.encoder_norm is None):
            raise ValueError("final_norm differs between the two models")
        one = tf.ones((1, 1), dtype=tf.int64)
        self(one, one)  # build every weight

        def array(t):
            return t.detach().cpu().numpy()

        def dense(ours, theirs):  # nn.Linear (out, in) -> Dense kernel (in, out)
            ours.kernel.assign(array(theirs.weight).T)
            ours.bias.assign(array(theirs.bias))

        def norm(ours, theirs):
            ours.gamma.assign(array(theirs.weight))
            ours.beta.assign(array(theirs.bias))

        for ours, theirs in zip(self.encoder_layers, model.encoder_layers):
            ours.self_attn.set_params(theirs.self_attn.to_params())
            dense(ours.ff.linear1, theirs.ff.linear1)
            dense(ours.ff.linear2, theirs.ff.linear2)
            norm(ours.norm1, theirs.norm1)
            norm(ours.norm2, theirs.norm2)
        for ours, theirs in zip(self.decoder_layers, model.decoder_layers):
            ours.self_attn.set_params(theirs.self_attn.to_params())
            ours.cross_attn.set_params(theirs.cross_attn.to_params())
            dense(ours.ff.linear1, theirs.ff.linear1)
            dense(ours.ff.linear2, theirs.ff.linear2)
            for ours_norm, i in zip(ours.norms, (1, 2, 3)):
                norm(ours_norm, getattr(theirs, f"norm{i}"))
        if self.encoder_norm is not None:
            norm(self.encoder_norm, model.encoder_norm)
            norm(self.decoder_norm, model.decoder_norm)
        self.src_embedding.embeddings.assign(array(model.src_embedding.weight))
        self.tgt_embedding.embeddings.assign(array(model.tgt_embedding.weight))
        if self.share_embeddings == "none":
            self.output_layer.kernel.assign(array(model.output.weight).T)
        return self

    # ----- decoding ------------------------------------------------------------------

    def greedy_decode(
        self,
        src,
        *,
        bos_id: int,
        eos_id: int,
        max_length: int,
        src_mask=None,
        use_cache=True,
    ):
        """The most likely next token at each step: ``(tokens (B, T), scores (B,))``.

        As :meth:`companion.torch.seq2seq.Seq2SeqTransformer.greedy_decode`.
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
        """The best of ``beam_size`` hypotheses: ``(tokens (B, T), scores (B,))``.

        As :meth:`companion.torch.seq2seq.Seq2SeqTransformer.beam_search`: summed
        log-probabilities, finished beams padded at no cost, the encoder's keys and
        values computed once, a :class:`~companion.tensorflow.multihead.KVCache` per
        decoder layer reordered with the beams.
        """
        _checks.check_int("beam_size", beam_size)
        _checks.check_int("max_length", max_length)
        if beam_size < 1 or max_length < 1:
            raise ValueError(
                f"beam_size and max_length must be >= 1, got {beam_size}, {max_length}"
            )
        bos_id = _checks.check_token_id("bos_id", bos_id, self.tgt_vocab_size)
        eos_id = _checks.check_token_id("eos_id", eos_id, self.tgt_vocab_size)
        K = beam_size
        fill = eos_id if self.pad_id is None else self.pad_id
        src = _ids("src", src, self.src_vocab_size)
        src_mask = self.source_mask(src, src_mask)
        memory = self.encode(src, src_mask)  # (B, S, E)
        B = memory.shape[0]
        if not all(layer.cross_attn.built for layer in self.decoder_layers):
            # Keras creates the weights on the first call; memory_keys_values reads
            # them, so a model never called runs the decoder once on the first token
            first = tf.fill((B, 1), tf.constant(bos_id, tf.int64))
            self.decode(first, memory, src_mask=src_mask)

        def repeat(t):
            return tf.repeat(t, K, axis=0)

        if use_cache:
            memory_kv = [
                (repeat(k), repeat(v)) for k, v in self.memory_keys_values(memory)
            ]
            caches = [KVCache() for _ in self.decoder_layers]
        memory = repeat(memory)  # (B K, S, E)
        beam_mask = None if src_mask is None else repeat(src_mask)
        tokens = tf.fill((B * K, 1), tf.constant(bos_id, tf.int64))
        first = tf.concat([tf.zeros((B, 1)), tf.fill((B, K - 1), -math.inf)], axis=1)
        scores = tf.cast(first, memory.dtype)  # (B, K): one live beam at the start
        finished = tf.zeros((B * K,), dtype=tf.bool)
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
            log_probs = tf.nn.log_softmax(logits[:, -1], axis=-1)  # (B K, V)
            V = log_probs.shape[-1]
            done = tf.where(
                tf.range(V) == fill, tf.zeros((), log_probs.dtype), -math.inf
            )  # (V,): a finished beam continues with the fill token at no cost
            log_probs = tf.where(finished[:, None], done[None, :], log_probs)
            candidates = scores[:, :, None] + tf.reshape(log_probs, (B, K, V))
            scores, flat = tf.math.top_k(tf.reshape(candidates, (B, K * V)), k=K)
            flat = tf.cast(flat, tf.int64)
            beam, token = flat // V, flat % V
            rows = tf.reshape(beam + tf.range(B, dtype=tf.int64)[:, None] * K, (-1,))
            tokens = tf.concat([tf.gather(tokens, rows), tf.reshape(token, (-1, 1))], 1)
            finished = tf.logical_or(
                tf.gather(finished, rows), tf.equal(tf.reshape(token, (-1,)), eos_id)
            )
            if use_cache:
                caches = [_reorder(cache, rows) for cache in caches]
            if bool(tf.reduce_all(finished)):
                break
        best = tf.reshape(tokens, (B, K, -1))[:, 0]  # top_k sorts: beam 0 is the best
        return best, scores[:, 0]


def _reorder(cache: KVCache, rows) -> KVCache:
    """A cache holding ``cache``'s batch rows ``rows``: beams follow their parents."""
    if bool(tf.reduce_all(rows == tf.range(rows.shape[0], dtype=rows.dtype))):
        return cache
    moved = KVCache()
    moved.append(tf.gather(cache.key, rows), tf.gather(cache.value, rows))
    return moved


def _ids(name: str, ids, vocab_size: int | None = None):
    """Token ids ``(B, length)``, ``B, length >= 1``, in ``[0, vocab_size)``.

    Eagerly a ``ValueError`` naming ``name``; inside a ``tf.function`` the range is
    checked by ``tf.debugging`` assertions (``InvalidArgumentError`` when run).
    """
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise TypeError(
            f"{name} must hold integer token ids, got dtype {ids.dtype.name}"
        )
    if ids.shape.rank != 2 or 0 in ids.shape:
        raise ValueError(
            f"{name} must have shape (B, length) with B >= 1 and length >= 1, got "
            f"{tuple(ids.shape)}"
        )
    if vocab_size is None:
        return ids
    message = f"{name} holds token ids outside the vocabulary [0, {vocab_size})"
    if tf.executing_eagerly():
        low, high = int(tf.reduce_min(ids)), int(tf.reduce_max(ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{message}: min {low}, max {high}")
        return ids
    checks = [
        tf.debugging.assert_non_negative(ids, message=message),
        tf.debugging.assert_less(ids, tf.cast(vocab_size, ids.dtype), message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def _check_batches(first: str, a, second: str, b) -> None:
    """One batch size for ``a`` and ``b`` (no broadcasting of a batch of 1)."""
    if a.shape[0] is not None and b.shape[0] is not None and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{first} and {second} must have the same batch size, got {first} "
            f"{tuple(a.shape)} and {second} {tuple(b.shape)}"
        )
