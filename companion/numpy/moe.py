r"""Mixture of experts in numpy: the float64 oracle of routing, balance and dispatch.

A mixture-of-experts layer keeps ``N`` expert MLPs and lets each token use ``k`` of
them. A linear **router** ``W_r`` (``(N, E)``) scores every expert for token ``x_t``,
:math:`s_t = W_r x_t`; the token goes to the ``k`` best experts and the layer returns

.. math::

    y_t = \sum_{i \in \operatorname{TopK}(t)} g_{t,i}\, \operatorname{FFN}_i(x_t)
          \;+\; \operatorname{FFN}_{\text{shared}}(x_t),
    \qquad
    \operatorname{FFN}_i(x) = W^{down}_i\big(\operatorname{silu}(W^{gate}_i x)
                              \odot W^{up}_i x\big)

with the gates :math:`g_{t,i}` given by the router convention (``router=``, see
:mod:`companion._moe`):

* ``"switch"`` (Fedus et al. 2021): :math:`g = p_{t,i}`, top-1, with
  :math:`p_t = \operatorname{softmax}(s_t)`.
* ``"mixtral"`` (Jiang et al. 2024): :math:`g = p_{t,i} / \sum_{j \in
  \operatorname{TopK}} p_{t,j}`, which equals the softmax over the chosen logits.
* ``"qwen3_moe"``: as Mixtral, renormalised only with ``normalize=True``
  (``norm_topk_prob``).
* ``"deepseek_v3"`` (DeepSeek-AI 2024): sigmoid affinities :math:`a = \sigma(s_t)`;
  experts chosen by :math:`a + b` (``bias``, the auxiliary-loss-free balancing bias,
  used for the choice only) within the ``topk_groups`` best of ``num_groups`` groups
  (a group scores the sum of its two best); gates :math:`g = \gamma\, a_{t,i} /
  \sum_{j} a_{t,j}` with ``routed_scaling_factor`` :math:`\gamma`.

Shared experts (DeepSeekMoE, Dai et al. 2024) are one dense gated MLP every token uses
(``num_shared_experts`` experts side by side). Expert weights are stored as Hugging
Face stores them: ``gate_up (N, 2 I, E)``, the gate's ``I`` rows then the up
projection's, and ``down (N, E, I)``.

Balance: :func:`load_balancing_loss` (Switch), :func:`router_z_loss` (ST-MoE),
:func:`balance_bias_update` (DeepSeek-V3's auxiliary-loss-free bias). Capacity:
:func:`capacity_keep` drops the assignments beyond an expert's
:func:`~companion._moe.expert_capacity`; a dropped assignment contributes 0, so a token
dropped everywhere leaves the layer as 0 and the residual ``x + y`` carries it
unchanged.

Explained in the book chapter *Mixture of experts*.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from companion import _checks, _moe
from companion._moe import expert_capacity

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
]


class MoEOutput(NamedTuple):
    """What :func:`moe_layer` returns: the output ``(..., E)`` and the routing of the
    ``T`` flattened tokens: ``logits (T, N)``, ``weights (T, k)``, ``indices (T, k)``,
    ``kept (T, k)`` (``False`` where capacity dropped the assignment)."""

    output: object
    logits: object
    weights: object
    indices: object
    kept: object


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest per row, largest first; ties go to the lower
    index."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


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
    """Route ``T`` tokens: ``logits (T, N)`` to ``(weights (T, k), indices (T, k))``.

    ``indices`` are sorted by the choice score, best first. ``router_dtype``
    (``"float32"``) computes the affinities in that dtype, as Hugging Face's Mixtral,
    Qwen3-MoE and DeepSeek-V3 routers do even in float64 models; the weights come back
    in the logits' dtype.
    """
    logits = np.asarray(logits)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(logits.shape, "logits")
    s = _moe.check_router(
        logits.shape[1],
        top_k,
        router,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
        normalize=normalize,
        router_dtype=router_dtype,
        bias_shape=None if bias is None else np.shape(bias),
    )
    # [book: router]
    z = logits if s.router_dtype is None else logits.astype(s.router_dtype)
    if s.affinity == "softmax":
        scores = _softmax(z)
    else:
        scores = 1.0 / (1.0 + np.exp(-z))
    choice = scores if bias is None else scores + np.asarray(bias)
    T, N = logits.shape
    if s.num_groups > 1:
        # node-limited routing: keep the experts of the topk_groups best groups
        grouped = choice.reshape(T, s.num_groups, N // s.num_groups)
        best_two = np.sort(grouped, axis=-1)[..., -2:]
        group_scores = best_two[..., 1] + best_two[..., 0]
        groups = _top(group_scores, s.topk_groups)
        allowed = np.zeros((T, s.num_groups), dtype=bool)
        np.put_along_axis(allowed, groups, True, axis=-1)
        allowed = np.repeat(allowed, N // s.num_groups, axis=-1)
        choice = np.where(allowed, choice, -np.inf)
    indices = _top(choice, s.top_k)
    weights = np.take_along_axis(scores, indices, axis=-1)
    if s.normalize:
        denominator = weights.sum(axis=-1, keepdims=True)
        if s.affinity == "sigmoid":
            denominator = denominator + 1e-20  # as DeepSeek-V3's code
        weights = weights / denominator
    weights = weights * s.routed_scaling_factor
    # [/book: router]
    return weights.astype(logits.dtype), indices


def expert_load(indices, num_experts, kept=None):
    """Assignments per expert: ``(N,)`` integer counts of ``indices (T, k)`` (only the
    ``kept`` ones when given)."""
    indices = np.asarray(indices)
    _moe.check_indices(indices.shape)
    N = _checks.check_int("num_experts", num_experts)
    chosen = indices if kept is None else indices[np.asarray(kept)]
    return np.bincount(chosen.reshape(-1), minlength=N)


def capacity_keep(indices, num_experts, capacity):
    """Which assignments fit: ``kept (T, k)``, ``False`` beyond an expert's
    ``capacity`` slots.

    Slots are filled as GShard and Switch fill them: every token's first choice (in
    token order) before any second choice, and so on.
    """
    indices = np.asarray(indices)
    _moe.check_indices(indices.shape)
    N = _checks.check_int("num_experts", num_experts)
    C = _checks.check_int("capacity", capacity, minimum=0)
    T, k = indices.shape
    used = np.zeros(N, dtype=np.int64)
    kept = np.zeros((T, k), dtype=bool)
    for j in range(k):  # readable reference: rank by rank, token by token
        for t in range(T):
            e = indices[t, j]
            if used[e] < C:
                kept[t, j] = True
                used[e] += 1
    return kept


def _ffn(x, gate_up, down):
    h = x @ gate_up.T
    half = h.shape[-1] // 2
    return (_silu(h[..., :half]) * h[..., half:]) @ down.T


def experts_forward(x, indices, weights, gate_up, down, *, implementation="loop"):
    """The routed experts' sum :math:`\\sum_i g_{t,i} \\operatorname{FFN}_i(x_t)` for
    ``x (T, E)``.

    ``implementation="loop"``: one expert at a time, the tokens that chose it picked
    by a mask (the reference). ``"grouped"``: the ``T k`` assignments sorted by expert
    once, each expert's rows a contiguous slice, the gated results put back in token
    order and each token's ``k`` summed (numpy has no grouped matrix product: one
    product per expert's slice). A zero weight (a dropped assignment) contributes
    exactly 0.
    """
    x = np.asarray(x)
    gate_up, down = np.asarray(gate_up), np.asarray(down)
    indices, weights = np.asarray(indices), np.asarray(weights)
    _checks.check_float("x", x.dtype)
    N, E, _ = _moe.check_experts(x.shape, gate_up.shape, down.shape)
    _moe.check_implementation(implementation)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (tokens, E), got shape {x.shape}")
    _moe.check_indices(indices.shape)
    if weights.shape != indices.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"weights {weights.shape} and indices {indices.shape} must both be "
            f"({x.shape[0]}, top_k)"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= N):
        raise ValueError(f"indices must lie in [0, {N}), got {indices.min()}..")
    out = np.zeros_like(x)
    if implementation == "loop":
        # [book: loop dispatch]
        for e in range(N):
            tokens, rank = np.nonzero(indices == e)
            if tokens.size == 0:
                continue
            y = _ffn(x[tokens], gate_up[e], down[e])
            np.add.at(out, tokens, y * weights[tokens, rank][:, None])
        # [/book: loop dispatch]
        return out
    # [book: grouped dispatch]
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")
    tokens = order // indices.shape[1]
    w = weights.reshape(-1)[order]
    bounds = np.searchsorted(flat[order], np.arange(N + 1))
    rows = x[tokens]
    ys = np.empty_like(rows)
    for e in range(N):  # one contiguous slice per expert, no loop over tokens
        a, b = bounds[e], bounds[e + 1]
        if a < b:
            ys[a:b] = _ffn(rows[a:b], gate_up[e], down[e])
    ys *= w[:, None]  # gated, (T k, E) in expert order
    back = np.empty_like(order)
    back[order] = np.arange(order.size)  # each assignment's place in expert order
    # back in token order, token t's k results are rows t k .. t k + k - 1: summed
    return ys[back].reshape(x.shape[0], indices.shape[1], E).sum(axis=1)
    # [/book: grouped dispatch]


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
    """A mixture-of-experts layer on ``x (..., E)``: router, routed experts, shared
    experts; returns a :class:`MoEOutput`. The residual is not added.

    ``router_weight (N, E)`` gives the logits ``x W_r^T``; with
    ``router="deepseek_v3"`` and ``router_dtype`` they are computed in that dtype (as
    DeepSeek-V3's code computes them in float32). ``capacity_factor`` (``None`` = no
    limit) drops the assignments beyond :func:`expert_capacity` slots per expert.
    """
    x = np.asarray(x)
    router_weight = np.asarray(router_weight)
    gate_up, down = np.asarray(gate_up), np.asarray(down)
    _checks.check_float("x", x.dtype)
    N, E, _ = _moe.check_experts(x.shape, gate_up.shape, down.shape)
    if router_weight.shape != (N, E):
        raise ValueError(
            f"router_weight must have shape ({N}, {E}) (experts, E), got "
            f"{router_weight.shape}"
        )
    shared = _moe.check_shared(
        num_shared_experts,
        E,
        None if shared_gate_up is None else np.shape(shared_gate_up),
        None if shared_down is None else np.shape(shared_down),
    )
    cf = _moe.check_capacity_factor(capacity_factor)
    flat = x.reshape(-1, E)
    if router == "deepseek_v3" and router_dtype is not None:
        logits = flat.astype(router_dtype) @ router_weight.astype(router_dtype).T
    else:
        logits = flat @ router_weight.T
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
    weights = weights.astype(x.dtype)
    if cf is None:
        kept = np.ones(indices.shape, dtype=bool)
    else:
        C = expert_capacity(flat.shape[0], N, indices.shape[1], cf)
        kept = capacity_keep(indices, N, C)
    y = experts_forward(
        flat,
        indices,
        np.where(kept, weights, 0.0),
        gate_up,
        down,
        implementation=implementation,
    )
    if shared:
        y = y + _ffn(flat, np.asarray(shared_gate_up), np.asarray(shared_down))
    return MoEOutput(y.reshape(x.shape), logits, weights, indices, kept)


def load_balancing_loss(logits, indices, *, alpha=1.0):
    r"""Switch Transformer's auxiliary loss :math:`\alpha N \sum_i f_i P_i`.

    :math:`f_i` is the fraction of tokens sent to expert ``i`` (with ``k`` choices per
    token, assignments per token, so the :math:`f_i` sum to ``k``, as Hugging Face's
    ``load_balancing_loss_func`` counts them), :math:`P_i` the mean router probability
    (softmax of ``logits``). Balanced routing gives :math:`\alpha k`; only
    :math:`P_i` carries a gradient.
    """
    logits, indices = np.asarray(logits), np.asarray(indices)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(logits.shape, "logits")
    _moe.check_indices(indices.shape)
    T, N = logits.shape
    if indices.shape[0] != T:
        raise ValueError(f"indices must have {T} rows as logits, got {indices.shape}")
    # [book: switch loss]
    f = np.bincount(indices.reshape(-1), minlength=N) / T  # share of tokens (no grad)
    P = _softmax(logits).mean(axis=0)  # mean router probability (carries the grad)
    return alpha * N * np.sum(f * P)
    # [/book: switch loss]


def router_z_loss(logits):
    r"""ST-MoE's router z-loss :math:`\frac1T \sum_t (\log \sum_i e^{s_{t,i}})^2`:
    keeps the logits small, which keeps the softmax's rounding small."""
    logits = np.asarray(logits)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(logits.shape, "logits")
    m = logits.max(axis=-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))
    return np.mean(lse**2)


def balance_bias_update(bias, indices, *, gamma=0.001):
    r"""DeepSeek-V3's auxiliary-loss-free balancing: the new bias
    :math:`b_i + \gamma \operatorname{sign}(\bar c - c_i)`, with :math:`c_i` the
    assignments expert ``i`` received this step and :math:`\bar c` their mean.

    An overloaded expert's bias falls, an underloaded one's rises; the bias only
    changes which experts are chosen, never the gate values. ``bias`` is not modified.
    """
    bias = np.asarray(bias)
    _checks.check_float("bias", bias.dtype)
    if bias.ndim != 1:
        raise ValueError(f"bias must be 1-D (num_experts,), got shape {bias.shape}")
    _moe.check_gamma(gamma)
    # [book: bias update]
    load = expert_load(indices, bias.shape[0]).astype(bias.dtype)  # c_i
    return bias + gamma * np.sign(load.mean() - load)  # overloaded: down
    # [/book: bias update]
