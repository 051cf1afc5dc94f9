"""``implementation=`` of multi-head attention: reference and tiled kernel agree.

``multi_head_attention`` (numpy, torch, TensorFlow), the torch ``MultiHeadAttention``
module and the Keras layer take their heads' attention either from the reference (which
forms the weights) or from ``attention_tiled`` (which never holds an ``L x S`` matrix);
``"auto"`` picks by size. These tests check that:

* both give the same outputs (float64, against the numpy reference as the oracle), with
  masks, bottom-right causal alignment, grouped-query heads and a KV cache;
* both give the same gradients (torch autograd through the tiled ``autograd.Function``;
  TensorFlow's ``GradientTape``), for the inputs and for the layer's weights;
* ``"auto"`` takes the tiled kernel exactly from ``L * S >= TILED_FROM_SCORES`` on, and
  never when the weights are asked for;
* bad values are refused with a clear error before a cache changes.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import companion.numpy as cn
from companion.testing import as_backend, assert_close, to_numpy

BACKENDS = ["numpy", "torch", "tensorflow"]
E, H = 24, 6
CASES = {
    # name: (L, S, H_kv, keyword arguments built from (rng, L, S))
    "self": (13, 13, 6, lambda rng, L, S: {}),
    "self-causal-grouped": (17, 17, 2, lambda rng, L, S: {"causal": True}),
    "cross-bool-mask-mq": (
        9,
        21,
        1,
        lambda rng, L, S: {"mask": rng.random((2, 1, L, S)) > 0.3},
    ),
    "cross-float-mask": (
        11,
        7,
        3,
        lambda rng, L, S: {"mask": rng.standard_normal((L, S))},
    ),
    "causal-L>S-empty-rows": (12, 5, 2, lambda rng, L, S: {"causal": True}),
}


def _namespace(backend: str):
    if backend != "numpy":
        pytest.importorskip(backend)
    return importlib.import_module(f"companion.{backend}")


def _module(backend: str):
    return importlib.import_module(f"companion.{backend}.multihead")


def _inputs(rng, backend, L, S):
    x_q = rng.standard_normal((2, L, E))  # (B, L, E)
    x_kv = x_q if L == S else rng.standard_normal((2, S, E))  # (B, S, E)
    return x_q, x_kv, as_backend(x_q, backend), as_backend(x_kv, backend)


def _mask(mask, backend):
    return None if mask is None else as_backend(mask, backend)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_and_tiled_give_the_same_output(rng, backend, case):
    ns = _namespace(backend)
    L, S, H_kv, make_kwargs = CASES[case]
    params = cn.MultiHeadParams.random(E, num_heads=H, num_kv_heads=H_kv, seed=1)
    kwargs = make_kwargs(rng, L, S)
    x_q, x_kv, bq, bkv = _inputs(rng, backend, L, S)
    oracle = cn.multi_head_attention(
        x_q, x_kv, params, implementation="reference", **kwargs
    )
    if "mask" in kwargs:
        kwargs["mask"] = _mask(kwargs["mask"], backend)
    for implementation in ("reference", "tiled"):
        out = ns.multi_head_attention(
            bq, bkv, params, implementation=implementation, **kwargs
        )
        assert_close(out, oracle, name=f"{backend} {implementation} {case}")
    if case == "causal-L>S-empty-rows":
        # queries 0..L-S-1 see no key: their heads are 0, the output is the bias b_o
        tiled = ns.multi_head_attention(
            bq, bkv, params, implementation="tiled", **kwargs
        )
        empty = to_numpy(tiled)[:, : L - S]
        assert_close(empty, np.broadcast_to(params.b_o, empty.shape), name="empty rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_with_the_tiled_kernel_equals_full_causal(rng, backend):
    ns = _namespace(backend)
    params = cn.MultiHeadParams.random(E, num_heads=H, num_kv_heads=2, seed=2)
    x = rng.standard_normal((1, 10, E))  # (B, L, E)
    full = cn.multi_head_attention(
        x, x, params, causal=True, implementation="reference"
    )
    cache = ns.KVCache()
    steps = []
    for t in range(10):
        token = as_backend(x[:, t : t + 1], backend)  # (B, 1, E)
        steps.append(
            to_numpy(
                ns.multi_head_attention(
                    token,
                    token,
                    params,
                    causal=True,
                    cache=cache,
                    implementation="tiled",
                )
            )
        )
    assert_close(np.concatenate(steps, axis=1), full, name=f"{backend} tiled decoding")
    assert cache.length == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_is_tiled_from_the_threshold_on(rng, backend, monkeypatch):
    ns = _namespace(backend)
    module = _module(backend)
    calls = []
    original = module.attention_tiled

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "attention_tiled", spy)
    monkeypatch.setattr(module, "TILED_FROM_SCORES", 8 * 9)
    params = cn.MultiHeadParams.random(E, num_heads=H, seed=3)
    _, _, below, _ = _inputs(rng, backend, 8, 8)  # L * S = 64 < 72
    _, _, above, _ = _inputs(rng, backend, 9, 9)  # L * S = 81 >= 72
    ns.multi_head_attention(below, below, params)
    assert calls == []
    ns.multi_head_attention(above, above, params)
    assert len(calls) == 1
    out, weights = ns.multi_head_attention(above, above, params, return_weights=True)
    assert len(calls) == 1, "auto used the tiled kernel although the weights were asked"
    assert tuple(weights.shape) == (2, H, 9, 9)


def test_each_backend_uses_its_own_measured_threshold():
    from companion._implementation import TILED_FROM_SCORES

    for backend in BACKENDS:
        if backend != "numpy":
            pytest.importorskip(backend)
        assert _module(backend).TILED_FROM_SCORES == TILED_FROM_SCORES[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_implementation_is_refused_before_the_cache_changes(rng, backend):
    ns = _namespace(backend)
    params = cn.MultiHeadParams.random(E, num_heads=H, seed=4)
    x = as_backend(rng.standard_normal((1, 3, E)), backend)
    cache = ns.KVCache()
    with pytest.raises(ValueError, match="implementation must be one of"):
        ns.multi_head_attention(x, x, params, cache=cache, implementation="flash")
    with pytest.raises(TypeError, match="implementation must be one of"):
        ns.multi_head_attention(x, x, params, cache=cache, implementation=None)
    with pytest.raises(ValueError, match="cannot return them"):
        ns.multi_head_attention(
            x, x, params, cache=cache, implementation="tiled", return_weights=True
        )
    assert cache.length == 0


# --- gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["self-causal-grouped", "cross-float-mask"])
def test_torch_module_gradients_agree(rng, case):
    torch = pytest.importorskip("torch")
    from companion.torch import MultiHeadAttention

    L, S, H_kv, make_kwargs = CASES[case]
    kwargs = make_kwargs(rng, L, S)
    if "mask" in kwargs:
        kwargs["mask"] = as_backend(kwargs["mask"], "torch")
    torch.manual_seed(0)
    layer = MultiHeadAttention(E, H, num_kv_heads=H_kv, dtype=torch.float64)
    x_q = as_backend(rng.standard_normal((2, L, E)), "torch").requires_grad_()
    x_kv = as_backend(rng.standard_normal((2, S, E)), "torch").requires_grad_()
    grad_out = as_backend(rng.standard_normal((2, L, E)), "torch")
    results = {}
    for implementation in ("reference", "tiled"):
        out = layer(x_q, x_kv, implementation=implementation, **kwargs)
        wrt = (x_q, x_kv, *layer.parameters())
        results[implementation] = (out, torch.autograd.grad(out, wrt, grad_out))
    out_ref, grads_ref = results["reference"]
    out_tiled, grads_tiled = results["tiled"]
    assert_close(out_tiled, out_ref, name="output")
    names = ["x_q", "x_kv", *(n for n, _ in layer.named_parameters())]
    for name, g_tiled, g_ref in zip(names, grads_tiled, grads_ref):
        assert_close(g_tiled, g_ref, name=f"d{name}")


def test_torch_module_default_comes_from_the_constructor(rng):
    torch = pytest.importorskip("torch")
    from companion.torch import MultiHeadAttention

    torch.manual_seed(0)
    tiled = MultiHeadAttention(E, H, dtype=torch.float64, implementation="tiled")
    x = as_backend(rng.standard_normal((1, 5, E)), "torch")
    with pytest.raises(ValueError, match="cannot return them"):
        tiled(x, return_weights=True)
    out, _ = tiled(x, return_weights=True, implementation="reference")
    assert_close(tiled(x), out, name="module default 'tiled'")
    with pytest.raises(ValueError, match="implementation must be one of"):
        MultiHeadAttention(E, H, implementation="fast")


def test_torch_functional_input_gradients_agree(rng):
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    params = cn.MultiHeadParams.random(E, num_heads=H, num_kv_heads=3, seed=5)
    x = as_backend(rng.standard_normal((2, 15, E)), "torch").requires_grad_()
    grads = {}
    for implementation in ("reference", "tiled"):
        out = ct.multi_head_attention(
            x, x, params, causal=True, implementation=implementation
        )
        (grads[implementation],) = torch.autograd.grad(out.square().sum(), x)
    assert_close(grads["tiled"], grads["reference"], name="dx")


@pytest.mark.parametrize("case", ["self-causal-grouped", "cross-bool-mask-mq"])
def test_keras_layer_outputs_and_gradients_agree(rng, case):
    tf = pytest.importorskip("tensorflow")
    from companion.tensorflow import MultiHeadAttention

    L, S, H_kv, make_kwargs = CASES[case]
    kwargs = make_kwargs(rng, L, S)
    call = {"use_causal_mask": kwargs.get("causal", False)}
    if "mask" in kwargs:
        call["attention_mask"] = tf.constant(kwargs["mask"][:, 0])  # (B, L, S)
    x_q = tf.constant(rng.standard_normal((2, L, E)))
    x_kv = tf.constant(rng.standard_normal((2, S, E)))
    params = cn.MultiHeadParams.random(E, num_heads=H, num_kv_heads=H_kv, seed=6)
    results = {}
    for implementation in ("reference", "tiled"):
        layer = MultiHeadAttention.from_params(
            params, implementation=implementation, dtype="float64"
        )
        assert layer.get_config()["implementation"] == implementation
        with tf.GradientTape() as tape:
            tape.watch([x_q, x_kv])
            out = layer(x_q, x_kv, **call)
            loss = tf.reduce_sum(tf.square(out))
        wrt = [x_q, x_kv, *layer.trainable_variables]
        results[implementation] = (out, tape.gradient(loss, wrt))
    oracle = cn.multi_head_attention(
        to_numpy(x_q),
        to_numpy(x_kv),
        params,
        causal=call["use_causal_mask"],
        mask=kwargs["mask"] if "mask" in kwargs else None,
        implementation="reference",
    )
    for implementation, (out, _) in results.items():
        assert_close(out, oracle, name=f"keras {implementation} output")
    for i, (g_tiled, g_ref) in enumerate(
        zip(results["tiled"][1], results["reference"][1])
    ):
        assert g_tiled is not None and g_ref is not None, f"gradient {i} is missing"
        assert_close(g_tiled, g_ref, name=f"keras gradient {i}")
