r"""Drawing the next token from a language model's logits: temperature, top-k, top-p.

One function, :func:`sample`, that generation calls at every step, and
:func:`next_token_distribution`, the distribution it draws from:

.. math::

    p = \mathrm{softmax}(z / \tau) \;\to\; \text{keep the } k \text{ most probable}
    \;\to\; \text{keep the smallest most-probable set of mass} \ge p_{top}
    \;\to\; \text{renormalise}

``temperature = 0`` is greedy decoding (the argmax); ``top_k=None`` and ``top_p=1`` keep
every token.
"""

from __future__ import annotations

import math

import torch

__all__ = ["next_token_distribution", "sample"]


def _check(logits, temperature, top_k, top_p):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a tensor of shape (B, V), got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one token, got {logits.shape}")
    if torch.isnan(logits).any():
        raise ValueError("logits must not contain NaN")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (None turns it off), got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number, got {top_p!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token_distribution(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The truncated, renormalised distribution ``(B, V)`` (float32 or wider) that
    :func:`sample` draws from; with ``temperature=0`` one-hot on the argmax."""
    _check(logits, temperature, top_k, top_p)
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature == 0:
        return torch.nn.functional.one_hot(z.argmax(dim=-1), z.shape[-1]).to(z.dtype)
    z = z / temperature  # (B, V), a new tensor: the input is not changed
    if top_k is not None and top_k < z.shape[-1]:
        kept = torch.topk(z, top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, kept, True)
        z = z.masked_fill(~keep, -math.inf)  # (B, V)
    probs = torch.softmax(z, dim=-1)  # (B, V)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more probable
        keep_sorted = before < top_p  # the first token always stays
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalise
    return probs


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids ``(B,)`` (int64) drawn from ``logits (B, V)``.

    ``temperature`` (>= 0; 0 is the argmax) divides the logits; ``top_k`` (``None`` =
    off, else >= 1) keeps the ``k`` largest; ``top_p`` (in ``(0, 1]``; 1 = off) keeps
    the smallest set of most probable tokens whose mass reaches ``top_p``; the rest is
    renormalised and one token drawn per row with ``generator`` (a
    ``torch.Generator``, for reproducible draws). Bad values are ``ValueError`` /
    ``TypeError`` naming the argument.
    """
    probs = next_token_distribution(
        logits, temperature=temperature, top_k=top_k, top_p=top_p
    )
    if temperature == 0:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
