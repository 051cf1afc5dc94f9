"""companion: the tested library of the book *Parameter sharing and attention*.

Three namespaces offer the same functions with the same signatures, one per array
library, so that a notebook switches backend by changing one import::

    from companion import numpy as cn           # numpy arrays, float64 reference
    import companion.torch as ct  # torch tensors (needs the `torch` extra)
    import companion.tensorflow as ctf  # tf tensors (needs the `tf` extra)

Importing :mod:`companion` imports numpy and nothing else: PyTorch and TensorFlow are
optional and imported only by their own subpackages (a test checks this in a fresh
interpreter). The conventions every function follows (layouts, mask meaning, causal
alignment, dtypes, errors) are written once, in :mod:`companion.conventions`.
"""

__version__ = "0.1.0"

from companion import conventions, numpy  # noqa: E402  (numpy here is companion.numpy)

__all__ = ["__version__", "conventions", "numpy"]
