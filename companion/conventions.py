r"""The conventions every function of :mod:`companion` follows, written once.

Docstrings elsewhere refer here instead of repeating these rules; the book's notation
section includes this page.

Shapes and layouts
------------------
One vocabulary for axis sizes, used in every shape comment:

====  ===========================================================
B     batch
H     query heads
H_kv  key/value heads (``H_kv`` divides ``H``; ``H_kv == H`` is ordinary multi-head)
L     query length (target)
S     key/value length (source)
D     head dimension of queries and keys; ``D_v`` that of values
E     embedding (model) width of a layer's input, ``E = H * D`` usually
====  ===========================================================

* Attention functions take queries ``(..., H, L, D)`` and keys/values
  ``(..., H_kv, S, D)`` / ``(..., H_kv, S, D_v)``, the layout of
  ``torch.nn.functional.scaled_dot_product_attention``. Leading axes ``...`` broadcast.
* Layers (``multi_head_attention``, the torch and Keras modules) take batch-first
  ``(B, L, E)`` inputs, as ``batch_first=True`` in torch and as Keras does.
* Convolutions take ``NCHW`` inputs and ``OIHW`` weights
  (``(C_out, C_in / groups, kH, kW)``), the layout of ``torch.nn.functional.conv2d``;
  the TensorFlow namespace keeps this at its API and transposes to ``NHWC`` inside.

Masks
-----
* A **boolean mask** means ``True`` = *may attend*. It broadcasts to ``(..., H, L, S)``.
  (``torch.nn.functional.scaled_dot_product_attention`` agrees;
  ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` says the opposite, ``True`` =
  ignore.)
* A **float mask** is added to the scaled scores (``-inf`` entries are masked).
* **causal** is *bottom-right aligned*: query ``i`` sees key ``j`` iff
  ``j <= i + (S - L)``. When ``L == S`` this is the usual lower triangle and equals
  torch's ``is_causal``; when ``L < S`` (decoding with a KV cache: the new queries are
  the *last* ``L`` positions) it differs from torch's ``is_causal`` and Keras's
  ``use_causal_mask``, which are top-left
  aligned::

      L = 2, S = 5          bottom-right (ours)     top-left (torch is_causal, Keras)
                            keys  0 1 2 3 4         keys  0 1 2 3 4
                  query 0         1 1 1 1 0               1 0 0 0 0
                  query 1         1 1 1 1 1               1 1 0 0 0

* **window** ``w`` (sliding-window attention, an int ``>= 1``): query ``i`` at absolute
  position ``p = i + (S - L)`` (bottom-right, as causal) sees key ``j`` iff
  ``p - w < j <= p`` with ``causal=True`` (the last ``w`` keys, itself included:
  Mistral's convention), and iff ``|p - j| < w`` with ``causal=False`` (a symmetric
  band: Longformer's local attention). The tiled kernels skip the key blocks outside the
  band,
  so their work is ``O(L * w)``::

      L = S = 5, w = 2      causal        not causal
                            1 0 0 0 0     1 1 0 0 0
                            1 1 0 0 0     1 1 1 0 0
                            0 1 1 0 0     0 1 1 1 0
                            0 0 1 1 0     0 0 1 1 1
                            0 0 0 1 1     0 0 0 1 1

* A **fully masked row** (a query that may attend to nothing) gives weights of exactly 0
  and an output row of exactly 0: never NaN (``torch.nn.MultiheadAttention`` gives NaN),
  never uniform weights (Keras adds ``-1e9`` and so averages all values).

Grouped-query heads
-------------------
Query head ``h`` uses key/value head ``h // (H // H_kv)``, the order of
``torch.repeat_interleave`` and of torch SDPA's ``enable_gqa=True``. ``H % H_kv != 0``
is
an error. ``H_kv == 1`` is multi-query attention::

      H = 6, H_kv = 2       query heads  0 1 2 | 3 4 5
                            k/v head     0 0 0 | 1 1 1

Numbers
-------
* **scale** defaults to ``1 / sqrt(D)``, computed with :func:`math.sqrt` as a Python
  float so that it never changes the input dtype (``np.sqrt(d)`` returns a numpy float64
  that silently promotes float32 arrays to float64: twice the memory, 1.6x the time).
* **dtypes**: the output dtype equals the input dtype; float16/bfloat16 inputs
  accumulate in float32. Integer inputs are a ``TypeError`` (attention of integers is a
  bug, not a request for float64).
* Masked scores are set by selection (``where``) to ``-inf``, never by adding a large
  finite number (``-1e9`` is not representable in float16).

Errors and inputs
-----------------
* Bad input raises ``ValueError`` (shapes, values) or ``TypeError`` (dtypes, types) with
  a message that names the argument and the shapes seen, never a bare ``IndexError``,
  ``AssertionError``, a silent broadcast or a NaN.
* Inputs are never modified in place.
"""

from __future__ import annotations

from companion._checks import check_int

__all__ = [
    "AXES",
    "MASK_TRUE_MEANS",
    "CAUSAL_ALIGNMENT",
    "gqa_group_size",
    "kv_head_of",
]

AXES = {
    "B": "batch",
    "H": "query heads",
    "H_kv": "key/value heads",
    "L": "query length",
    "S": "key/value length",
    "D": "head dimension of queries and keys",
    "D_v": "head dimension of values",
    "E": "embedding width",
}

MASK_TRUE_MEANS = "attend"
CAUSAL_ALIGNMENT = "bottom-right"


def gqa_group_size(num_heads: int, num_kv_heads: int) -> int:
    """How many query heads share one key/value head: ``H // H_kv``.

    Raises ``ValueError`` unless ``1 <= H_kv <= H`` and ``H_kv`` divides ``H``.
    """
    num_heads, num_kv_heads = (
        check_int("num_heads", num_heads),
        check_int("num_kv_heads", num_kv_heads),
    )
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads (H={num_heads}) must be a multiple of num_kv_heads "
            f"(H_kv={num_kv_heads}): "
            "each key/value head serves an equal group of query heads"
        )
    return num_heads // num_kv_heads


def kv_head_of(query_head: int, num_heads: int, num_kv_heads: int) -> int:
    """The key/value head that query head ``h`` reads: ``h // (H // H_kv)``."""
    if not 0 <= query_head < num_heads:
        raise ValueError(f"query_head must be in [0, {num_heads}), got {query_head}")
    return query_head // gqa_group_size(num_heads, num_kv_heads)
