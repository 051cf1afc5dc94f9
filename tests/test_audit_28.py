"""Audit of issue 28: FlashAttention's grid and error rule on the kernels that
``tests/test_fa_grid.py`` does not run, and the citations of the benchmark.

``tests/test_fa_grid.py`` covers the registry's attention pair (reference, tiled) in
numpy, torch and TensorFlow forward and backward, and the paged kernel forward. The
issue asks for "every kernel in every backend (forward, and backward where there is
one)"; the others are here, with the same rule (``assert_close_to_oracle``: error
against the float64 oracle at most twice the plain float32 computation's, plus a
small absolute tolerance):

- ``attention_with_sinks`` (numpy, torch, TensorFlow) forward on the grid's
  (L, S) pairs, multi-head, grouped and multi-query heads, causal bottom-right, key
  padding (fully masked rows included: ``(239, 1)`` causal, a padded length of 0),
  local windows ``(left, right)`` as a mask, a sink of ``-inf``; backward under
  torch's autograd and TensorFlow's tape, in q, k, v and the sink logits;
- ``latent_attention`` (numpy, torch), expanded and absorbed, forward on the pairs
  with ``L <= S`` (the first ``S - L`` tokens prefilled through a ``KVCache``),
  causal or not, windows as an int and as a pair; backward in ``x`` under autograd;
- torch's ``paged_attention`` backward (it is differentiable in the query).

And the ``implementation="auto"`` thresholds are recomputed from the two stored runs
they cite (``book/figures/bench/crossover.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _fa_grid_cases import HEADS, SHAPES

import companion.numpy as cnp
from companion.testing import as_backend, assert_close_to_oracle

ROOT = Path(__file__).resolve().parent.parent


def _window_mask(L, S, left, right):
    """FlashAttention's ``window_size=(left, right)`` (-1 unbounded), bottom-right."""
    p = np.arange(L)[:, None] + (S - L)
    j = np.arange(S)[None, :]
    keep = np.ones((L, S), bool)
    if left >= 0:
        keep &= j >= p - left
    if right >= 0:
        keep &= j <= p + right
    return keep


def _grid(shapes, modes, big_modes=("causal",)):
    """Every (L, S, mode); the largest shapes only in ``big_modes`` (time)."""
    return [
        pytest.param(L, S, mode, id=f"{L}x{S}-{mode}")
        for L, S in shapes
        for mode in modes
        if max(L, S) <= 1000 or mode in big_modes
    ]


# --- attention_with_sinks ----------------------------------------------------------

# id: (causal, key padding, window pair or None, a head with sink -inf)
SINK_MODES = {
    "full": (False, False, None, False),
    "causal": (True, False, None, False),
    "causal-padded": (True, True, None, True),
    "padded-local-5-3": (False, True, (5, 3), False),
    "causal-local-16-0-neg-inf": (True, False, (16, 0), True),
}


def _sink_case(L, S, mode, seed=0):
    causal, padded, window, neg_inf = SINK_MODES[mode]
    index = SHAPES.index((L, S)) + list(SINK_MODES).index(mode)
    H, H_kv = HEADS[index % 3]
    D = 16 if max(L, S) > 1000 else 32
    rng = np.random.default_rng(seed + 11 * index)
    B = 2
    q = rng.standard_normal((B, H, L, D))
    k = rng.standard_normal((B, H_kv, S, D))
    v = rng.standard_normal((B, H_kv, S, D))
    sinks = rng.standard_normal(H)
    if neg_inf:
        sinks[0] = -np.inf  # that head's rows that see no key are exactly 0
    mask = None
    if padded:  # the second sequence keeps a third of its keys (S < 3: none)
        mask = cnp.padding_mask(np.array([S, S // 3]), S)  # (B, 1, 1, S)
    if window is not None:
        band = _window_mask(L, S, *window)
        mask = band if mask is None else mask & band
    return q, k, v, sinks, mask, causal


def _sinks_lib(backend):
    if backend == "numpy":
        return cnp
    if backend == "torch":
        pytest.importorskip("torch")
        import companion.torch as lib
    else:
        pytest.importorskip("tensorflow")
        import companion.tensorflow as lib
    return lib


@pytest.mark.parametrize(
    "L, S, mode", _grid(SHAPES, SINK_MODES, ("causal-padded", "padded-local-5-3"))
)
def test_sinks_forward_grid(L, S, mode):
    q, k, v, sinks, mask, causal = _sink_case(L, S, mode)
    oracle = cnp.attention_with_sinks(q, k, v, sinks, mask=mask, causal=causal)
    assert np.isfinite(oracle).all()
    arrays32 = [a.astype(np.float32) for a in (q, k, v, sinks)]
    baseline = cnp.attention_with_sinks(*arrays32, mask=mask, causal=causal)
    for backend in ("torch", "tensorflow"):
        lib = _sinks_lib(backend)
        args = [as_backend(a, backend) for a in arrays32]
        m = None if mask is None else as_backend(mask, backend)
        out = lib.attention_with_sinks(*args, mask=m, causal=causal)
        assert_close_to_oracle(out, baseline, oracle, name=f"{backend} sinks {mode}")


SINK_BACKWARD_SHAPES = [(1, 1), (239, 1), (3, 799), (113, 203), (128, 217)]


@pytest.mark.parametrize("mode", SINK_MODES)
@pytest.mark.parametrize(
    "L, S", SINK_BACKWARD_SHAPES, ids=[f"{L}x{S}" for L, S in SINK_BACKWARD_SHAPES]
)
def test_sinks_backward_grid(L, S, mode):
    """Gradients in q, k, v and the sink logits: TensorFlow's tape against float64
    autograd through torch, within twice torch's own float32 error (the plain
    computation in float32); torch's float32 gradients finite and within the same
    bound by construction."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    import companion.tensorflow as ctf
    import companion.torch as ct

    q, k, v, sinks, mask, causal = _sink_case(L, S, mode, seed=1)
    sinks = np.where(np.isfinite(sinks), sinks, -30.0)  # a finite sink to differentiate
    grad_out = np.random.default_rng(2).standard_normal(q.shape[:-1] + v.shape[-1:])

    def torch_grads(dtype):
        leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v)]
        leaves.append(torch.tensor(sinks, dtype=dtype, requires_grad=True))
        m = None if mask is None else torch.as_tensor(mask)
        out = ct.attention_with_sinks(*leaves, mask=m, causal=causal)
        return torch.autograd.grad(out, leaves, torch.tensor(grad_out, dtype=dtype))

    oracle = torch_grads(torch.float64)
    baseline = torch_grads(torch.float32)
    leaves = [tf.Variable(a.astype(np.float32)) for a in (q, k, v, sinks)]
    with tf.GradientTape() as tape:
        out = ctf.attention_with_sinks(*leaves, mask=mask, causal=causal)
    grads = tape.gradient(
        out, leaves, output_gradients=tf.constant(grad_out.astype(np.float32))
    )
    for label, got, base, exact in zip(
        ("dq", "dk", "dv", "dsinks"), grads, baseline, oracle
    ):
        assert got is not None, label
        assert np.isfinite(base.numpy()).all(), label
        assert_close_to_oracle(
            got, base, exact, floor=1e-5, name=f"tensorflow sinks {label} {mode}"
        )


# --- latent attention ---------------------------------------------------------------

LATENT_SHAPES = [s for s in SHAPES if s[0] <= s[1]]
# id: (causal, window)
LATENT_MODES = {
    "causal": (True, None),
    "full": (False, None),
    "causal-w17": (True, 17),
    "causal-local-8-0": (True, (8, 0)),
    "local-5-3": (False, (5, 3)),
}


def _cast(params, dtype):
    fields = {
        f.name: (
            None
            if getattr(params, f.name) is None
            else np.asarray(getattr(params, f.name)).astype(dtype)
        )
        for f in dataclasses.fields(params)
        if f.name != "num_heads"
    }
    return dataclasses.replace(params, **fields)


def _latent(lib, x, params, causal, window, prefix, absorbed):
    """The last ``L - prefix`` outputs, the first ``prefix`` tokens cached first."""
    cache = lib.KVCache()
    if prefix:
        lib.latent_attention(
            x[:, :prefix],
            params,
            causal=causal,
            window=window,
            cache=cache,
            absorbed=absorbed,
        )
    return lib.latent_attention(
        x[:, prefix:],
        params,
        causal=causal,
        window=window,
        cache=cache,
        absorbed=absorbed,
    )


@pytest.mark.parametrize("L, S, mode", _grid(LATENT_SHAPES, LATENT_MODES))
def test_latent_forward_grid(L, S, mode):
    causal, window = LATENT_MODES[mode]
    index = LATENT_SHAPES.index((L, S)) + list(LATENT_MODES).index(mode)
    params64 = cnp.LatentAttentionParams.random(
        32, 4, 8, 16, 4, query_latent_dim=12 if index % 2 else None, seed=index
    )
    params32 = _cast(params64, np.float32)
    exact = _cast(params32, np.float64)  # the float32 weights, computed in float64
    x32 = np.random.default_rng(index).standard_normal((2, S, 32)).astype(np.float32)
    x64 = x32.astype(np.float64)
    prefix = S - L
    oracle = _latent(cnp, x64, exact, causal, window, prefix, False)
    baseline = _latent(cnp, x32, params32, causal, window, prefix, False)
    assert oracle.shape == (2, L, 32)
    kernels = {
        "numpy absorbed": _latent(cnp, x32, params32, causal, window, prefix, True)
    }
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    xt = torch.from_numpy(x32)
    for absorbed in (False, True):
        kernels[f"torch absorbed={absorbed}"] = _latent(
            ct, xt, params32, causal, window, prefix, absorbed
        )
    for name, out in kernels.items():
        assert_close_to_oracle(out, baseline, oracle, name=f"latent {name} {mode}")


@pytest.mark.parametrize("mode", ["causal", "causal-w17", "local-5-3"])
@pytest.mark.parametrize("L, S", [(1, 1), (3, 799), (113, 203)], ids=str)
def test_latent_backward_grid(L, S, mode):
    """The gradient in ``x`` of the absorbed path (float32) against float64 autograd
    through the expanded one, within twice the expanded float32 path's error."""
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    causal, window = LATENT_MODES[mode]
    params32 = _cast(cnp.LatentAttentionParams.random(32, 4, 8, 16, 4, seed=3), "f4")
    exact = _cast(params32, np.float64)
    x32 = np.random.default_rng(4).standard_normal((2, S, 32)).astype(np.float32)
    grad_out = np.random.default_rng(5).standard_normal((2, L, 32))

    def grad(dtype, params, absorbed):
        x = torch.tensor(x32, dtype=dtype, requires_grad=True)
        out = _latent(ct, x, params, causal, window, S - L, absorbed)
        (g,) = torch.autograd.grad(out, x, torch.tensor(grad_out, dtype=dtype))
        return g

    oracle = grad(torch.float64, exact, False)
    baseline = grad(torch.float32, params32, False)
    fast = grad(torch.float32, params32, True)
    assert_close_to_oracle(fast, baseline, oracle, floor=1e-5, name=f"latent dx {mode}")


# --- paged attention, backward in the query (torch) -----------------------------------

PAGED_SHAPES = [s for s in SHAPES if s[0] <= s[1]]
PAGED_MODES = {
    "full": (False, None),
    "causal": (True, None),
    "causal-w17": (True, 17),
    "local-5-3": (False, (5, 3)),
}


@pytest.mark.parametrize("L, S, mode", _grid(PAGED_SHAPES, PAGED_MODES))
def test_torch_paged_backward_grid(L, S, mode):
    torch = pytest.importorskip("torch")
    import companion.torch as ct
    import companion.torch.paged as paged

    causal, window = PAGED_MODES[mode]
    index = PAGED_SHAPES.index((L, S)) + list(PAGED_MODES).index(mode)
    H, H_kv = HEADS[index % 3]
    D = 16 if S > 1000 else 32
    rng = np.random.default_rng(index)
    q, k, v = (
        rng.standard_normal(shape)
        for shape in ((2, H, L, D), (2, H_kv, S, D), (2, H_kv, S, D))
    )
    grad_out = rng.standard_normal((2, H, L, D))

    def reference_grad(dtype):
        leaf = torch.tensor(q, dtype=dtype, requires_grad=True)
        kt, vt = (torch.tensor(a, dtype=dtype) for a in (k, v))
        out = ct.scaled_dot_product_attention_reference(
            leaf, kt, vt, causal=causal, window=window
        )
        return torch.autograd.grad(out, leaf, torch.tensor(grad_out, dtype=dtype))[0]

    oracle = reference_grad(torch.float64)
    baseline = reference_grad(torch.float32)
    block = 16
    cache = paged.PagedKVCache(2 * -(-S // block) + 2, block, H_kv, D)
    seqs = []
    for b in range(2):
        seq = cache.new_sequence()
        cache.append(
            seq,
            torch.tensor(k[b], dtype=torch.float32),
            torch.tensor(v[b], dtype=torch.float32),
        )
        seqs.append(seq)
    leaf = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    out = paged.paged_attention(leaf, cache, seqs, causal=causal, window=window)
    (got,) = torch.autograd.grad(out, leaf, torch.tensor(grad_out, dtype=torch.float32))
    assert_close_to_oracle(got, baseline, oracle, floor=1e-5, name=f"paged dq {mode}")


# --- implementation="auto": the defaults are the cited runs' crossovers -------------


def test_auto_thresholds_are_the_cited_runs_crossovers():
    """``_implementation`` says each backend's threshold is the larger crossover of
    the two stored runs (full and causal, the larger of the two per run); recompute
    it from ``book/figures/bench/crossover.json``."""
    from companion import _implementation
    from companion.bench.crossover import crossover_n

    stored = json.loads((ROOT / "book/figures/bench/crossover.json").read_text())
    assert len(stored["runs"]) == 2
    for backend, threshold in _implementation.TILED_FROM_SCORES.items():
        per_run = []
        for run in stored["runs"]:
            assert {"cpu_model", "isa", "l2_bytes"} <= set(run["machine"])
            assert run["threads"] == 1 and run["load_average_start"]
            times = run["backends"][backend]["times"]
            per_kind = [
                crossover_n(
                    {int(n): (t["reference"], t["tiled"]) for n, t in kind.items()}
                )
                for kind in times.values()
            ]
            assert None not in per_kind, (backend, per_kind)
            per_run.append(max(per_kind))
        assert threshold == max(per_run) ** 2, (backend, per_run)


def test_the_machine_record_names_cpu_isa_l2_cores():
    from companion.bench import timing

    record = timing.cpu_record()
    assert {"cpu_model", "isa", "l2_bytes", "cores"} <= set(record)
    assert record["isa"] in ("AVX-512", "AVX2", "SSE", "unknown")
    assert record["l2_bytes"] > 0


def test_the_bench_json_records_cpu_isa_l2_threads_and_load(tmp_path, capsys):
    """Issue 28: "Record the CPU model, instruction set (AVX2 / AVX-512), L2 size,
    threads and load average in the JSON" (a tiny run of one cheap section)."""
    from companion.bench import cli

    out = tmp_path / "bench.json"
    status = cli.main(
        ["--size", "tiny", "--quiet", "--threads", "1", "--only", "decoding"]
        + ["--without", "tensorflow", "--json", str(out)]
    )
    capsys.readouterr()
    assert status == 0
    run = json.loads(out.read_text())
    machine = run["machine"]
    assert machine["cpu_model"] and machine["isa"] in (
        "AVX-512",
        "AVX2",
        "SSE",
        "unknown",
    )
    assert machine["l2_bytes"] > 0 and machine["cores"] >= 1
    assert run["threads"] == 1
    for key in ("load_average_start", "load_average_end"):
        assert run[key], key


# --- the error rule in half precision over the grid (torch) ------------------------

HALF_SHAPES = [s for s in SHAPES if max(s) <= 1000]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("L, S", HALF_SHAPES, ids=[f"{L}x{S}" for L, S in HALF_SHAPES])
def test_torch_tiled_half_precision_grid(L, S, dtype):
    """FlashAttention's rule in float16/bfloat16: the tiled kernel's error against the
    float64 oracle is at most twice the plain reference's in the same dtype, plus
    the dtype's atol; causal, grouped heads, key padding (fully masked rows)."""
    torch = pytest.importorskip("torch")
    import companion.torch as ct

    index = HALF_SHAPES.index((L, S))
    H, H_kv = HEADS[index % 3]
    rng = np.random.default_rng(index)
    q, k, v = (
        rng.standard_normal(shape)
        for shape in ((2, H, L, 32), (2, H_kv, S, 32), (2, H_kv, S, 32))
    )
    mask = cnp.padding_mask(np.array([S, S // 3]), S)
    low = [torch.tensor(a).to(getattr(torch, dtype)) for a in (q, k, v)]
    exact = [t.double().numpy() for t in low]  # the rounded inputs, in float64
    oracle = cnp.scaled_dot_product_attention_reference(
        *exact, mask=mask, causal=True, window=(40, 0)
    )
    m = torch.as_tensor(mask)
    baseline = ct.scaled_dot_product_attention_reference(
        *low, mask=m, causal=True, window=(40, 0)
    )
    out = ct.attention_tiled(*low, mask=m, causal=True, window=(40, 0))
    assert out.dtype == getattr(torch, dtype)
    assert_close_to_oracle(
        out.float(), baseline.float(), oracle, name=f"torch tiled {dtype}"
    )
