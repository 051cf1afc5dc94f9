r"""Vocabulary parallelism (Megatron-LM): the embedding, the tied output layer and the
cross-entropy with the vocabulary split across ranks, the logits never gathered.

Rank ``r`` of ``W`` holds rows ``r V/W .. (r+1) V/W - 1`` of the embedding matrix
``(V, E)``; the same rows are its share of the tied output layer::

    ids (B, T), the same on every rank
    e_r = embedding rows of the ids in my range, 0 for the others   (B, T, E)
    e = sum_r e_r                                  all-reduce, B T E   (forward)
    ...                                            the model, replicated
    h (B, T, E)  |  f: identity forward, all-reduce of dh backward, B T E
    z_r = h W_r^T                                  my logits (B, T, V/W), never gathered
    m = max_r max(z_r)                             all-reduce (max), B T
    s = sum_r sum exp(z_r - m)                     all-reduce, B T
    t = sum_r z_r[target] (0 off my range)         all-reduce, B T
    loss = log s + m - t                           (B, T), the same on every rank

The backward pass of the cross-entropy is local: ``softmax(z_r) - onehot_r(target)``,
from ``s`` and ``m`` saved by the forward. The tied weight's gradient on rank ``r`` is
the sum of its two uses' gradients for its own rows (the embedding rows of the ids in
its range, the output rows of its logits): no extra communication, the two uses of
the shared tensor live on the same rank.

**Communication** per rank and step (float ``b`` bytes per number), counted as
``bytes["all_reduce"]``: forward ``B T E b`` (embedding) ``+ 3 B T b`` (max, sum,
target logit); backward ``B T E b`` (``f``). Gathering the logits instead would move
``(W-1)/W B T V b`` per rank and hold ``B T V`` logits; here each rank holds
``B T V / W``. :func:`vocab_parallel_bytes` gives the formula.

A vocabulary that does not split into ``W`` equal parts is a ``ValueError``: pad it
(Megatron's ``make_vocab_size_divisible_by``) to :func:`padded_vocab_size` rows, the
extra rows never used as ids or targets.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from companion import _checks
from companion.torch.distributed.comm import _record, all_reduce, nbytes
from companion.torch.distributed.tensor_parallel import (
    _CopyToParallel,
    _ReduceFromParallel,
)

__all__ = [
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "vocab_range",
    "padded_vocab_size",
    "vocab_parallel_bytes",
]


def padded_vocab_size(vocab_size: int, world_size: int) -> int:
    """The least multiple of ``world_size`` that is at least ``vocab_size``."""
    V = _checks.check_int("vocab_size", vocab_size)
    W = _checks.check_int("world_size", world_size)
    return -(-V // W) * W


def vocab_range(vocab_size: int, rank: int, world_size: int) -> range:
    """The token ids whose rows ``rank`` holds; ``ValueError`` unless ``W`` divides
    ``V``."""
    V = _checks.check_int("vocab_size", vocab_size)
    W = _checks.check_int("world_size", world_size)
    rank = _checks.check_int("rank", rank, minimum=0)
    if rank >= W:
        raise ValueError(f"rank must be < world_size={W}, got {rank}")
    if V % W:
        raise ValueError(
            f"vocab_size={V} does not split over world_size={W} ranks; pad the "
            f"vocabulary to padded_vocab_size(V, W)={padded_vocab_size(V, W)} rows "
            f"(ids and targets never use the extra rows)"
        )
    part = V // W
    return range(rank * part, (rank + 1) * part)


def vocab_parallel_bytes(batch_tokens: int, embed_dim: int, itemsize: int = 8):
    """``(forward, backward)`` bytes one rank all-reduces in a step."""
    n = _checks.check_int("batch_tokens", batch_tokens)
    E = _checks.check_int("embed_dim", embed_dim)
    return n * E * itemsize + 3 * n * itemsize, n * E * itemsize


def _all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    _record("all_reduce", nbytes(x))
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's cross-entropy over split logits; the backward is local."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        # logits (..., V/W) my columns; targets (...) global ids
        m = _all_reduce_max(logits.detach().amax(dim=-1).clone(), group)  # (...)
        shifted = logits - m.unsqueeze(-1)  # (..., V/W)
        part = logits.shape[-1]
        mine = (targets >= start) & (targets < start + part)  # (...)
        local = torch.where(mine, targets - start, torch.zeros_like(targets))
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target_logit = all_reduce(target_logit * mine, group=group)  # (...)
        exp = shifted.exp()  # (..., V/W)
        total = all_reduce(exp.sum(dim=-1), group=group)  # (...)
        ctx.save_for_backward(exp / total.unsqueeze(-1), mine, local)
        return total.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, local = ctx.saved_tensors
        onehot = torch.nn.functional.one_hot(local, softmax.shape[-1])
        grad_logits = softmax - onehot.to(softmax.dtype) * mine.unsqueeze(-1)
        return grad_logits * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, targets, *, vocab_start=None, group=None):
    """Per-token cross-entropy ``(...)`` from this rank's logits ``(..., V/W)``.

    ``targets`` ``(...)`` are global ids, the same on every rank; ``vocab_start``, the
    first id of this rank's columns (default ``rank * V/W``). Every rank returns the
    same losses; the logits are never gathered.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensors")
    _checks.check_float("logits", logits.dtype)
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must hold integer ids, got {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits (..., V/W) and targets (...) disagree: {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * logits.shape[-1]
    V = dist.get_world_size(group) * logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(
            f"targets must lie in [0, {V}), got {int(targets.min())}.."
            f"{int(targets.max())}"
        )
    return _VocabParallelCrossEntropy.apply(
        logits, targets.long(), int(vocab_start), group
    )


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of an ``nn.Embedding``: the embedding and the tied output.

    ``forward(ids)`` is the full embedding ``(..., E)`` on every rank (one all-reduce);
    :meth:`logits` is this rank's columns ``(..., V/W)`` of the tied output layer
    ``h W^T``; :meth:`loss` their cross-entropy. ``weight`` holds rows
    ``self.vocab`` of the embedding's weight (a copy).
    """

    def __init__(self, embedding: nn.Embedding, *, group=None):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"embedding must be an nn.Embedding, got {type(embedding).__name__}"
            )
        self.group = group
        V = embedding.num_embeddings
        rank, W = dist.get_rank(group), dist.get_world_size(group)
        self.vocab = vocab_range(V, rank, W)
        self.vocab_size = V
        rows = slice(self.vocab.start, self.vocab.stop)
        self.weight = nn.Parameter(embedding.weight.detach()[rows].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must hold integer ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got "
                f"{int(ids.min())}..{int(ids.max())}"
            )
        start = self.vocab.start
        mine = (ids >= start) & (ids < self.vocab.stop)
        local = torch.where(mine, ids - start, torch.zeros_like(ids))
        rows = nn.functional.embedding(local, self.weight)  # (..., E)
        rows = rows * mine.unsqueeze(-1).to(rows.dtype)  # 0 for other ranks' ids
        return _ReduceFromParallel.apply(rows, self.group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits ``(..., V/W)`` of ``hidden (..., E)``, the weight tied."""
        hidden = _CopyToParallel.apply(hidden, self.group)
        return nn.functional.linear(hidden, self.weight)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy ``(...)`` of the tied output layer."""
        return vocab_parallel_cross_entropy(
            self.logits(hidden),
            targets,
            vocab_start=self.vocab.start,
            group=self.group,
        )
