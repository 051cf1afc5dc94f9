r"""Attention sinks (StreamingLLM) in torch: see :mod:`companion.numpy.sinks`."""

from __future__ import annotations

import torch

from companion import _checks, _positions, _sinks
from companion.torch.multihead import KVCache

__all__ = ["SinkCache", "sink_mask"]


def _positions_tensor(name: str, positions, device=None) -> torch.Tensor:
    _positions.check_position_values(positions)
    positions = torch.as_tensor(positions, device=device)
    name_ = _checks.dtype_name(positions.dtype)
    if positions.dim() != 1 or not name_.startswith(("int", "uint")):
        raise ValueError(
            f"{name} must be a vector of integer positions, got shape "
            f"{tuple(positions.shape)} and dtype {name_}"
        )
    return positions


def sink_mask(query_positions, key_positions, *, sinks: int, window: int):
    r"""Bool ``(L, S)``, True = attend: key ``p <= q`` with ``p < sinks`` or
    ``q - p < window``; on the device of ``query_positions``. See
    :func:`companion.numpy.sink_mask`."""
    sinks, window = _sinks.check_sinks(sinks, window)
    q = _positions_tensor("query_positions", query_positions)
    p = _positions_tensor("key_positions", key_positions, q.device)
    q, p = q[:, None], p[None, :]  # (L, 1), (1, S)
    return (p <= q) & ((p < sinks) | (q - p < window))  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, torch tensors.

    See :class:`companion._sinks.SinkCacheBase`."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return torch.cat([a, b], dim=2)

    def _integers(self, values, like):
        device = None if like is None else like.device
        return torch.tensor(values, dtype=torch.int64, device=device)
