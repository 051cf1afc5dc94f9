"""Mixture of experts in TensorFlow: the router and the dispatch of
:mod:`companion.numpy.moe` (the float64 oracle, where the conventions are explained),
for TensorFlow tensors; the balance losses and capacity too, so that a notebook
switches backend by changing one import.

``implementation="grouped"`` sorts the assignments by expert once (``tf.argsort``,
stable), runs each expert on its contiguous slice and scatters back with one
``tf.math.unsorted_segment_sum``; ``"loop"`` is the readable per-expert reference.
"""

from __future__ import annotations

import tensorflow as tf

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
]

_DTYPES = {"float32": tf.float32, "float64": tf.float64}


def _top(scores, k):
    """The ``k`` largest per row, largest first; ties to the lower index."""
    return tf.argsort(scores, axis=-1, direction="DESCENDING", stable=True)[..., :k]


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
    logits = tf.convert_to_tensor(logits)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    s = _moe.check_router(
        int(logits.shape[1]),
        top_k,
        router,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
        normalize=normalize,
        router_dtype=router_dtype,
        bias_shape=None if bias is None else tuple(bias.shape),
    )
    z = logits if s.router_dtype is None else tf.cast(logits, _DTYPES[s.router_dtype])
    scores = tf.nn.softmax(z, axis=-1) if s.affinity == "softmax" else tf.sigmoid(z)
    choice = scores if bias is None else scores + tf.cast(bias, scores.dtype)
    T, N = int(logits.shape[0]), int(logits.shape[1])
    if s.num_groups > 1:
        grouped = tf.reshape(choice, (T, s.num_groups, N // s.num_groups))
        group_scores = tf.reduce_sum(tf.math.top_k(grouped, 2).values, axis=-1)
        groups = _top(group_scores, s.topk_groups)
        allowed = tf.reduce_any(
            tf.one_hot(groups, s.num_groups, on_value=True, off_value=False), axis=1
        )
        allowed = tf.repeat(allowed, N // s.num_groups, axis=-1)
        choice = tf.where(allowed, choice, tf.constant(-float("inf"), choice.dtype))
    indices = _top(tf.stop_gradient(choice), s.top_k)
    weights = tf.gather(scores, indices, batch_dims=1)
    if s.normalize:
        denominator = tf.reduce_sum(weights, axis=-1, keepdims=True)
        if s.affinity == "sigmoid":
            denominator = denominator + 1e-20  # as DeepSeek-V3's code
        weights = weights / denominator
    weights = weights * s.routed_scaling_factor
    return tf.cast(weights, logits.dtype), indices


def expert_load(indices, num_experts, kept=None):
    """As :func:`companion.numpy.expert_load`: ``(N,)`` assignments per expert."""
    indices = tf.convert_to_tensor(indices)
    _moe.check_indices(tuple(indices.shape))
    N = _checks.check_int("num_experts", num_experts)
    chosen = indices if kept is None else tf.boolean_mask(indices, kept)
    return tf.math.bincount(
        tf.cast(tf.reshape(chosen, [-1]), tf.int32), minlength=N, maxlength=N
    )


def capacity_keep(indices, num_experts, capacity):
    """As :func:`companion.numpy.capacity_keep`, without loops."""
    indices = tf.convert_to_tensor(indices)
    _moe.check_indices(tuple(indices.shape))
    N = _checks.check_int("num_experts", num_experts)
    C = _checks.check_int("capacity", capacity, minimum=0)
    T, k = int(indices.shape[0]), int(indices.shape[1])
    one_hot = tf.one_hot(tf.reshape(tf.transpose(indices), [-1]), N, dtype=tf.int32)
    slot = tf.reduce_sum(tf.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1
    return tf.transpose(tf.reshape(slot < C, (k, T)))


def _ffn(x, gate_up, down):
    h = tf.matmul(x, gate_up, transpose_b=True)
    gate, up = tf.split(h, 2, axis=-1)
    return tf.matmul(tf.nn.silu(gate) * up, down, transpose_b=True)


def experts_forward(x, indices, weights, gate_up, down, *, implementation="loop"):
    """As :func:`companion.numpy.experts_forward`."""
    x = tf.convert_to_tensor(x)
    indices = tf.convert_to_tensor(indices)
    weights = tf.cast(weights, x.dtype)
    _checks.check_float("x", x.dtype)
    N, E, _ = _moe.check_experts(
        tuple(x.shape), tuple(gate_up.shape), tuple(down.shape)
    )
    _moe.check_implementation(implementation)
    if len(x.shape) != 2:
        raise ValueError(f"x must be 2-D (tokens, E), got shape {tuple(x.shape)}")
    _moe.check_indices(tuple(indices.shape))
    if tuple(weights.shape) != tuple(indices.shape) or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must "
            f"both be ({x.shape[0]}, top_k)"
        )
    T = int(x.shape[0])
    if tf.size(indices) > 0 and (
        int(tf.reduce_min(indices)) < 0 or int(tf.reduce_max(indices)) >= N
    ):
        raise ValueError(
            f"indices must lie in [0, {N}), got {int(tf.reduce_min(indices))}.."
        )
    if implementation == "loop":
        out = tf.zeros_like(x)
        for e in range(N):
            where = tf.where(tf.equal(indices, e))
            if where.shape[0] == 0:
                continue
            tokens = where[:, 0]
            y = _ffn(tf.gather(x, tokens), gate_up[e], down[e])
            w = tf.gather_nd(weights, where)[:, None]
            out = out + tf.math.unsorted_segment_sum(y * w, tokens, T)
        return out
    flat = tf.reshape(indices, [-1])
    order = tf.argsort(flat, stable=True)
    tokens = order // int(indices.shape[1])
    counts = tf.math.bincount(tf.cast(flat, tf.int32), minlength=N, maxlength=N)
    rows = tf.split(tf.gather(x, tokens), counts.numpy().tolist())
    ys = [_ffn(r, gate_up[e], down[e]) for e, r in enumerate(rows) if r.shape[0]]
    ys = tf.concat(ys, axis=0) if ys else tf.zeros((0, E), x.dtype)
    w = tf.gather(tf.reshape(weights, [-1]), order)[:, None]
    return tf.math.unsorted_segment_sum(ys * w, tokens, T)


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
    x = tf.convert_to_tensor(x)
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
    flat = tf.reshape(x, (-1, E))
    if router == "deepseek_v3" and router_dtype is not None:
        rd = _DTYPES.get(router_dtype)
        if rd is None:
            _moe.check_router(N, top_k, router, router_dtype=router_dtype)
        logits = tf.matmul(
            tf.cast(flat, rd), tf.cast(router_weight, rd), transpose_b=True
        )
    else:
        logits = tf.matmul(flat, router_weight, transpose_b=True)
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
    weights = tf.cast(weights, x.dtype)
    if cf is None:
        kept = tf.ones(indices.shape, dtype=tf.bool)
    else:
        C = expert_capacity(int(flat.shape[0]), N, int(indices.shape[1]), cf)
        kept = capacity_keep(indices, N, C)
    y = experts_forward(
        flat,
        indices,
        tf.where(kept, weights, tf.zeros_like(weights)),
        gate_up,
        down,
        implementation=implementation,
    )
    if shared:
        y = y + _ffn(flat, shared_gate_up, shared_down)
    return MoEOutput(tf.reshape(y, tf.shape(x)), logits, weights, indices, kept)


def load_balancing_loss(logits, indices, *, alpha=1.0):
    """As :func:`companion.numpy.load_balancing_loss`."""
    logits = tf.convert_to_tensor(logits)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    _moe.check_indices(tuple(indices.shape))
    T, N = int(logits.shape[0]), int(logits.shape[1])
    if indices.shape[0] != T:
        raise ValueError(
            f"indices must have {T} rows as logits, got {tuple(indices.shape)}"
        )
    f = tf.cast(expert_load(indices, N), logits.dtype) / T
    P = tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=0)
    return alpha * N * tf.reduce_sum(f * P)


def router_z_loss(logits):
    """As :func:`companion.numpy.router_z_loss`."""
    logits = tf.convert_to_tensor(logits)
    _checks.check_float("logits", logits.dtype)
    _moe.check_indices(tuple(logits.shape), "logits")
    return tf.reduce_mean(tf.square(tf.reduce_logsumexp(logits, axis=-1)))


def balance_bias_update(bias, indices, *, gamma=0.001):
    """As :func:`companion.numpy.balance_bias_update`: a new tensor."""
    bias = tf.convert_to_tensor(bias)
    _checks.check_float("bias", bias.dtype)
    if len(bias.shape) != 1:
        raise ValueError(
            f"bias must be 1-D (num_experts,), got shape {tuple(bias.shape)}"
        )
    _moe.check_gamma(gamma)
    load = tf.cast(expert_load(indices, int(bias.shape[0])), bias.dtype)
    return bias + gamma * tf.sign(tf.reduce_mean(load) - load)
