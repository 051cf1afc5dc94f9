r"""Attention sinks (StreamingLLM, Xiao et al. 2023): the first tokens and a window.

:class:`SinkCache` keeps the first ``sinks`` positions and the last ``window``;
:func:`sink_mask` is the mask under which decoding with it equals one full pass. These
numpy versions are the oracle for the torch and TensorFlow namespaces.
"""

from __future__ import annotations

import numpy as np

from companion import _positions, _sinks
from companion.numpy.multihead import KVCache

__all__ = ["SinkCache", "sink_mask"]


def _positions_array(name: str, positions) -> np.ndarray:
    _positions.check_position_values(positions)
    positions = np.asarray(positions)
    if positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a vector of integer positions, got shape "
            f"{positions.shape} and dtype {positions.dtype}"
        )
    return positions


def sink_mask(query_positions, key_positions, *, sinks: int, window: int):
    r"""Which keys each query sees with attention sinks: bool ``(L, S)``, True = attend.

    Query at position ``q`` sees key ``p`` when :math:`p \le q` and (:math:`p <`
    ``sinks`` or :math:`q - p <` ``window``): the first ``sinks`` tokens of the text
    and the last ``window`` (itself included). With ``query_positions =
    key_positions = 0 .. n-1`` it is the full pass's mask; with a :class:`SinkCache`,
    the positions are the queries' and :attr:`SinkCache.key_positions`.
    """
    sinks, window = _sinks.check_sinks(sinks, window)
    q = _positions_array("query_positions", query_positions)[:, None]  # (L, 1)
    p = _positions_array("key_positions", key_positions)[None, :]  # (1, S)
    return (p <= q) & ((p < sinks) | (q - p < window))  # (L, S)


class SinkCache(_sinks.SinkCacheBase):
    """The first ``sinks`` positions and the last ``window``, numpy arrays.

    See :class:`companion._sinks.SinkCacheBase` for the rule and the positions."""

    _cache_class = KVCache

    def _concat(self, a, b):
        return np.concatenate([a, b], axis=2)

    def _integers(self, values, like):
        return np.array(values, dtype=np.int64)
