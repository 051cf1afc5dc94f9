r"""Expert parallelism: the experts of a mixture-of-experts layer sharded across ranks,
the tokens sent to their experts and back with all-to-all (GShard, Switch).

Each of ``W`` ranks holds ``N / W`` of the ``N`` experts (rank ``r``: experts
``r N/W .. (r+1) N/W - 1``), a copy of the router (and of the shared experts), and its
own tokens. A forward pass::

    route my tokens (T, E): top-k experts, weights; capacity per expert   local
    sort the kept assignments by expert; counts per expert (N,)
    all-to-all of the counts             (each rank learns what it will receive)
    all-to-all of the rows (n_sent, E)   -> rows for my experts, from every rank
    my experts on their rows                                             local
    all-to-all of the results back       -> my assignments' expert outputs
    y = sum over my kept assignments of weight * expert output   (+ shared experts)

Capacity is as in :func:`companion.torch.moe.moe_layer` on this rank's tokens (GShard's
groups: each rank is one group), so each expert receives at most ``C`` rows from each
rank; dropped assignments are not sent. The backward pass runs the two row
all-to-alls in reverse (autograd). The result equals
:func:`~companion.torch.moe.moe_layer` of the whole layer on this rank's tokens; the
gradients of each rank's experts are the sums over every rank's tokens; the router's
gradient is this rank's share (sum it over the ranks, as data parallelism does).

**Communication** per rank, counted: ``bytes["all_to_all"]`` the rows this rank sends
to *other* ranks, ``(s + g) E b`` forward and the same backward, with ``s`` its kept
assignments whose expert lives elsewhere, ``g`` the rows other ranks send it (``b``
bytes per number); ``bytes["all_to_all_counts"]`` ``(W-1) N/W`` int64 counts forward.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from companion import _checks
from companion.torch.distributed.comm import _record
from companion.torch.moe import (
    _DTYPES,
    MoELayer,
    _ffn,
    _routing_keywords,
    capacity_keep,
    expert_capacity,
    route,
)

__all__ = ["ExpertParallelMoE", "expert_split"]


def expert_split(num_experts: int, rank: int, world_size: int) -> range:
    """The experts ``rank`` holds; ``ValueError`` unless ``world_size`` divides
    ``num_experts``."""
    N = _checks.check_int("num_experts", num_experts)
    W = _checks.check_int("world_size", world_size)
    rank = _checks.check_int("rank", rank, minimum=0)
    if rank >= W:
        raise ValueError(f"rank must be < world_size={W}, got {rank}")
    if N % W:
        raise ValueError(
            f"num_experts={N} does not split over world_size={W} ranks: each rank "
            f"holds N / W experts; choose a world size that divides {N}"
        )
    return range(rank * N // W, (rank + 1) * N // W)


def _exchange_rows(rows, send_splits, receive_splits, group):
    """``dist.all_to_all_single`` with row counts; counts the rows sent elsewhere."""
    rank = dist.get_rank(group)
    received = rows.new_empty(sum(receive_splits), *rows.shape[1:])
    dist.all_to_all_single(
        received,
        rows.contiguous(),
        output_split_sizes=receive_splits,
        input_split_sizes=send_splits,
        group=group,
    )
    row_bytes = rows[0:1].numel() * rows.element_size()
    _record("all_to_all", (sum(send_splits) - send_splits[rank]) * row_bytes)
    return received


class _AllToAllRows(torch.autograd.Function):
    """Rows to ranks by counts; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, send_splits, receive_splits, group):
        ctx.settings = (send_splits, receive_splits, group)
        return _exchange_rows(rows, send_splits, receive_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, receive_splits, group = ctx.settings
        return (
            _exchange_rows(grad, receive_splits, send_splits, group),
            None,
            None,
            None,
        )


class ExpertParallelMoE(nn.Module):
    """This rank's experts of a :class:`~companion.torch.moe.MoELayer` (copies).

    ``forward(x)`` takes this rank's tokens ``(..., E)`` and returns their output,
    equal to the whole layer's on them. Parameters: ``router`` (replicated),
    ``gate_up`` ``(N/W, 2 I, E)`` and ``down`` ``(N/W, E, I)`` (this rank's experts),
    the shared experts (replicated). After a forward, ``last_received`` is the
    ``(W, N/W)`` count of rows each rank sent to each of this rank's experts.
    """

    def __init__(self, module: MoELayer, *, group=None):
        super().__init__()
        if not isinstance(module, MoELayer):
            raise TypeError(f"module must be a MoELayer, got {type(module).__name__}")
        self.group = group
        self.settings = module.settings
        self.router_name = module.router_name
        self.capacity_factor = module.capacity_factor
        self.num_experts = module.gate_up.shape[0]
        rank, W = dist.get_rank(group), dist.get_world_size(group)
        self.experts = expert_split(self.num_experts, rank, W)
        mine = slice(self.experts.start, self.experts.stop)

        def copy(p):
            return None if p is None else nn.Parameter(p.detach().clone())

        self.router = copy(module.router)
        self.gate_up = copy(module.gate_up[mine])
        self.down = copy(module.down[mine])
        self.shared_gate_up = copy(module.shared_gate_up)
        self.shared_down = copy(module.shared_down)
        self.register_buffer("bias", module.bias.detach().clone())
        self.last_received = None

    def _route(self, flat):
        s = self.settings
        if self.router_name == "deepseek_v3" and s.router_dtype is not None:
            rd = _DTYPES[s.router_dtype]
            logits = nn.functional.linear(flat.to(rd), self.router.to(rd))
        else:
            logits = nn.functional.linear(flat, self.router)
        weights, indices = route(logits, s.top_k, **_routing_keywords(self))
        if self.capacity_factor is None:
            kept = torch.ones_like(indices, dtype=torch.bool)
        else:
            C = expert_capacity(
                flat.shape[0], self.num_experts, indices.shape[1], self.capacity_factor
            )
            kept = capacity_keep(indices, self.num_experts, C)
        return weights.to(flat.dtype), indices, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        _checks.check_float("x", x.dtype)
        E = self.router.shape[1]
        if x.dim() < 1 or x.shape[-1] != E:
            raise ValueError(f"x must have shape (..., {E}), got {tuple(x.shape)}")
        group, N = self.group, self.num_experts
        W, per_rank = dist.get_world_size(group), len(self.experts)
        flat = x.reshape(-1, E)  # (T, E)
        weights, indices, kept = self._route(flat)  # (T, k) each
        k = indices.shape[1]
        # the kept assignments, sorted by expert (so by destination rank)
        chosen = torch.nonzero(kept.reshape(-1), as_tuple=True)[0]  # (n,)
        experts = indices.reshape(-1)[chosen]
        order = torch.sort(experts, stable=True).indices
        chosen, experts = chosen[order], experts[order]
        tokens = chosen // k  # (n,)
        counts = torch.bincount(experts, minlength=N)  # (N,) rows per expert
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=group)
        _record("all_to_all_counts", (W - 1) * per_rank * counts.element_size())
        received_counts = received_counts.reshape(W, per_rank)  # [source, my expert]
        self.last_received = received_counts
        send = counts.reshape(W, per_rank).sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        rows = _AllToAllRows.apply(flat[tokens], send, receive, group)  # (m, E)
        # which of my experts each received row is for: sources in rank order, each
        # source's rows sorted by expert
        local = torch.repeat_interleave(
            torch.arange(per_rank, device=x.device).repeat(W),
            received_counts.reshape(-1),
        )
        by_expert = torch.sort(local, stable=True).indices
        pieces = rows[by_expert].split(received_counts.sum(0).tolist())
        outputs = torch.cat(
            [_ffn(p, self.gate_up[e], self.down[e]) for e, p in enumerate(pieces)]
        )
        outputs = outputs.index_select(0, torch.argsort(by_expert))  # received order
        back = _AllToAllRows.apply(outputs, receive, send, group)  # (n, E)
        gate = weights.reshape(-1)[chosen].unsqueeze(-1)  # (n, 1)
        y = torch.zeros_like(flat).index_add(0, tokens, back * gate)
        if self.shared_gate_up is not None:
            y = y + _ffn(flat, self.shared_gate_up, self.shared_down)
        return y.reshape(x.shape)
