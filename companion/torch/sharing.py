r"""Parameter sharing in PyTorch: tied embeddings, weight decay for shared tensors,
ALBERT layers.

Sharing is done by sharing the *object*: two uses of one ``nn.Parameter``. PyTorch then
does the bookkeeping by itself: ``model.parameters()`` yields the tensor once, autograd
adds the gradients of both uses into its one ``.grad``, and the optimizer updates it
once. What can go wrong is the code around it: counting a tensor twice, putting it into
two optimizer groups, or copying it (``.clone()``, ``load_state_dict`` into an untied
model) so that the two uses silently drift apart.

* Weight tying (Press & Wolf 2017; GPT-2, nanoGPT): the output layer that maps a hidden
  state to vocabulary logits reuses the token-embedding matrix ``W_E (V, E)``:
  ``logits = h W_E^T``. :class:`TiedLMHead`, :class:`TiedEmbedding`,
  :func:`tie_weights`.
* Optimizer groups: :func:`param_groups_for_weight_decay` puts each tensor in exactly
  one group and keeps biases, norms and embeddings out of weight decay.
* Cross-layer sharing (ALBERT, Lan et al. 2020): one encoder layer applied
  ``num_layers`` times, plus a factorised embedding; :class:`TransformerEncoder`.

Explained in the book chapters *Parameter sharing in code* and *Applications: language*.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from companion import _checks
from companion.torch.multihead import MultiHeadAttention

__all__ = [
    "TiedLMHead",
    "TiedEmbedding",
    "tie_weights",
    "shared_parameter_names",
    "param_groups_for_weight_decay",
    "EncoderLayer",
    "TransformerEncoder",
]


# --- weight tying: embedding and output layer share one matrix ------------------------


class TiedLMHead(nn.Module):
    r"""An output layer whose weight *is* an embedding's weight: ``logits = h W_E^T (+
    b)``.

    ``W_E (V, E)`` is the embedding's ``nn.Parameter`` itself, not a copy:
    ``head.weight is embedding.weight``. The gradient of a loss that uses both the
    embedding lookup and these logits is the sum of both uses' gradients, accumulated in
    the one tensor. A bias ``(V,)``, if asked for, is the head's own parameter.

    Parameters
    ----------
    embedding:
        An ``nn.Embedding`` (or any module with a ``weight`` parameter of shape
        ``(V, E)``).
    bias:
        Whether to add a learned per-token bias ``(V,)`` (GPT-2 has none).
    """

    def __init__(self, embedding: nn.Module, *, bias: bool = False):
        super().__init__()
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
            raise TypeError(
                f"embedding must have a 2-D nn.Parameter `weight` (V, E), got "
                f"{type(embedding).__name__} with weight {type(weight).__name__}"
            )
        # the same nn.Parameter object: registered here and in the embedding
        self.weight = weight
        vocab_size = weight.shape[0]
        self.bias = (
            nn.Parameter(
                torch.zeros(vocab_size, dtype=weight.dtype, device=weight.device)
            )
            if bias
            else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., E)`` -> ``logits (..., V)``."""
        if hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"hidden must have last axis E={self.weight.shape[1]} (embedding "
                f"{tuple(self.weight.shape)}), got shape {tuple(hidden.shape)}"
            )
        return F.linear(hidden, self.weight, self.bias)  # (..., V): h W_E^T + b


class TiedEmbedding(nn.Module):
    r"""A token embedding and the output layer that shares its matrix, in one module.

    ``forward(ids)`` looks tokens up, ``ids (...)`` -> ``(..., E)``: row ``W_E[i]``;
    ``logits(hidden)`` maps ``(..., E)`` -> ``(..., V)``: ``h W_E^T``. Both read
    ``self.weight`` (one ``nn.Parameter`` of shape ``(V, E)``), so tying costs ``V * E``
    parameters once instead of twice.

    Parameters
    ----------
    vocab_size, embedding_dim:
        ``V`` and ``E``.
    output_bias:
        Whether the output layer adds its own bias ``(V,)``.
    device, dtype:
        Passed to the parameters' constructors.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        *,
        output_bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.embedding = nn.Embedding(
            vocab_size, embedding_dim, device=device, dtype=dtype
        )
        self.head = TiedLMHead(self.embedding, bias=output_bias)

    @property
    def weight(self) -> nn.Parameter:
        """The shared matrix ``W_E (V, E)``."""
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (...)`` (integers) -> embeddings ``(..., E)``."""
        return self.embedding(ids)  # (..., E): W_E[ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., E)`` -> ``logits (..., V)`` with the same matrix."""
        return self.head(hidden)  # (..., V): h W_E^T


def tie_weights(output_layer: nn.Module, embedding: nn.Module) -> nn.Module:
    """Make ``output_layer.weight`` the embedding's own parameter (nanoGPT's tying
    line), in place.

    ``output_layer`` is an ``nn.Linear(E, V)``, whose weight has the embedding's shape
    ``(V, E)``; its old weight is dropped. Returns ``output_layer``. Raises
    ``ValueError`` if the shapes differ.
    """
    w_out, w_emb = (
        getattr(output_layer, "weight", None),
        getattr(embedding, "weight", None),
    )
    if not isinstance(w_emb, nn.Parameter) or not isinstance(w_out, torch.Tensor):
        raise TypeError(
            "output_layer and embedding must both have a `weight`, the embedding's an "
            "nn.Parameter"
        )
    if tuple(w_out.shape) != tuple(w_emb.shape):
        raise ValueError(
            f"output_layer.weight {tuple(w_out.shape)} must have the embedding's shape "
            f"{tuple(w_emb.shape)} (V, E) to be tied"
        )
    output_layer.weight = w_emb  # one nn.Parameter, two modules
    return output_layer


def shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """Names under which one tensor appears more than once, e.g. ``[["emb.weight",
    "head.weight"]]``.

    ``model.named_parameters()`` lists each tensor once by default; this looks at every
    registration (``remove_duplicate=False``) and groups the names by tensor identity.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


# --- optimizer groups: each tensor once; no decay for biases, norms, embeddings -------

_NORM_TYPES = tuple(
    t
    for t in (
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
        # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
        nn.modules.batchnorm._NormBase,
    )
    if t is not None
)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    r"""Two optimizer parameter groups: matrices with ``weight_decay``, the rest with
    ``0.0``.

    ``torch.optim.AdamW(param_groups_for_weight_decay(model, 0.1), lr=...)``.

    Decayed: weights of linear/convolution/attention projections (tensors of 2 or more
    dimensions). Not decayed, as in GPT-2's training code, minGPT and nanoGPT:

    * **biases** and other 1-D tensors: a bias shifts, it does not scale an input, so
      shrinking it does not make the function smoother; it just biases the fit.
    * **norm gains and shifts** (LayerNorm, RMSNorm, BatchNorm, ...): decaying the gain
      pulls it towards 0, which changes the scale of the normalised activations the next
      layer expects instead of regularising anything.
    * **embeddings** (``nn.Embedding`` weights, and therefore a tied output layer):
      AdamW's decay is applied to every row at every step, but a row gets gradient only
      when its token occurs, so rare tokens' embeddings would shrink towards 0 between
      their uses.

    A shared tensor (tied embedding, ALBERT's repeated layer) is placed exactly once:
    listing it in two groups makes ``torch.optim`` raise ("some parameters appear in
    more than one parameter group"), twice in one group makes it warn that this will
    become an error (and a hand-written update loop would step it twice). If any of its
    uses says "no decay" (an embedding also used as an output layer), it is not decayed.

    Parameters
    ----------
    model:
        The module whose parameters to group; only ``requires_grad`` parameters are
        kept.
    weight_decay:
        The decay of the first group, ``>= 0``.

    Returns
    -------
    ``[{"params": [...], "weight_decay": weight_decay},
    {"params": [...], "weight_decay": 0.0}]``,
    parameters in the order ``model.parameters()`` yields them.
    """
    weight_decay = float(weight_decay)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    # id -> tensor, first-seen order, each tensor once
    order: dict[int, nn.Parameter] = {}
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            order.setdefault(id(p), p)
            if (
                p.ndim < 2
                or name.endswith("bias")
                or isinstance(module, _NORM_TYPES)
                or isinstance(module, _EMBEDDING_TYPES)
            ):
                no_decay.add(id(p))
    kept = [(key, p) for key, p in order.items() if p.requires_grad]
    return [
        {
            "params": [p for key, p in kept if key not in no_decay],
            "weight_decay": weight_decay,
        },
        {"params": [p for key, p in kept if key in no_decay], "weight_decay": 0.0},
    ]


# --- cross-layer sharing: ALBERT ------------------------------------------------------


class EncoderLayer(nn.Module):
    r"""One post-norm transformer encoder layer, as in BERT and ALBERT.

    .. math::

        x' = \mathrm{LN}(x + \mathrm{MHA}(x)), \qquad
        y = \mathrm{LN}(x' + W_2\, \mathrm{GELU}(W_1 x' + b_1) + b_2)

    ``x (B, L, E)`` -> ``(B, L, E)`` with ``E = hidden_size``. Attention is
    :class:`companion.torch.multihead.MultiHeadAttention` (grouped-query with
    ``num_kv_heads``); ``mask`` follows :mod:`companion.conventions` (``True`` = attend,
    broadcastable to ``(B, H, L, L)``, e.g. ``padding_mask(lengths, L)``).
    Parameters: attention + ``2 * 2E`` (two LayerNorms) + ``E I + I + I E + E`` (the
    MLP).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.attention = MultiHeadAttention(hidden_size, num_heads, num_kv_heads)
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        # (B, L, E): LN(x + MHA(x))
        x = self.attention_norm(x + self.dropout(self.attention(x, mask=mask)))
        # (B, L, I) -> (B, L, E): W_2 GELU(W_1 x + b_1) + b_2
        mlp = self.ffn_out(F.gelu(self.ffn_in(x)))
        return self.ffn_norm(x + self.dropout(mlp))  # (B, L, E)


class TransformerEncoder(nn.Module):
    r"""An ALBERT-style encoder: factorised embeddings and (by default) one layer shared
    by all.

    Embeddings (ALBERT's factorisation): tokens ``(V, E_emb)`` plus learned positions
    ``(max_positions, E_emb)``, a LayerNorm, then a projection ``E_emb -> E_hidden``.
    With ``E_emb << E_hidden`` this costs ``V E_emb + E_emb E_hidden`` instead of
    ``V E_hidden``.

    Layers: with ``share_layers=True`` the *same* :class:`EncoderLayer` object sits at
    every one of the ``num_layers`` positions (``model.layers[i] is model.layers[0]``),
    so the encoder has the parameters of one layer, whatever its depth; its gradient is
    the sum of the gradients of all positions. ``share_layers=False`` builds
    ``num_layers`` independent layers (BERT). Compute is the same either way: sharing
    saves parameters, not FLOPs.

    ``forward(ids (B, L), mask=None)`` -> hidden states ``(B, L, E_hidden)``; ``mask``
    as in :class:`EncoderLayer`. (ALBERT's token-type embeddings and pooler are left
    out.)

    Parameters
    ----------
    vocab_size, embedding_size, hidden_size:
        ``V``, ``E_emb``, ``E_hidden``.
    num_layers, num_heads, intermediate_size:
        Depth, query heads ``H`` (dividing ``E_hidden``), MLP width ``I``.
    share_layers:
        One layer for all positions (ALBERT) or one per position.
    num_kv_heads:
        Key/value heads ``H_kv`` for grouped-query attention (default ``H``).
    max_positions:
        Longest sequence; the position table has this many rows.
    dropout:
        Dropout after the embeddings, attention and MLP (training mode only).

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
    ):
        super().__init__()
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
        self.token_embedding = nn.Embedding(vocab_size, embedding_size)
        self.position_embedding = nn.Embedding(max_positions, embedding_size)
        self.embedding_norm = nn.LayerNorm(embedding_size)
        # E_emb -> E_hidden
        self.embedding_projection = nn.Linear(embedding_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

        def new_layer() -> EncoderLayer:
            return EncoderLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                num_kv_heads=num_kv_heads,
                dropout=dropout,
            )

        if self.share_layers:
            shared = new_layer()
            # one object, num_layers positions
            self.layers = nn.ModuleList([shared] * num_layers)
        else:
            self.layers = nn.ModuleList([new_layer() for _ in range(num_layers)])

    def forward(self, ids: torch.Tensor, mask=None) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(
                "ids must be integer token ids of shape (B, L), got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        L = ids.shape[1]
        if L > self.max_positions:
            raise ValueError(
                f"ids has length L={L} but max_positions={self.max_positions}"
            )
        positions = torch.arange(L, device=ids.device)  # (L,)
        # (B, L, E_emb)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        x = self.dropout(self.embedding_norm(x))  # (B, L, E_emb)
        x = self.embedding_projection(x)  # (B, L, E_hidden)
        for layer in self.layers:  # the same object num_layers times when shared
            x = layer(x, mask=mask)  # (B, L, E_hidden)
        return x
