"""Mixture of experts (issue 25): the float64 numpy oracle, the torch and TensorFlow
backends against it, dispatch (loop = grouped, values and gradients), balance
(Switch's loss, ST-MoE's z-loss, DeepSeek-V3's bias), capacity, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion import _moe
from companion.numpy import moe as nm
from companion.testing import as_backend, assert_close, numerical_gradient, to_numpy

F64 = {"rtol": 1e-10, "atol": 1e-12}
BACKENDS = ["numpy", "torch", "tensorflow"]


def _module(backend):
    if backend == "numpy":
        return nm
    if backend == "torch":
        pytest.importorskip("torch")
        from companion.torch import moe
    else:
        pytest.importorskip("tensorflow")
        from companion.tensorflow import moe
    return moe


def _tensor(x, backend):
    return None if x is None else as_backend(np.asarray(x), backend)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer(seed, T=24, E=8, N=8, intermediate=6, shared=0):
    rng = np.random.default_rng(seed)
    w = {
        "x": rng.standard_normal((T, E)),
        "router_weight": rng.standard_normal((N, E)),
        "gate_up": rng.standard_normal((N, 2 * intermediate, E)) * 0.4,
        "down": rng.standard_normal((N, E, intermediate)) * 0.4,
    }
    if shared:
        w["shared_gate_up"] = rng.standard_normal((2 * shared * intermediate, E)) * 0.4
        w["shared_down"] = rng.standard_normal((E, shared * intermediate)) * 0.4
    return w


ROUTERS = {
    "switch": {"top_k": 1, "router": "switch"},
    "mixtral": {"top_k": 2, "router": "mixtral"},
    "qwen3_moe": {"top_k": 3, "router": "qwen3_moe", "normalize": False},
    "deepseek_v3": {
        "top_k": 3,
        "router": "deepseek_v3",
        "num_groups": 4,
        "topk_groups": 2,
        "routed_scaling_factor": 2.5,
    },
}


# --- the router's conventions (oracle) ----------------------------------------------


def test_mixtral_weights_are_softmax_over_chosen_logits():
    logits = np.random.default_rng(0).standard_normal((30, 8)) * 3
    weights, indices = nm.route(logits, 2, router="mixtral")
    chosen = np.take_along_axis(logits, indices, axis=-1)
    assert_close(weights, _softmax(chosen), **F64)
    # the chosen are the two largest logits, best first
    assert np.array_equal(indices, np.argsort(-logits, axis=-1)[:, :2])


def test_switch_gate_is_the_top_probability_unnormalised():
    logits = np.random.default_rng(1).standard_normal((30, 8))
    weights, indices = nm.route(logits, 1, router="switch")
    p = _softmax(logits)
    assert_close(weights[:, 0], p.max(axis=-1), **F64)
    assert np.array_equal(indices[:, 0], p.argmax(axis=-1))
    assert np.all(weights < 1)


def test_qwen3_normalize_switch():
    logits = np.random.default_rng(2).standard_normal((30, 8))
    raw, i1 = nm.route(logits, 3, router="qwen3_moe", normalize=False)
    norm, i2 = nm.route(logits, 3, router="qwen3_moe", normalize=True)
    assert np.array_equal(i1, i2)
    assert_close(norm, raw / raw.sum(axis=-1, keepdims=True), **F64)
    assert_close(raw, np.take_along_axis(_softmax(logits), i1, axis=-1), **F64)


def test_deepseek_v3_group_limited_routing_by_brute_force():
    """Node-limited routing: the chosen experts are the top-k of the experts in the
    topk_groups groups with the best top-2 sums (bias included); the gates are the
    sigmoid affinities (bias excluded) normalised, times the scaling factor."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((40, 16)) * 2
    bias = rng.standard_normal(16) * 0.3
    weights, indices = nm.route(
        logits,
        4,
        router="deepseek_v3",
        bias=bias,
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
    )
    a = 1 / (1 + np.exp(-logits))
    for t in range(40):
        c = a[t] + bias
        group_score = [sum(sorted(c[4 * g : 4 * g + 4])[-2:]) for g in range(4)]
        best_groups = sorted(range(4), key=lambda g: -group_score[g])[:2]
        allowed = [e for g in best_groups for e in range(4 * g, 4 * g + 4)]
        expected = sorted(allowed, key=lambda e: -c[e])[:4]
        assert list(indices[t]) == expected
        g = a[t, expected]
        assert_close(weights[t], 2.5 * g / g.sum(), **F64)
    assert_close(weights.sum(axis=-1), np.full(40, 2.5), **F64)


def test_bias_changes_the_choice_not_the_gates():
    logits = np.random.default_rng(4).standard_normal((50, 8))
    bias = np.zeros(8)
    bias[0] = 10.0  # expert 0 chosen by every token
    w, i = nm.route(logits, 2, router="deepseek_v3", bias=bias)
    assert np.all(i[:, 0] == 0)
    a = 1 / (1 + np.exp(-logits))
    g = np.take_along_axis(a, i, axis=-1)
    assert_close(w, g / g.sum(axis=-1, keepdims=True), **F64)


def test_router_dtype_float32_rounds_only_the_affinities():
    """``router_dtype="float32"`` (Hugging Face's habit) gives float64 weights within
    float32 rounding of the float64 router's, the same experts here, and the same
    weights as torch's float32 softmax to float32 precision."""
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    logits = np.random.default_rng(20).standard_normal((40, 8))
    w64, i64 = nm.route(logits, 2, router="mixtral")
    w32, i32 = nm.route(logits, 2, router="mixtral", router_dtype="float32")
    assert w32.dtype == np.float64
    assert np.array_equal(i32, i64)
    assert_close(w32, w64, rtol=1e-6, atol=1e-7)
    assert np.abs(w32 - w64).max() > 0  # float32 did round
    wt, it = tm.route(torch.from_numpy(logits), 2, router_dtype="float32")
    assert np.array_equal(it.numpy(), i32)
    assert_close(wt, w32, rtol=1e-6, atol=1e-7)


# --- backends against the oracle ----------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_matches_oracle(backend, name):
    m = _module(backend)
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((33, 8))
    bias = rng.standard_normal(8) * 0.2 if name == "deepseek_v3" else None
    kw = dict(ROUTERS[name])
    top_k = kw.pop("top_k")
    w0, i0 = nm.route(logits, top_k, bias=bias, **kw)
    w1, i1 = m.route(_tensor(logits, backend), top_k, bias=_tensor(bias, backend), **kw)
    assert np.array_equal(to_numpy(i1), i0)
    assert_close(w1, w0, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_layer_matches_oracle(backend, name, capacity_factor):
    """Every backend, both implementations, equal to the oracle's loop; with shared
    experts for DeepSeek-V3 and token dropping at capacity factor 0.75."""
    m = _module(backend)
    shared = 2 if name == "deepseek_v3" else 0
    w = _layer(6, shared=shared)
    kw = dict(ROUTERS[name])
    top_k = kw.pop("top_k")
    if shared:
        kw["num_shared_experts"] = shared
        kw["bias"] = np.random.default_rng(7).standard_normal(8) * 0.2
    ref = nm.moe_layer(
        w["x"],
        w["router_weight"],
        w["gate_up"],
        w["down"],
        top_k,
        shared_gate_up=w.get("shared_gate_up"),
        shared_down=w.get("shared_down"),
        capacity_factor=capacity_factor,
        **kw,
    )
    if capacity_factor is not None:
        assert not ref.kept.all()  # something was dropped
    kw_b = {k: (_tensor(v, backend) if k == "bias" else v) for k, v in kw.items()}
    for implementation in ("loop", "grouped"):
        out = m.moe_layer(
            _tensor(w["x"], backend),
            _tensor(w["router_weight"], backend),
            _tensor(w["gate_up"], backend),
            _tensor(w["down"], backend),
            top_k,
            shared_gate_up=_tensor(w.get("shared_gate_up"), backend),
            shared_down=_tensor(w.get("shared_down"), backend),
            capacity_factor=capacity_factor,
            implementation=implementation,
            **kw_b,
        )
        assert np.array_equal(to_numpy(out.indices), ref.indices)
        assert np.array_equal(to_numpy(out.kept), ref.kept)
        assert_close(out.logits, ref.logits, **F64)
        assert_close(out.weights, ref.weights, **F64)
        assert_close(out.output, ref.output, **F64)


def test_oracle_equals_a_token_by_token_sum():
    """The layer is sum_i g_i FFN_i(x) + shared(x), token by token."""
    w = _layer(8, shared=1)
    out = nm.moe_layer(
        w["x"],
        w["router_weight"],
        w["gate_up"],
        w["down"],
        3,
        router="deepseek_v3",
        num_shared_experts=1,
        shared_gate_up=w["shared_gate_up"],
        shared_down=w["shared_down"],
    )

    def ffn(x, gu, d):
        h = gu @ x
        half = len(h) // 2
        return d @ (h[:half] / (1 + np.exp(-h[:half])) * h[half:])

    for t in range(w["x"].shape[0]):
        x = w["x"][t]
        y = sum(
            out.weights[t, j] * ffn(x, w["gate_up"][e], w["down"][e])
            for j, e in enumerate(out.indices[t])
        )
        y = y + ffn(x, w["shared_gate_up"], w["shared_down"])
        assert_close(out.output[t], y, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_equals_loop_with_repeated_and_unused_experts(backend):
    m = _module(backend)
    rng = np.random.default_rng(9)
    w = _layer(9, T=10)
    indices = rng.integers(0, 3, size=(10, 2))  # experts 3..7 unused
    weights = rng.random((10, 2))
    args = [
        _tensor(v, backend) for v in (w["x"], indices, weights, w["gate_up"], w["down"])
    ]
    loop = m.experts_forward(*args, implementation="loop")
    grouped = m.experts_forward(*args, implementation="grouped")
    assert_close(grouped, loop, **F64)
    assert_close(
        loop,
        nm.experts_forward(w["x"], indices, weights, w["gate_up"], w["down"]),
        **F64,
    )


# --- gradients (torch autograd) -----------------------------------------------------


def test_torch_gradients_grouped_equal_loop_and_finite_differences():
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    w = _layer(10, T=12, shared=1)
    grads = {}
    for implementation in ("loop", "grouped"):
        t = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
        out = tm.moe_layer(
            t["x"],
            t["router_weight"],
            t["gate_up"],
            t["down"],
            3,
            router="deepseek_v3",
            num_shared_experts=1,
            shared_gate_up=t["shared_gate_up"],
            shared_down=t["shared_down"],
            capacity_factor=1.0,
            implementation=implementation,
        )
        (out.output.square().sum() + out.output.sum()).backward()
        grads[implementation] = {k: v.grad for k, v in t.items()}
    for k in w:
        assert grads["loop"][k].abs().sum() > 0, k
        assert_close(grads["grouped"][k], grads["loop"][k], **F64)

    # the router's gradient (through the gates) against central differences of the
    # float64 oracle; the choices do not move for a step of 1e-6
    def loss(router_weight):
        y = nm.moe_layer(
            w["x"],
            router_weight,
            w["gate_up"],
            w["down"],
            3,
            router="deepseek_v3",
            num_shared_experts=1,
            shared_gate_up=w["shared_gate_up"],
            shared_down=w["shared_down"],
            capacity_factor=1.0,
        ).output
        return float((y**2).sum() + y.sum())

    numeric = numerical_gradient(loss, w["router_weight"])
    assert_close(grads["grouped"]["router_weight"], numeric, rtol=1e-6, atol=1e-7)


# --- balance ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_balancing_loss_formula_and_minimum(backend):
    m = _module(backend)
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((64, 8))
    _, indices = nm.route(logits, 2, router="mixtral")
    f = np.bincount(indices.reshape(-1), minlength=8) / 64
    P = _softmax(logits).mean(axis=0)
    expected = 0.01 * 8 * np.sum(f * P)
    ours = m.load_balancing_loss(
        _tensor(logits, backend), _tensor(indices, backend), alpha=0.01
    )
    assert_close(ours, expected, **F64)
    # uniform probabilities and an even split: alpha * k, the minimum
    flat = np.zeros((64, 8))
    even = np.stack([np.arange(64) % 8, (np.arange(64) + 1) % 8], axis=1)
    balanced = m.load_balancing_loss(
        _tensor(flat, backend), _tensor(even, backend), alpha=0.01
    )
    assert_close(balanced, 0.02, **F64)
    skewed = np.zeros((64, 2), dtype=np.int64)
    skewed[:, 1] = 1
    skewed_logits = np.zeros((64, 8))
    skewed_logits[:, :2] = 3.0
    assert (
        float(
            to_numpy(
                m.load_balancing_loss(
                    _tensor(skewed_logits, backend),
                    _tensor(skewed, backend),
                    alpha=0.01,
                )
            )
        )
        > 0.02 * 3
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_z_loss(backend):
    m = _module(backend)
    logits = np.random.default_rng(12).standard_normal((20, 8)) * 5
    expected = np.mean(np.log(np.exp(logits).sum(axis=-1)) ** 2)
    assert_close(m.router_z_loss(_tensor(logits, backend)), expected, **F64)


def test_torch_loss_gradients_equal_finite_differences():
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    logits = np.random.default_rng(13).standard_normal((16, 4))
    _, indices = nm.route(logits, 1, router="switch")
    t = torch.tensor(logits, requires_grad=True)
    (
        tm.load_balancing_loss(t, torch.from_numpy(indices), alpha=0.1)
        + 0.001 * tm.router_z_loss(t)
    ).backward()
    numeric = numerical_gradient(
        lambda z: (
            nm.load_balancing_loss(z, indices, alpha=0.1) + 0.001 * nm.router_z_loss(z)
        ),
        logits,
    )
    assert_close(t.grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_balance_bias_update_step(backend):
    m = _module(backend)
    bias = np.zeros(4)
    indices = np.array([[0, 1], [0, 2], [0, 1], [0, 3]])  # loads 4, 2, 1, 1; mean 2
    b = _tensor(bias, backend)
    new = m.balance_bias_update(b, _tensor(indices, backend), gamma=0.5)
    assert_close(new, [-0.5, 0.0, 0.5, 0.5], **F64)
    assert np.array_equal(to_numpy(b), bias)  # the input is not modified


def test_bias_updates_balance_a_skewed_router():
    """DeepSeek-V3's loss-free balancing: a router that favours two experts is evened
    out by the bias alone (float64, one fixed batch, gamma = 0.003). The sign step
    makes the loads oscillate around the mean: measured, the busiest expert stays
    within 3.2% of the mean over steps 500-600 (10.9% with gamma = 0.01)."""
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((512, 8))
    logits[:, :2] += 1.5
    bias = np.zeros(8)
    mean = 512 * 2 / 8
    busiest = []
    for _ in range(600):
        _, indices = nm.route(logits, 2, router="deepseek_v3", bias=bias)
        busiest.append(nm.expert_load(indices, 8).max() / mean)
        bias = nm.balance_bias_update(bias, indices, gamma=0.003)
    assert busiest[0] > 2.5
    assert max(busiest[500:]) < 1.05
    assert bias[:2].max() < 0 < bias[2:].min()


# --- capacity ---------------------------------------------------------------------


def test_expert_capacity():
    assert nm.expert_capacity(64, 8, 1, 1.0) == 8
    assert nm.expert_capacity(64, 8, 2, 1.25) == 20
    assert nm.expert_capacity(10, 4, 1, 1.0) == math.ceil(2.5)
    assert nm.expert_capacity(100, 10, 1, 1.1) == 11  # not 12 from 1.1's binary excess
    assert nm.expert_capacity(100, 10, 1, 1.11) == 12


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_capacity_keep_matches_the_oracle_loop(backend):
    m = _module(backend)
    indices = np.random.default_rng(15).integers(0, 5, size=(40, 2))
    for capacity in (0, 3, 9, 80):
        ref = nm.capacity_keep(indices, 5, capacity)
        ours = m.capacity_keep(_tensor(indices, backend), 5, capacity)
        assert np.array_equal(to_numpy(ours), ref)
        loads = nm.expert_load(indices, 5, ref)
        assert loads.max() <= capacity


def test_first_choices_fill_before_second_choices():
    indices = np.array([[0, 1], [1, 0], [0, 1]])
    kept = nm.capacity_keep(indices, 2, 2)
    # expert 0: token 0's and token 2's first choices fill it; token 1's second choice
    # is dropped although token 1 comes before token 2
    assert kept.tolist() == [[True, True], [True, False], [True, False]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_token_is_carried_by_the_residual(backend):
    """All tokens want expert 0; capacity 2 keeps the first two; the others' MoE
    output is exactly 0, so x + moe(x) = x for them."""
    m = _module(backend)
    w = _layer(16, T=8, N=4)
    x = np.abs(w["x"])
    router_weight = np.zeros((4, 8))
    router_weight[0] = 1.0  # expert 0's logit is sum(|x|) > 0, the others 0
    out = m.moe_layer(
        _tensor(x, backend),
        _tensor(router_weight, backend),
        _tensor(w["gate_up"], backend),
        _tensor(w["down"], backend),
        1,
        router="switch",
        capacity_factor=1.0,  # ceil(8 / 4) = 2 slots
        implementation="grouped",
    )
    kept = to_numpy(out.kept)[:, 0]
    assert kept.tolist() == [True, True] + [False] * 6
    y = to_numpy(out.output)
    assert np.all(y[2:] == 0.0)
    assert np.all(np.abs(y[:2]).sum(axis=-1) > 0)
    assert np.array_equal(x[2:] + y[2:], x[2:])


# --- the torch module ---------------------------------------------------------------


def test_torch_module_forward_and_bias_update():
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    torch.manual_seed(0)
    layer = tm.MoELayer(
        8,
        6,
        8,
        2,
        router="deepseek_v3",
        num_shared_experts=1,
        num_groups=4,
        topk_groups=2,
        dtype=torch.float64,
    )
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = layer(x)
    ref = tm.moe_layer(
        x,
        layer.router,
        layer.gate_up,
        layer.down,
        2,
        router="deepseek_v3",
        bias=layer.bias,
        num_groups=4,
        topk_groups=2,
        num_shared_experts=1,
        shared_gate_up=layer.shared_gate_up,
        shared_down=layer.shared_down,
        implementation="loop",
    )
    assert y.shape == x.shape
    assert_close(y, ref.output, **F64)
    y.sum().backward()
    assert layer.router.grad.abs().sum() > 0
    load = tm.expert_load(layer.last_routing.indices, 8).double()
    layer.update_bias(gamma=0.1)
    assert_close(layer.bias, 0.1 * torch.sign(load.mean() - load), **F64)


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    m = _module(backend)
    w = _layer(17)
    args = [_tensor(w[k], backend) for k in ("x", "router_weight", "gate_up", "down")]
    with pytest.raises(ValueError, match="top_k"):
        m.moe_layer(*args, 9)
    with pytest.raises(ValueError, match="top_k"):
        m.route(_tensor(w["x"], backend), 9)
    with pytest.raises(ValueError, match="capacity_factor"):
        m.moe_layer(*args, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        m.moe_layer(*args, 2, capacity_factor=-1.0)
    bad_down = _tensor(w["down"][:, :, :5], backend)
    with pytest.raises(ValueError, match="down"):
        m.moe_layer(*args[:3], bad_down, 2)
    with pytest.raises(ValueError, match="shared_gate_up"):
        m.moe_layer(*args, 2, router="deepseek_v3", num_shared_experts=1)
    with pytest.raises(ValueError, match="router_weight"):
        m.moe_layer(args[0], args[1][:7], *args[2:], 2)
    with pytest.raises(ValueError, match="router"):
        m.moe_layer(*args, 2, router="gshard")
    with pytest.raises(ValueError, match="top_k"):
        m.moe_layer(*args, 2, router="switch")
    with pytest.raises(ValueError, match="num_groups"):
        m.moe_layer(*args, 2, router="deepseek_v3", num_groups=3)
    with pytest.raises(ValueError, match="bias"):
        m.moe_layer(*args, 2, router="deepseek_v3", bias=_tensor(np.zeros(7), backend))
    with pytest.raises(ValueError, match="implementation"):
        m.moe_layer(*args, 2, implementation="fast")
    with pytest.raises(ValueError, match="gamma"):
        m.balance_bias_update(
            _tensor(np.zeros(8), backend),
            _tensor(np.zeros((2, 1), dtype=np.int64), backend),
            gamma=0,
        )
    with pytest.raises(TypeError, match="x"):
        m.moe_layer(_tensor(np.ones((3, 8), dtype=np.int64), backend), *args[1:], 2)


def test_bad_capacity_and_module_arguments():
    with pytest.raises(ValueError, match="capacity_factor"):
        _moe.expert_capacity(8, 4, 1, 0)
    with pytest.raises(ValueError, match="top_k"):
        _moe.expert_capacity(8, 4, 5, 1.0)
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    with pytest.raises(ValueError, match="top_k"):
        tm.MoELayer(8, 4, 4, 5)
    with pytest.raises(ValueError, match="capacity_factor"):
        tm.MoELayer(8, 4, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="forward pass"):
        tm.MoELayer(8, 4, 4, 2, router="deepseek_v3").update_bias()
    mixtral = tm.MoELayer(8, 4, 4, 2, dtype=torch.float64)
    mixtral(torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="router='deepseek_v3'"):
        mixtral.update_bias()  # its forward never reads the bias


# --- grouped dispatch: every load the fast path meets (issue 28) ---------------------

LOADS = {
    # name: (T, N, top_k, how the experts are chosen)
    "balanced": (40, 8, 2, "uniform"),
    "skewed": (40, 8, 2, "skewed"),  # most assignments to expert 0, one expert empty
    "top1": (33, 5, 1, "uniform"),
    "top4-empty-expert": (29, 7, 4, "no-expert-3"),
    "one-expert": (9, 1, 1, "uniform"),
}


def _assignments(seed, T, N, k, how):
    """``(T, k)`` distinct experts per token, drawn to give the named load."""
    rng = np.random.default_rng(seed)
    scores = rng.random((T, N))
    if how == "skewed":
        scores[:, 0] += 1.0  # every token's first choice
        scores[:, N - 1] = -1.0  # never chosen
    elif how == "no-expert-3":
        scores[:, 3] = -1.0
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunk_rows", [2048, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("widths", [(8, 4), (6, 5)], ids=["E8-I4", "E6-I5"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("load", sorted(LOADS))
def test_torch_grouped_equals_loop_values_and_gradients(
    load, dtype, widths, chunk_rows, monkeypatch
):
    """Outputs and the gradients of x, the gates and both expert stacks: grouped =
    loop, in float32 (torch's grouped matrix product where widths are multiples of 4;
    one product per expert where not) and float64 (one product per expert), in one
    grouped product and split in runs of experts; a gate of 0 (a dropped assignment)
    contributes exactly 0."""
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    monkeypatch.setattr(tm, "_CHUNK_ROWS", chunk_rows)
    E, intermediate = widths
    grouped_calls = []
    if tm._GROUPED_MM is not None:  # count the grouped products that really ran
        real = tm._GROUPED_MM
        monkeypatch.setattr(
            tm,
            "_GROUPED_MM",
            lambda *a, **kw: grouped_calls.append(1) or real(*a, **kw),
        )
    T, N, k, how = LOADS[load]
    indices = _assignments(len(load), T, N, k, how)
    w = _layer(len(load), T=T, E=E, N=N, intermediate=intermediate)
    rng = np.random.default_rng(3)
    gates = rng.random((T, k))
    gates[::4, -1] = 0.0  # dropped assignments
    load_seen = np.bincount(indices.reshape(-1), minlength=N)
    if how == "skewed":
        assert load_seen[0] == T and load_seen[N - 1] == 0
    tol = {} if dtype == "float32" else F64
    results = {}
    for implementation in ("loop", "grouped"):
        t = {
            name: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True)
            for name, v in [
                ("x", w["x"]),
                ("gates", gates),
                ("gate_up", w["gate_up"]),
                ("down", w["down"]),
            ]
        }
        out = tm.experts_forward(
            t["x"],
            torch.tensor(indices),
            t["gates"],
            t["gate_up"],
            t["down"],
            implementation=implementation,
        )
        (out.square().sum() + out.sum()).backward()
        results[implementation] = (out, {n: v.grad for n, v in t.items()})
    if tm._GROUPED_MM is not None:  # torch's grouped product where it applies
        assert bool(grouped_calls) == (dtype == "float32" and widths == (8, 4))
    out, grads = results["grouped"]
    assert out.dtype == getattr(torch, dtype)
    assert_close(out, results["loop"][0], **tol, name="output")
    for name, grad in grads.items():
        assert_close(grad, results["loop"][1][name], **tol, name=f"d {name}")
    if N > 1:  # an expert no token chose gets no gradient, exactly
        empty = np.flatnonzero(load_seen == 0)
        assert (grads["gate_up"][empty] == 0).all() and (
            grads["down"][empty] == 0
        ).all()
    oracle = nm.experts_forward(w["x"], indices, gates, w["gate_up"], w["down"])
    assert_close(out, oracle, **tol, name="grouped vs float64 oracle")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("load", sorted(LOADS))
def test_numpy_grouped_equals_loop_for_every_load(load, dtype):
    T, N, k, how = LOADS[load]
    indices = _assignments(len(load), T, N, k, how)
    w = _layer(len(load), T=T, E=6, N=N, intermediate=5)
    gates = np.random.default_rng(4).random((T, k))
    gates[::4, -1] = 0.0
    args = [
        v.astype(dtype) if v.dtype.kind == "f" else v
        for v in (w["x"], indices, gates, w["gate_up"], w["down"])
    ]
    grouped = nm.experts_forward(*args, implementation="grouped")
    assert grouped.dtype == np.dtype(dtype)
    tol = {} if dtype == "float32" else F64
    assert_close(grouped, nm.experts_forward(*args, implementation="loop"), **tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_grouped_capacity_dropping_equals_loop(dtype, monkeypatch):
    """A layer with capacity 0.5 (tokens dropped) and top 2 of 6, through the grouped
    path split in runs: equal to the loop, values and gradients."""
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    monkeypatch.setattr(tm, "_CHUNK_ROWS", 5)
    w = _layer(12, T=30, E=8, N=6, intermediate=4)
    runs = {}
    for implementation in ("loop", "grouped"):
        t = {
            k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True)
            for k, v in w.items()
        }
        out = tm.moe_layer(
            t["x"],
            t["router_weight"],
            t["gate_up"],
            t["down"],
            2,
            capacity_factor=0.5,
            implementation=implementation,
        )
        out.output.square().sum().backward()
        runs[implementation] = (out, {k: v.grad for k, v in t.items()})
    assert not runs["grouped"][0].kept.all()  # some assignments were dropped
    tol = {} if dtype == "float32" else F64
    assert_close(runs["grouped"][0].output, runs["loop"][0].output, **tol)
    for k in w:
        assert_close(runs["grouped"][1][k], runs["loop"][1][k], **tol, name=k)


def test_torch_grouped_chunks_cover_every_row_once():
    pytest.importorskip("torch")
    from companion.torch.moe import _chunks

    ends = [3, 3, 10, 10, 11, 30, 30]  # experts 1, 3 and 6 empty; expert 5 large
    # a run closes once it holds >= 4 rows; the empty last expert makes no run
    assert _chunks(ends, 4) == [(0, 3, 0, 10), (3, 6, 10, 30)]
    for rows in (1, 2, 4, 8, 30, 100):
        runs = _chunks(ends, rows)
        assert [r[2] for r in runs[1:]] == [r[3] for r in runs[:-1]]  # contiguous
        assert runs[0][2] == 0 and runs[-1][3] == 30 and all(r[3] > r[2] for r in runs)
        assert all(ends[e1 - 1] == r1 for _, e1, _, r1 in runs)  # whole experts
    assert _chunks([0, 0, 0], 4) == []
    assert _chunks([5], 2048) == [(0, 1, 0, 5)]


def test_bench_moe_section_runs_at_tiny_size():
    """The bench's MoE section (no timing asserted): every case and load ran, the
    skewed router is skewed, and the target ratios are the worst over the cases."""
    pytest.importorskip("torch")
    from companion.bench import moe as bench_moe

    results = bench_moe.run_all(bench_moe.TINY, progress=lambda line: None)
    cases = results["cases"]
    assert [(c["case"], c["load"]) for c in cases] == [
        ("tiny", "balanced"),
        ("tiny", "skewed"),
    ]
    assert cases[1]["heaviest_over_mean"] > cases[0]["heaviest_over_mean"]
    assert results["loop_over_grouped"] == min(c["loop_over_grouped"] for c in cases)
    assert results["grouped_over_dense"] == max(c["grouped_over_dense"] for c in cases)
    for c in cases:  # forward, and forward+backward for the two dispatches
        assert set(c["ms"]) == {
            "loop",
            "grouped",
            "dense",
            "loop fwd+bwd",
            "grouped fwd+bwd",
        }
    assert "loop/grouped fwd+bwd" in bench_moe.table(results)
