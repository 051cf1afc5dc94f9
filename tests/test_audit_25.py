"""Audit of issue 25's "Bad input" list, in every backend that has the MoE layer.

``tests/test_moe.py::test_bad_input_names_the_argument`` checks one case of each item;
this file covers the rest of each item: every way the experts' shapes can disagree
(the number of experts, the intermediate width, the model width, the router's width,
the shared experts' shapes), capacity factors that are not finite positive numbers,
``top_k`` larger than the experts in the module and the capacity rule, and a router
for a configuration with shared experts given none of them (either half missing).
Each is a ``ValueError`` whose message names the argument and what was seen.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion import _moe

BACKENDS = ["numpy", "torch", "tensorflow"]
T, E, N, I = 10, 8, 6, 4


def _module(backend):
    if backend == "numpy":
        from companion.numpy import moe
    elif backend == "torch":
        pytest.importorskip("torch")
        from companion.torch import moe
    else:
        pytest.importorskip("tensorflow")
        from companion.tensorflow import moe
    return moe


def _tensor(x, backend):
    if backend == "torch":
        import torch

        return torch.as_tensor(x)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(x)
    return x


def _weights(seed=0, shared=0):
    rng = np.random.default_rng(seed)
    w = {
        "x": rng.standard_normal((T, E)),
        "router_weight": rng.standard_normal((N, E)),
        "gate_up": rng.standard_normal((N, 2 * I, E)),
        "down": rng.standard_normal((N, E, I)),
    }
    if shared:
        w["shared_gate_up"] = rng.standard_normal((2 * shared * I, E))
        w["shared_down"] = rng.standard_normal((E, shared * I))
    return w


ARGS = ("x", "router_weight", "gate_up", "down")

# (which weight to replace, its new shape, the argument the message must name,
#  a piece of the shape seen that the message must show)
MISMATCHED_EXPERTS = [
    ("down", (N - 1, E, I), "down", f"{(N - 1, E, I)}"),  # expert counts differ
    ("down", (N, E, I + 1), "down", f"{(N, E, I + 1)}"),  # intermediate differs
    ("down", (N, E + 1, I), "down", f"{(N, E + 1, I)}"),  # model width differs
    ("gate_up", (N, 2 * I + 1, E), "gate_up", f"{(N, 2 * I + 1, E)}"),  # odd 2 I
    ("gate_up", (N, 2 * I), "gate_up", f"{(N, 2 * I)}"),  # not 3-D
    ("down", (N, E), "down", f"{(N, E)}"),  # not 3-D
    ("x", (T, E + 2), "x", f"{(T, E + 2)}"),  # x is not the experts' width
    ("router_weight", (N + 1, E), "router_weight", f"{N + 1}"),  # router rows
    ("router_weight", (N, E + 1), "router_weight", f"{E + 1}"),  # router width
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, shape, argument, seen",
    MISMATCHED_EXPERTS,
    ids=[f"{m[0]}-{'x'.join(map(str, m[1]))}" for m in MISMATCHED_EXPERTS],
)
def test_mismatched_expert_shapes_name_the_argument(
    backend, name, shape, argument, seen
):
    m = _module(backend)
    w = _weights()
    w[name] = np.random.default_rng(1).standard_normal(shape)
    args = [_tensor(w[k], backend) for k in ARGS]
    with pytest.raises(ValueError, match=argument) as error:
        m.moe_layer(*args, 2)
    assert seen in str(error.value), str(error.value)


SHARED_BAD = [
    # (num_shared_experts, shared_gate_up shape, shared_down shape, argument)
    (1, (2 * I, E + 1), (E, I), "shared_gate_up"),  # the wrong model width
    (1, (2 * I,), (E, I), "shared_gate_up"),  # not 2-D
    (2, (2 * 3, E), (E, 3), "shared_gate_up"),  # I_s = 3 not a multiple of 2
    (1, (2 * I, E), (E, I + 1), "shared_down"),  # down does not match gate_up
    (1, (2 * I, E), (E + 1, I), "shared_down"),
    (0, (2 * I, E), (E, I), "num_shared_experts"),  # weights for no shared expert
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared, gu_shape, down_shape, argument", SHARED_BAD)
def test_mismatched_shared_expert_shapes_name_the_argument(
    backend, shared, gu_shape, down_shape, argument
):
    m = _module(backend)
    w = _weights()
    rng = np.random.default_rng(2)
    args = [_tensor(w[k], backend) for k in ARGS]
    with pytest.raises(ValueError, match=argument):
        m.moe_layer(
            *args,
            2,
            router="deepseek_v3",
            num_shared_experts=shared,
            shared_gate_up=_tensor(rng.standard_normal(gu_shape), backend),
            shared_down=_tensor(rng.standard_normal(down_shape), backend),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing", ["shared_gate_up", "shared_down", "both"])
def test_shared_expert_config_given_no_shared_experts(backend, missing):
    """A router for a configuration with shared experts given none: the message names
    the missing argument(s) and the configuration that asked for them."""
    m = _module(backend)
    w = _weights(shared=2)
    args = [_tensor(w[k], backend) for k in ARGS]
    given = {
        k: _tensor(w[k], backend)
        for k in ("shared_gate_up", "shared_down")
        if missing not in (k, "both")
    }
    for router in ("deepseek_v3", "qwen3_moe"):
        with pytest.raises(ValueError, match="shared_gate_up and shared_down") as err:
            m.moe_layer(*args, 2, router=router, num_shared_experts=2, **given)
        assert "num_shared_experts=2" in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "capacity_factor", [0, 0.0, -0.5, float("nan"), float("inf"), True, "1.25"]
)
def test_capacity_factor_not_a_finite_positive_number(backend, capacity_factor):
    m = _module(backend)
    w = _weights()
    args = [_tensor(w[k], backend) for k in ARGS]
    with pytest.raises(ValueError, match="capacity_factor") as error:
        m.moe_layer(*args, 2, capacity_factor=capacity_factor)
    assert repr(capacity_factor) in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [N + 1, 100])
def test_top_k_larger_than_the_expert_count_shows_both(backend, top_k):
    m = _module(backend)
    w = _weights()
    args = [_tensor(w[k], backend) for k in ARGS]
    for router in ("mixtral", "qwen3_moe", "deepseek_v3"):
        with pytest.raises(ValueError, match=f"top_k={top_k}") as error:
            m.moe_layer(*args, top_k, router=router)
        assert f"experts {N}" in str(error.value)
        with pytest.raises(ValueError, match=f"top_k={top_k}"):
            m.route(_tensor(w["x"][:, :N], backend), top_k, router=router)


def test_capacity_rule_and_module_refuse_the_same_inputs():
    with pytest.raises(ValueError, match="top_k=7"):
        _moe.expert_capacity(T, N, 7, 1.0)
    for c in (0, -1.0, float("nan"), None):
        with pytest.raises(ValueError, match="capacity_factor"):
            _moe.expert_capacity(T, N, 2, c)
    torch = pytest.importorskip("torch")
    from companion.torch import moe as tm

    with pytest.raises(ValueError, match="top_k=7"):
        tm.MoELayer(E, I, N, 7)
    with pytest.raises(ValueError, match="capacity_factor"):
        tm.MoELayer(E, I, N, 2, capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="num_shared_experts"):
        tm.MoELayer(E, I, N, 2, router="deepseek_v3", num_shared_experts=-1)
    # the module builds its own shared experts: a configuration with them has them
    layer = tm.MoELayer(
        E, I, N, 2, router="deepseek_v3", num_shared_experts=2, dtype=torch.float64
    )
    out = layer(torch.zeros(3, E, dtype=torch.float64))
    assert tuple(out.shape if torch.is_tensor(out) else out.output.shape)[-1] == E


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_calls_leave_the_inputs_unchanged(backend):
    m = _module(backend)
    w = _weights(shared=1)
    before = {k: v.copy() for k, v in w.items()}
    args = [_tensor(w[k], backend) for k in ARGS]
    with pytest.raises(ValueError):
        m.moe_layer(*args, 2, router="deepseek_v3", num_shared_experts=1)
    with pytest.raises(ValueError):
        m.moe_layer(*args, N + 1)
    for k, v in before.items():
        assert np.array_equal(w[k], v), k
