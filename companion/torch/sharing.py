r"""Parameter sharing in PyTorch: tied embeddings, weight decay for shared tensors, ALBERT layers.

Sharing is done by sharing the *object*: two uses of one ``nn.Parameter``. PyTorch then
does the bookkeeping by itself: ``model.parameters()`` yields the tensor once, autograd
adds the gradients of both uses into its one ``.grad``, and the optimizer updates it
once. What can go wrong is the code around it: counting a tensor twice, putting it into
two optimizer groups, or copying it (``.clone()``, ``load_state_dict`` into an untied
model) so that the two uses silently drift apart.

* Weight tying (Press & Wolf 2017; GPT-2, nanoGPT): the output layer that maps a hidden
  state to vocabulary logits reuses the token-embedding matrix ``W_E (V, E)``:
  ``logits = h W_E^T``. :class:`TiedLMHead`, :class:`TiedEmbedding`, :func:`tie_weights`.
* Optimizer groups: :func:`param_groups_for_weight_decay` puts each tensor in exactly one
  group and keeps biases, norms and embeddings out of weight decay.
* Cross-layer sharing (ALBERT, Lan et al. 2020): one encoder layer applied ``num_layers``
  times, plus a factorised embedding; :class:`TransformerEncoder`.

Explained in the book chapters *Parameter sharing in code* and *Applications: language*.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TiedLMHead", "TiedEmbedding", "tie_weights", "shared_parameter_names",
           "param_groups_for_weight_decay"]


# --- weight tying: embedding and output layer share one matrix ------------------------------

class TiedLMHead(nn.Module):
    r"""An output layer whose weight *is* an embedding's weight: ``logits = h W_E^T (+ b)``.

    ``W_E (V, E)`` is the embedding's ``nn.Parameter`` itself, not a copy:
    ``head.weight is embedding.weight``. The gradient of a loss that uses both the
    embedding lookup and these logits is the sum of both uses' gradients, accumulated in
    the one tensor. A bias ``(V,)``, if asked for, is the head's own parameter.

    Parameters
    ----------
    embedding:
        An ``nn.Embedding`` (or any module with a ``weight`` parameter of shape ``(V, E)``).
    bias:
        Whether to add a learned per-token bias ``(V,)`` (GPT-2 has none).
    """

    def __init__(self, embedding: nn.Module, *, bias: bool = False):
        super().__init__()
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
            raise TypeError(f"embedding must have a 2-D nn.Parameter `weight` (V, E), got "
                            f"{type(embedding).__name__} with weight {type(weight).__name__}")
        self.weight = weight  # the same nn.Parameter object: registered here and in the embedding
        vocab_size = weight.shape[0]
        self.bias = nn.Parameter(torch.zeros(vocab_size, dtype=weight.dtype, device=weight.device)) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., E)`` -> ``logits (..., V)``."""
        if hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"hidden must have last axis E={self.weight.shape[1]} (embedding "
                             f"{tuple(self.weight.shape)}), got shape {tuple(hidden.shape)}")
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

    def __init__(self, vocab_size: int, embedding_dim: int, *, output_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, device=device, dtype=dtype)
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
    """Make ``output_layer.weight`` the embedding's own parameter (nanoGPT's tying line), in place.

    ``output_layer`` is an ``nn.Linear(E, V)``, whose weight has the embedding's shape
    ``(V, E)``; its old weight is dropped. Returns ``output_layer``. Raises
    ``ValueError`` if the shapes differ.
    """
    w_out, w_emb = getattr(output_layer, "weight", None), getattr(embedding, "weight", None)
    if not isinstance(w_emb, nn.Parameter) or not isinstance(w_out, torch.Tensor):
        raise TypeError("output_layer and embedding must both have a `weight`, the embedding's an nn.Parameter")
    if tuple(w_out.shape) != tuple(w_emb.shape):
        raise ValueError(f"output_layer.weight {tuple(w_out.shape)} must have the embedding's shape "
                         f"{tuple(w_emb.shape)} (V, E) to be tied")
    output_layer.weight = w_emb  # one nn.Parameter, two modules
    return output_layer


def shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """Names under which one tensor appears more than once, e.g. ``[["emb.weight", "head.weight"]]``.

    ``model.named_parameters()`` lists each tensor once by default; this looks at every
    registration (``remove_duplicate=False``) and groups the names by tensor identity.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


# --- optimizer groups: each tensor once; no decay for biases, norms, embeddings ------------

_NORM_TYPES = tuple(t for t in (
    nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
) if t is not None)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    r"""Two optimizer parameter groups: matrices with ``weight_decay``, the rest with ``0.0``.

    ``torch.optim.AdamW(param_groups_for_weight_decay(model, 0.1), lr=...)``.

    Decayed: weights of linear/convolution/attention projections (tensors of 2 or more
    dimensions). Not decayed, as in GPT-2's training code, minGPT and nanoGPT:

    * **biases** and other 1-D tensors: a bias shifts, it does not scale an input, so
      shrinking it does not make the function smoother; it just biases the fit.
    * **norm gains and shifts** (LayerNorm, RMSNorm, BatchNorm, ...): decaying the gain
      pulls it towards 0, which changes the scale of the normalised activations the next
      layer expects instead of regularising anything.
    * **embeddings** (``nn.Embedding`` weights, and therefore a tied output layer): AdamW's
      decay is applied to every row at every step, but a row gets gradient only when its
      token occurs, so rare tokens' embeddings would shrink towards 0 between their uses.

    A shared tensor (tied embedding, ALBERT's repeated layer) is placed exactly once:
    listing it in two groups makes ``torch.optim`` raise ("some parameters appear in more
    than one parameter group"), twice in one group makes it warn that this will become an
    error (and a hand-written update loop would step it twice). If any of its uses
    says "no decay" (an embedding also used as an output layer), it is not decayed.

    Parameters
    ----------
    model:
        The module whose parameters to group; only ``requires_grad`` parameters are kept.
    weight_decay:
        The decay of the first group, ``>= 0``.

    Returns
    -------
    ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``,
    parameters in the order ``model.parameters()`` yields them.
    """
    weight_decay = float(weight_decay)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    order: dict[int, nn.Parameter] = {}  # id -> tensor, first-seen order, each tensor once
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            order.setdefault(id(p), p)
            if (p.ndim < 2 or name.endswith("bias") or isinstance(module, _NORM_TYPES)
                    or isinstance(module, _EMBEDDING_TYPES)):
                no_decay.add(id(p))
    kept = [(key, p) for key, p in order.items() if p.requires_grad]
    return [
        {"params": [p for key, p in kept if key not in no_decay], "weight_decay": weight_decay},
        {"params": [p for key, p in kept if key in no_decay], "weight_decay": 0.0},
    ]
