r"""Tensor-parallel multi-head attention (Megatron-LM): the heads split over the ranks.

Shoeybi et al. (2019) split a transformer layer so that each of ``W`` ranks computes a
share of the heads with no communication inside the attention itself::

    x (B, L, E), the same on every rank
    |  f: identity forward, all-reduce of dx backward
    q_r, k_r, v_r = x W_q[heads_r], x W_k[kv_r], x W_v[kv_r]     column-parallel
    o_r = attention(q_r, k_r, v_r)                              (B, H/W, L, D)
    y_r = merge(o_r) W_o[rows of heads_r]              row-parallel, (B, L, E)
    |  g: all-reduce forward (y = sum_r y_r), identity backward
    y = y + b_o

One all-reduce of ``B L E`` elements forward and one backward per layer (one per input
tensor for cross-attention). Grouped-query heads move with their key/value head: rank
``r`` takes query heads ``r H/W ... (r+1) H/W - 1`` and the key/value heads they read.
When ``W`` divides ``H_kv`` these are ``H_kv / W`` heads of its own; when ``H_kv``
divides ``W`` (fewer key/value heads than ranks, multi-query attention at the extreme)
each key/value head is *replicated* on ``W / H_kv`` ranks, and the gradients of its
projection are summed over those replicas (an all-reduce per weight, in backward).

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from companion import _checks
from companion.torch.attention import scaled_dot_product_attention_reference
from companion.torch.distributed.comm import all_reduce
from companion.torch.multihead import MultiHeadAttention

__all__ = ["TensorParallelMultiHeadAttention", "head_split"]


class _CopyToParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward; backward sums the ranks' input gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), group=ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's ``g``: forward sums the ranks' partial outputs; identity backward."""

    @staticmethod
    def forward(ctx, partial, group):
        return all_reduce(partial.contiguous().clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def head_split(num_heads: int, num_kv_heads: int, rank: int, world_size: int):
    """``(query heads, key/value heads)`` of ``rank``, as ranges.

    ``world_size`` must divide ``num_heads``, and divide or be a multiple of
    ``num_kv_heads`` (in the second case key/value heads are replicated);
    ``num_kv_heads`` divides ``num_heads``; ``0 <= rank < world_size``.
    """
    num_heads = _checks.check_int("num_heads", num_heads)
    num_kv_heads = _checks.check_int("num_kv_heads", num_kv_heads)
    world_size = _checks.check_int("world_size", world_size)
    rank = _checks.check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
            "(grouped-query heads)"
        )
    if num_heads % world_size:
        raise ValueError(
            f"tensor parallelism needs world_size={world_size} to divide "
            f"num_heads={num_heads}"
        )
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ValueError(
            f"world_size={world_size} must divide num_kv_heads={num_kv_heads} or be a "
            f"multiple of it (key/value heads replicated)"
        )
    per_rank = num_heads // world_size
    group = num_heads // num_kv_heads  # query heads per key/value head
    heads = range(rank * per_rank, (rank + 1) * per_rank)
    kv_heads = range(heads.start // group, (heads.stop - 1) // group + 1)
    return heads, kv_heads


def _rows(heads: range, head_dim: int) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


def _linear_part(layer: nn.Linear, rows=slice(None), cols=slice(None), bias=True):
    """A new ``nn.Linear`` holding a copy of ``layer``'s weight ``[rows, cols]``."""
    weight = layer.weight.detach()[rows, cols]  # (out_r, in_r)
    part = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias and layer.bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        part.weight.copy_(weight)
        if part.bias is not None:
            part.bias.copy_(layer.bias.detach()[rows])
    return part


class TensorParallelMultiHeadAttention(nn.Module):
    """This rank's heads of a :class:`~companion.torch.multihead.MultiHeadAttention`.

    Built from the full module (the same weights on every rank, e.g. the same seed);
    holds copies of its parts: ``q_proj``, ``k_proj``, ``v_proj`` (rows of this
    rank's heads), ``out_proj`` (the matching columns, no bias) and ``out_bias``
    (replicated). :meth:`forward` takes the full ``(B, L, E)`` inputs on every rank
    and returns the full output on every rank, equal to the module's. Every rank must
    pass inputs of the same shapes: the forward pass is Megatron's one all-reduce and
    nothing else (no collective checks the shapes across ranks; ranks that disagree
    fail inside that all-reduce).
    """

    def __init__(self, module: MultiHeadAttention, *, group=None):
        super().__init__()
        if not isinstance(module, MultiHeadAttention):
            raise TypeError(
                f"module must be a companion.torch.MultiHeadAttention, got "
                f"{type(module).__name__}"
            )
        self.group = group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        H, H_kv, D = module.num_heads, module.num_kv_heads, module.head_dim
        self.heads, self.kv_heads = head_split(H, H_kv, rank, world_size)
        self.num_heads, self.num_kv_heads = len(self.heads), len(self.kv_heads)
        self.q_proj = _linear_part(module.q_proj, rows=_rows(self.heads, D))
        self.k_proj = _linear_part(module.k_proj, rows=_rows(self.kv_heads, D))
        self.v_proj = _linear_part(module.v_proj, rows=_rows(self.kv_heads, D))
        self.out_proj = _linear_part(
            module.out_proj, cols=_rows(self.heads, D), bias=False
        )
        bias = module.out_proj.bias
        self.out_bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.replicas = world_size // H_kv if world_size > H_kv else 1
        if self.replicas > 1:
            self._sum_over_replicas(rank, world_size, group)

    def _sum_over_replicas(self, rank, world_size, group):
        """Key/value heads replicated on ``replicas`` ranks: sum their gradients."""
        replica_group = None
        for first in range(
            0, world_size, self.replicas
        ):  # every rank creates every group
            ranks = list(range(first, first + self.replicas))
            if group is not None:
                ranks = [dist.get_global_rank(group, r) for r in ranks]
            new = dist.new_group(ranks)
            if first <= rank < first + self.replicas:
                replica_group = new
        for layer in (self.k_proj, self.v_proj):
            for p in layer.parameters():
                p.register_hook(
                    lambda g: all_reduce(g.contiguous().clone(), group=replica_group)
                )

    def forward(self, query, key=None, value=None, *, mask=None, causal=False):
        """``query (B, L, E)`` (``key``/``value`` default to it) -> ``(B, L, E)``."""
        key = query if key is None else key
        value = key if value is None else value
        E = self.q_proj.in_features
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(t).__name__}"
                )
            if t.dim() != 3 or t.shape[-1] != E or t.shape[0] != query.shape[0]:
                raise ValueError(
                    f"{name} must have shape (B, length, E={E}) with query's B, got "
                    f"{tuple(t.shape)} (query {tuple(query.shape)})"
                )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have one length, got {tuple(key.shape)} and "
                f"{tuple(value.shape)}"
            )
        inputs = {id(query): query, id(key): key, id(value): value}
        copied = {i: _CopyToParallel.apply(x, self.group) for i, x in inputs.items()}
        B, L, _ = query.shape
        q = self.q_proj(copied[id(query)])  # (B, L, H_r * D)
        k = self.k_proj(copied[id(key)])  # (B, S, H_kv_r * D)
        v = self.v_proj(copied[id(value)])  # (B, S, H_kv_r * D)
        q = q.reshape(B, L, self.num_heads, -1).transpose(1, 2)  # (B, H_r, L, D)
        k = k.reshape(B, k.shape[1], self.num_kv_heads, -1).transpose(1, 2)
        v = v.reshape(B, v.shape[1], self.num_kv_heads, -1).transpose(1, 2)
        # (B, H_r, L, D): this rank's heads, no communication
        heads = scaled_dot_product_attention_reference(
            q, k, v, mask=mask, causal=causal
        )
        merged = heads.transpose(1, 2).reshape(B, L, -1)  # (B, L, H_r * D)
        partial = self.out_proj(merged)  # (B, L, E): this rank's share of the sum
        output = _ReduceFromParallel.apply(partial, self.group)  # (B, L, E)
        return output if self.out_bias is None else output + self.out_bias
