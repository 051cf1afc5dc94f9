"""The registry of readable/fast pairs, so that tests cover every path.

Each :class:`Pair` names one operation, its readable ``*_reference`` implementation and
its fast implementations. Every backend namespace (``companion.numpy``,
``companion.torch``, ``companion.tensorflow``) offers all of these names with the same
signature; ``tests/test_namespaces.py`` checks that, and the operation tests
(``tests/test_attention_pairs.py``, ``tests/test_attention_errors.py``,
``tests/test_attention_torch.py``, ``tests/test_attention_tensorflow.py``; the
convolution's in ``tests/test_conv.py``) parametrize over :func:`implementations` or
:func:`pair`, so that adding a fast path here puts it under test.

Names only, no imports: reading the registry never imports a framework.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["BACKENDS", "Pair", "PAIRS", "pair", "namespace", "implementations"]

BACKENDS = ("numpy", "torch", "tensorflow")


@dataclass(frozen=True)
class Pair:
    """One operation: its readable reference and the fast versions that equal it."""

    operation: str
    reference: str
    fast: tuple[str, ...]


PAIRS: tuple[Pair, ...] = (
    Pair("attention", "scaled_dot_product_attention_reference", ("attention_tiled",)),
    Pair("conv2d", "conv2d_reference", ("conv2d_im2col",)),
)


def pair(operation: str) -> Pair:
    """The :class:`Pair` registered for ``operation``."""
    for p in PAIRS:
        if p.operation == operation:
            return p
    known = ", ".join(p.operation for p in PAIRS)
    raise KeyError(f"no operation {operation!r} in the registry; known: {known}")


def namespace(backend: str):
    """Import and return ``companion.<backend>`` (this is where a framework gets
    imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return importlib.import_module(f"companion.{backend}")


def implementations(operation: str, backends=BACKENDS):
    """``[(backend, name, function), ...]``: every implementation of ``operation``.

    The reference comes first for each backend, then the fast versions.
    """
    p = pair(operation)
    found = []
    for backend in backends:
        module = namespace(backend)
        for name in (p.reference, *p.fast):
            found.append((backend, name, getattr(module, name)))
    return found
