"""Mixture of experts in torch: the functions of :mod:`companion.numpy.moe` for torch
tensors (autograd flows through the gates and the experts), and :class:`MoELayer`, a
module holding the router and experts as Hugging Face lays them out.

The router conventions, the balance losses and capacity are explained in
:mod:`companion.numpy.moe`, the float64 oracle these functions are tested against.
``implementation="grouped"`` sorts the assignments by expert once (no Python loop over
tokens or experts), runs each run of about 2048 sorted rows through one grouped matrix
product per projection (``torch.nn.functional.grouped_mm`` in float32 on CPU, no padding
whatever the load), gates the hidden activations and adds the results back in place with
``index_add_``; ``"loop"`` is the readable per-expert reference, the loop of Hugging
Face's ``MixtralExperts``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from companion import _checks, _moe
from companion._moe import expert_capacity
from companion.numpy.moe import MoEOutput

__all__ = [
    "route",
    "expert_load",
    "capacity_keep",
    "expert_capacity",
    "experts_forward",
    "moe_layer",
    "MoEOutput",
    "load_balancing_loss",
    "router_z_loss",
    "balance_bias_update",
    "MoELayer",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def route(
    logits,
    top_k,
    *,
    router="mixtral",
    bias=None,
    num_groups=1,
    topk_groups=1,
    routed_scaling_factor=1.0,
    normalize=None,
    router_dtype=None,
):
    """As :func:`companion.numpy.route`: ``(weights (T, k), indices (T, k))``."""
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    s = _moe.check_router(
        logits.shape[1],
        top_k,
        router,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
        normalize=normalize,
        router_dtype=router_dtype,
        bias_shape=None if bias is None else tuple(bias.shape),
    )
    z = logits if s.router_dtype is None else logits.to(_DTYPES[s.router_dtype])
    scores = torch.softmax(z, dim=-1) if s.affinity == "softmax" else z.sigmoid()
    choice = scores if bias is None else scores + bias
    T, N = logits.shape
    if s.num_groups > 1:
        grouped = choice.detach().reshape(T, s.num_groups, N // s.num_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        groups = _top(group_scores, s.topk_groups)
        allowed = torch.zeros(T, s.num_groups, dtype=torch.bool, device=logits.device)
        allowed = allowed.scatter(1, groups, True)
        allowed = allowed.repeat_interleave(N // s.num_groups, dim=-1)
        choice = choice.masked_fill(~allowed, float("-inf"))
    indices = _top(choice.detach(), s.top_k)
    weights = scores.gather(1, indices)
    if s.normalize:
        denominator = weights.sum(dim=-1, keepdim=True)
        if s.affinity == "sigmoid":
            denominator = denominator + 1e-20  # as DeepSeek-V3's code
        weights = weights / denominator
    weights = weights * s.routed_scaling_factor
    return weights.to(logits.dtype), indices


def _top(scores, k):
    """The ``k`` largest per row, largest first; ties to the lower index (a stable
    sort, as the numpy oracle)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def expert_load(indices, num_experts, kept=None):
    """As :func:`companion.numpy.expert_load`: ``(N,)`` assignments per expert."""
    _moe.check_indices(tuple(indices.shape))
    N = _checks.check_int("num_experts", num_experts)
    chosen = indices if kept is None else indices[kept]
    return torch.bincount(chosen.reshape(-1), minlength=N)


def capacity_keep(indices, num_experts, capacity):
    """As :func:`companion.numpy.capacity_keep`, without loops: each assignment's slot
    is a running count of its expert, first choices before second choices."""
    _moe.check_indices(tuple(indices.shape))
    N = _checks.check_int("num_experts", num_experts)
    C = _checks.check_int("capacity", capacity, minimum=0)
    rank_major = indices.t().reshape(-1)  # all first choices, then all second ...
    one_hot = torch.nn.functional.one_hot(rank_major, N)
    slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    return (slot < C).reshape(indices.shape[1], indices.shape[0]).t()


def _ffn(x, gate_up, down):
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)


def experts_forward(x, indices, weights, gate_up, down, *, implementation="loop"):
    """As :func:`companion.numpy.experts_forward`, differentiable in ``x``, ``weights``
    and the expert weights."""
    _checks.check_float("x", x.dtype)
    N, E, _ = _moe.check_experts(
        tuple(x.shape), tuple(gate_up.shape), tuple(down.shape)
    )
    _moe.check_implementation(implementation)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, E), got shape {tuple(x.shape)}")
    _moe.check_indices(tuple(indices.shape))
    if weights.shape != indices.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must "
            f"both be ({x.shape[0]}, top_k)"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N):
        raise ValueError(f"indices must lie in [0, {N}), got {int(indices.min())}..")
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)  # (T, E), accumulated in place as Hugging Face's loop
    if implementation == "loop":
        for e in range(N):
            tokens, rank = torch.nonzero(indices == e, as_tuple=True)
            if tokens.numel() == 0:
                continue
            y = _ffn(x[tokens], gate_up[e], down[e])
            out.index_add_(0, tokens, y * weights[tokens, rank, None])
        return out
    # [book: grouped dispatch]
    flat = indices.reshape(-1)  # (T k,)
    order = torch.sort(flat, stable=True).indices  # assignments grouped by expert
    tokens = order // indices.shape[1]  # (T k,) each sorted assignment's token
    gates = weights.reshape(-1)[order, None]  # (T k, 1)
    ends = torch.bincount(flat, minlength=N).cumsum(0)  # (N,) where expert e ends
    runs = _chunks(ends.tolist(), _CHUNK_ROWS)  # (e0, e1, r0, r1): whole experts
    # one split of each stack (its gradient is one concatenation, not a stack-sized
    # zero tensor per indexing as gate_up[e] costs the loop)
    split = [e1 - e0 for e0, e1, _, _ in runs] + [N - (runs[-1][1] if runs else 0)]
    for (e0, e1, r0, r1), gu, dn in zip(runs, gate_up.split(split), down.split(split)):
        t, offs = tokens[r0:r1], ends[e0:e1] - r0  # rows r0:r1 go to experts e0:e1
        gate, up = _grouped_linear(x[t], gu, offs).chunk(2, dim=-1)  # (R, I) each
        h = torch.nn.functional.silu(gate) * up * gates[r0:r1]  # (R, I), gated
        out.index_add_(0, t, _grouped_linear(h, dn, offs))  # (R, E)
    return out
    # [/book: grouped dispatch]


# Rows of one grouped product: a few MiB of activations stay in cache, and the
# per-call overhead is paid T k / _CHUNK_ROWS times instead of N times.
_CHUNK_ROWS = 2048
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)


@functools.cache
def _grouped_mm_runs_on_cpu():
    """Whether this torch's grouped product has a float32 CPU kernel (torch 2.13 has;
    earlier releases are CUDA-only or lack the function): tried once on 4 x 4."""
    if _GROUPED_MM is None:
        return False
    try:
        offs = torch.tensor([2, 4], dtype=torch.int32)
        _GROUPED_MM(torch.ones(4, 4), torch.ones(2, 4, 4), offs=offs)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _chunks(ends, rows):
    """Split experts ``0..N`` (expert ``e``'s rows end at ``ends[e]``) into runs of
    whole experts of about ``rows`` rows: ``(e0, e1, r0, r1)``, no empty run."""
    runs, e0, r0 = [], 0, 0
    for e, end in enumerate(ends):
        if end - r0 >= rows or e == len(ends) - 1:
            if end > r0:
                runs.append((e0, e + 1, r0, end))
            e0, r0 = e + 1, end
    return runs


def _grouped_mm_takes(rows, weight):
    """Whether torch's grouped product runs these operands: float32 on CPU, rows and
    both widths aligned to 16 bytes (its kernel's rule)."""
    return (
        _GROUPED_MM is not None
        and rows.dtype == weight.dtype == torch.float32
        and rows.device.type == weight.device.type == "cpu"
        and rows.is_contiguous()
        and weight.is_contiguous()
        and rows.shape[1] % 4 == 0
        and weight.shape[1] % 4 == 0
        and rows.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
        and _grouped_mm_runs_on_cpu()
    )


def _grouped_linear(rows, weight, ends):
    """``rows (R, in)`` whose slice ``ends[i-1]:ends[i]`` meets ``weight[i]`` (a
    stack ``(n, out, in)`` laid out as ``nn.Linear``'s) -> ``(R, out)``: one grouped
    matrix product where torch has one for these operands (float32 on CPU, widths a
    multiple of 4), else one ``linear`` per expert."""
    if _grouped_mm_takes(rows, weight):
        return _GROUPED_MM(rows, weight.transpose(1, 2), offs=ends.to(torch.int32))
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    parts = [
        torch.nn.functional.linear(r, w) for r, w in zip(rows.split(sizes), weight)
    ]
    return torch.cat(parts)


def moe_layer(
    x,
    router_weight,
    gate_up,
    down,
    top_k,
    *,
    router="mixtral",
    bias=None,
    num_groups=1,
    topk_groups=1,
    routed_scaling_factor=1.0,
    normalize=None,
    router_dtype=None,
    num_shared_experts=0,
    shared_gate_up=None,
    shared_down=None,
    capacity_factor=None,
    implementation="loop",
):
    """As :func:`companion.numpy.moe_layer`; returns a :class:`MoEOutput`."""
    _checks.check_float("x", x.dtype)
    N, E, _ = _moe.check_experts(
        tuple(x.shape), tuple(gate_up.shape), tuple(down.shape)
    )
    if tuple(router_weight.shape) != (N, E):
        raise ValueError(
            f"router_weight must have shape ({N}, {E}) (experts, E), got "
            f"{tuple(router_weight.shape)}"
        )
    shared = _moe.check_shared(
        num_shared_experts,
        E,
        None if shared_gate_up is None else tuple(shared_gate_up.shape),
        None if shared_down is None else tuple(shared_down.shape),
    )
    cf = _moe.check_capacity_factor(capacity_factor)
    flat = x.reshape(-1, E)
    if router == "deepseek_v3" and router_dtype is not None:
        rd = _DTYPES.get(router_dtype)
        if rd is None:
            _moe.check_router(N, top_k, router, router_dtype=router_dtype)
        logits = torch.nn.functional.linear(flat.to(rd), router_weight.to(rd))
    else:
        logits = torch.nn.functional.linear(flat, router_weight)
    weights, indices = route(
        logits,
        top_k,
        router=router,
        bias=bias,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
        normalize=normalize,
        router_dtype=router_dtype,
    )
    weights = weights.to(x.dtype)
    if cf is None:
        kept = torch.ones_like(indices, dtype=torch.bool)
    else:
        C = expert_capacity(flat.shape[0], N, indices.shape[1], cf)
        kept = capacity_keep(indices, N, C)
    y = experts_forward(
        flat,
        indices,
        weights * kept,
        gate_up,
        down,
        implementation=implementation,
    )
    if shared:
        y = y + _ffn(flat, shared_gate_up, shared_down)
    return MoEOutput(y.reshape(x.shape), logits, weights, indices, kept)


def _softmax_mean(logits):
    return torch.softmax(logits, dim=-1).mean(dim=0)


def load_balancing_loss(logits, indices, *, alpha=1.0):
    """As :func:`companion.numpy.load_balancing_loss` (differentiable through the
    mean probabilities)."""
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    _moe.check_indices(tuple(indices.shape))
    T, N = logits.shape
    if indices.shape[0] != T:
        raise ValueError(
            f"indices must have {T} rows as logits, got {tuple(indices.shape)}"
        )
    f = torch.bincount(indices.reshape(-1), minlength=N).to(logits.dtype) / T
    return alpha * N * torch.sum(f * _softmax_mean(logits))


def router_z_loss(logits):
    """As :func:`companion.numpy.router_z_loss`."""
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    return torch.logsumexp(logits, dim=-1).square().mean()


def balance_bias_update(bias, indices, *, gamma=0.001):
    """As :func:`companion.numpy.balance_bias_update`: a new tensor, ``bias``
    untouched."""
    _checks.check_float("bias", bias.dtype)
    if bias.dim() != 1:
        raise ValueError(
            f"bias must be 1-D (num_experts,), got shape {tuple(bias.shape)}"
        )
    _moe.check_gamma(gamma)
    load = expert_load(indices, bias.shape[0]).to(bias.dtype)
    return bias.detach() + gamma * torch.sign(load.mean() - load)


def _routing_keywords(layer) -> dict:
    """The keywords of :func:`route` for a layer holding ``settings``, ``router_name``
    and ``bias`` (a :class:`MoELayer`, or its expert-parallel copy); the bias only for
    ``router="deepseek_v3"``, the one router that reads it."""
    s = layer.settings
    return dict(
        router=layer.router_name,
        bias=layer.bias if layer.router_name == "deepseek_v3" else None,
        num_groups=s.num_groups,
        topk_groups=s.topk_groups,
        routed_scaling_factor=s.routed_scaling_factor,
        normalize=s.normalize,
        router_dtype=s.router_dtype,
    )


class MoELayer(nn.Module):
    """A mixture-of-experts layer with Hugging Face's parameter layout.

    Parameters: ``router`` ``(N, E)`` (``gate.weight`` in HF), ``gate_up``
    ``(N, 2 I, E)``, ``down`` ``(N, E, I)`` and, with ``num_shared_experts``,
    ``shared_gate_up`` ``(2 I_s, E)`` and ``shared_down`` ``(E, I_s)`` with
    ``I_s = num_shared_experts * I``. With ``router="deepseek_v3"`` the buffer
    ``bias`` (``e_score_correction_bias``) is the auxiliary-loss-free balancing bias;
    :meth:`update_bias` nudges it after a step. The forward returns the output
    (no residual); the last routing is kept in ``last_routing``.
    """

    def __init__(
        self,
        hidden_size,
        intermediate_size,
        num_experts,
        top_k,
        *,
        router="mixtral",
        num_shared_experts=0,
        num_groups=1,
        topk_groups=1,
        routed_scaling_factor=1.0,
        normalize=None,
        router_dtype=None,
        capacity_factor=None,
        implementation="grouped",
        dtype=None,
        device=None,
    ):
        super().__init__()
        E = _checks.check_int("hidden_size", hidden_size)
        intermediate = _checks.check_int("intermediate_size", intermediate_size)
        N = _checks.check_int("num_experts", num_experts)
        self.settings = _moe.check_router(
            N,
            top_k,
            router,
            num_groups=num_groups,
            topk_groups=topk_groups,
            routed_scaling_factor=routed_scaling_factor,
            normalize=normalize,
            router_dtype=router_dtype,
        )
        self.router_name = router
        self.num_shared_experts = _checks.check_int(
            "num_shared_experts", num_shared_experts, minimum=0
        )
        self.capacity_factor = _moe.check_capacity_factor(capacity_factor)
        self.implementation = _moe.check_implementation(implementation)
        kw = {"dtype": dtype, "device": device}
        self.router = nn.Parameter(torch.empty(N, E, **kw))
        self.gate_up = nn.Parameter(torch.empty(N, 2 * intermediate, E, **kw))
        self.down = nn.Parameter(torch.empty(N, E, intermediate, **kw))
        if self.num_shared_experts:
            shared = self.num_shared_experts * intermediate
            self.shared_gate_up = nn.Parameter(torch.empty(2 * shared, E, **kw))
            self.shared_down = nn.Parameter(torch.empty(E, shared, **kw))
        else:
            self.shared_gate_up = self.shared_down = None
        self.register_buffer("bias", torch.zeros(N, **kw))
        self.last_routing = None
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        s = self.settings
        result = moe_layer(
            x,
            self.router,
            self.gate_up,
            self.down,
            s.top_k,
            **_routing_keywords(self),
            num_shared_experts=self.num_shared_experts,
            shared_gate_up=self.shared_gate_up,
            shared_down=self.shared_down,
            capacity_factor=self.capacity_factor,
            implementation=self.implementation,
        )
        self.last_routing = result
        return result.output

    @torch.no_grad()
    def update_bias(self, gamma=0.001):
        """DeepSeek-V3's bias step from the last forward's choices (in place on the
        buffer: it is state, like a running mean). Only ``router="deepseek_v3"`` uses
        the bias; with any other router this is a ``ValueError``, not a silent
        no-op."""
        if self.router_name != "deepseek_v3":
            raise ValueError(
                "update_bias needs router='deepseek_v3' (the only router whose choice "
                f"uses the bias), got router={self.router_name!r}"
            )
        if self.last_routing is None:
            raise ValueError("update_bias needs a forward pass first")
        self.bias.copy_(
            balance_bias_update(self.bias, self.last_routing.indices, gamma=gamma)
        )
