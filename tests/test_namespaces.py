"""The three namespaces offer the same names with the same signatures (DESIGN §3).

A notebook switches backend by changing one import, so every public function of
``companion.numpy`` must exist in ``companion.torch`` and ``companion.tensorflow`` with
the same parameter names, kinds and defaults. The few differences are listed here, each
with its reason; anything else that differs fails this test.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from companion import registry

# Hand-written gradients and the training loop of the shared dense layer exist in numpy
# only: the frameworks have autograd, and the book derives these by hand on purpose.
NUMPY_ONLY = {
    "TrainingResult",
    "conv2d_backward",
    "dense_loss",
    "init_dense_params",
    "make_shared_teacher_data",
    "shared_dense_backward",
    "shared_dense_forward",
    "train_shared_dense",
    "unshared_dense_backward",
    "unshared_dense_forward",
}
# Latent attention exists in numpy and torch only (DESIGN 3.3): the models that use it
# (DeepSeek-V2 and later) are served from PyTorch; TensorFlow has no counterpart.
NOT_IN_TENSORFLOW = {
    "LatentAttentionParams",
    "kv_cache_elements_per_token",
    "latent_attention",
}
# Keyword-only extras a backend may add (never required, never positional).
BACKEND_EXTRAS = {
    (
        "numpy",
        "attention_tiled",
        "num_threads",
    ): "numpy parallelises over query blocks itself",
    (
        "numpy",
        "conv2d_im2col",
        "num_threads",
    ): "numpy parallelises over batch chunks itself",
    ("torch", "causal_mask", "device"): "torch tensors are created on a device",
}
# Defaults tuned per backend: numpy's blocks fit the L2 cache with BLAS on one thread;
# torch and TensorFlow dispatch a kernel per block, so their blocks are small and many.
TUNED_DEFAULTS = {"block_q", "block_k"}


def _public_functions(module) -> dict:
    return {
        n: getattr(module, n)
        for n in dir(module)
        if not n.startswith("_")
        and callable(getattr(module, n))
        and not inspect.ismodule(getattr(module, n))
    }


@pytest.fixture(scope="module")
def numpy_functions():
    return _public_functions(registry.namespace("numpy"))


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_every_numpy_name_exists_in_each_backend(backend, numpy_functions):
    other = _public_functions(registry.namespace(backend))
    missing = set(numpy_functions) - set(other) - NUMPY_ONLY
    if backend == "tensorflow":
        missing -= NOT_IN_TENSORFLOW
    missing = sorted(missing)
    assert not missing, (
        f"companion.{backend} lacks these companion.numpy names: {missing}"
    )


def _comparable(signature: inspect.Signature, backend: str, name: str):
    params = []
    for p in signature.parameters.values():
        if (backend, name, p.name) in BACKEND_EXTRAS:
            assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, (
                f"{backend}.{name}: extra parameter {p.name} must be keyword-only with "
                "a default"
            )
            continue
        default = (
            "<tuned>"
            if p.name in TUNED_DEFAULTS
            else ("" if p.default is p.empty else repr(p.default))
        )
        params.append(
            f"{p.name}:{p.kind.description}{'=' + default if default else ''}"
        )
    return params


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_signatures_match_numpy(backend, numpy_functions):
    other = _public_functions(registry.namespace(backend))
    mismatched = []
    for name, fn in sorted(numpy_functions.items()):
        if name in NUMPY_ONLY or name not in other or inspect.isclass(fn):
            continue
        ours = _comparable(inspect.signature(fn), "numpy", name)
        theirs = _comparable(inspect.signature(other[name]), backend, name)
        if ours != theirs:
            mismatched.append(f"{name}: numpy {ours} != {backend} {theirs}")
    assert not mismatched, "signatures differ:\n" + "\n".join(mismatched)


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_every_registered_pair_exists(backend):
    module = registry.namespace(backend)
    for p in registry.PAIRS:
        for name in (p.reference, *p.fast):
            assert callable(getattr(module, name, None)), (
                f"companion.{backend} lacks {name} ({p.operation})"
            )


def test_every_reference_function_is_registered(numpy_functions):
    """A ``*_reference`` without a registered pair leaves its fast twin untested."""
    registered = {p.reference for p in registry.PAIRS}
    unregistered = sorted(
        n for n in numpy_functions if n.endswith("_reference") and n not in registered
    )
    assert not unregistered, (
        f"register these in companion.registry.PAIRS: {unregistered}"
    )


def test_multi_head_params_is_one_class():
    """MultiHeadParams is defined once and re-exported, not copied per backend."""
    classes = {registry.namespace(b).MultiHeadParams for b in registry.BACKENDS}
    assert len(classes) == 1


@pytest.mark.parametrize("backend", registry.BACKENDS)
@pytest.mark.parametrize(
    "lengths, error",
    [
        (np.array([[1, 2]]), ValueError),  # not 1-D
        (np.array([1.0, 2.0]), TypeError),  # not integers
        (np.array([1, 5]), ValueError),  # longer than S
    ],
)
def test_padding_mask_rejects_bad_lengths_alike(backend, lengths, error):
    from companion.testing import as_backend

    module = registry.namespace(backend)
    with pytest.raises(error, match="lengths"):
        module.padding_mask(as_backend(lengths, backend), 4)
