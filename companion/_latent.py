"""What the backends' latent attention (MLA) shares: the visible band and the checks
of the folded weights.

Backend-free: numpy only, one floor below ``companion.numpy`` and ``companion.torch``.
"""

from __future__ import annotations

import numpy as np

from companion import _checks
from companion._paged import visible_keys

__all__ = ["band", "check_absorbed", "split_absorbed"]


def band(L: int, S: int, causal: bool, window: int | None):
    """Bool ``(L, S)``: which keys the last ``L`` of ``S`` positions see (or None)."""
    if not causal and window is None:
        return None
    lo, hi = visible_keys(S, L, causal=causal, window=window)
    j = np.arange(S)[None, :]
    return (np.asarray(lo)[:, None] <= j) & (j < np.asarray(hi)[:, None])


def check_absorbed(folded, params) -> None:
    """``folded = (uqk, uvo)`` must be ``params.absorbed()``'s shapes: ``(H, d_c' or E,
    d_c)`` and ``(H, d_c, E_out)`` (a ``ValueError`` naming ``absorbed`` otherwise)."""
    H, d_c = params.num_heads, params.latent_dim
    q_in = params.w_dkv.shape[0] if params.w_dq is None else params.w_dq.shape[1]
    E_out = params.w_o.shape[1]
    expected = ((H, q_in, d_c), (H, d_c, E_out))
    seen = tuple(tuple(getattr(a, "shape", ())) for a in folded)
    if seen != expected:
        raise ValueError(
            "absorbed must be params.absorbed(), the folded weights of shapes "
            f"{expected[0]} and {expected[1]} for these params, got shapes "
            f"{seen[0]} and {seen[1]}"
        )


def split_absorbed(absorbed, params) -> tuple[bool, tuple | None]:
    """``latent_attention``'s ``absorbed`` as ``(absorbed, folded)``: a flag, or the
    tuple ``params.absorbed()`` folded once by the caller (``(True, tuple)``, its
    shapes checked by :func:`check_absorbed`); checked before the cache changes."""
    if isinstance(absorbed, tuple) and len(absorbed) == 2:
        check_absorbed(absorbed, params)
        return True, absorbed
    return _checks.check_flag("absorbed", absorbed), None
