r"""The package's communication calls, each one counted.

Every byte the ring and the tensor-parallel layers send goes through the two functions
here, which call ``torch.distributed`` and, inside a :func:`counting` block, add what
they hand to it to a :class:`CommCount`:

* :func:`ring_exchange`: each rank sends tensors to the next rank of the ring and
  receives the same shapes from the previous one (``dist.batch_isend_irecv``), returning
  at once so that the caller computes while the messages travel; it counts the bytes
  of the tensors sent.
* :func:`all_reduce`: ``dist.all_reduce`` (sum) of one tensor; it counts the bytes of
  the tensor handed over (the *payload*). How many bytes travel per rank depends on the
  algorithm: a ring all-reduce sends :math:`2 (W - 1) / W` times the payload.

:func:`check_same_shapes` is the one collective that is not counted: before a
collective whose ranks must agree on shapes, every rank all-gathers a few integers
(the shapes it holds), so that a disagreement is a ``ValueError`` on every rank, naming
the shapes and the ranks, instead of a collective of mismatched sizes (which gloo
answers by aborting the process, the reason only on stderr).

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommCount",
    "counting",
    "ring_exchange",
    "all_reduce",
    "nbytes",
    "gather_shapes",
    "check_same_shapes",
]

_MAX_DIMS = 16


@dataclass
class CommCount:
    """Calls and bytes per kind of operation, as this rank made them.

    ``bytes["send"]`` counts what this rank sent point to point, ``bytes["all_reduce"]``
    the payload it handed to all-reduces; ``calls`` counts the tensors (one per
    ``isend``, one per ``all_reduce``). ``score_entries`` counts the attention scores
    this rank computed (the work of the ring's blocks) and ``compute_seconds`` the CPU
    time it spent computing them (process time: waits for messages, and time when other
    processes had the cores, are left out).
    """

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    score_entries: int = 0
    compute_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "bytes": dict(self.bytes),
            "calls": dict(self.calls),
            "score_entries": self.score_entries,
            "compute_seconds": self.compute_seconds,
        }


_ACTIVE: list[CommCount] = []


@contextlib.contextmanager
def counting():
    """Count this process's communication (and ring work) inside the block.

    ``with counting() as count: ...`` then ``count.bytes["send"]`` and so on. Blocks
    nest; each counts everything inside it.
    """
    count = CommCount()
    _ACTIVE.append(count)
    try:
        yield count
    finally:
        _ACTIVE.remove(count)


def _record(kind: str, nbytes: int, calls: int = 1) -> None:
    for count in _ACTIVE:
        count.bytes[kind] += nbytes
        count.calls[kind] += calls


def record_work(score_entries: int = 0, seconds: float = 0.0) -> None:
    """Add attention scores computed, and seconds spent computing, to the counts."""
    for count in _ACTIVE:
        count.score_entries += score_entries
        count.compute_seconds += seconds


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return tensor.numel() * tensor.element_size()


def _neighbours(group) -> tuple[int, int]:
    """Global ranks of the next and the previous rank of the ring in ``group``."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt, prev = (rank + 1) % size, (rank - 1) % size
    if group is None:
        return nxt, prev
    return dist.get_global_rank(group, nxt), dist.get_global_rank(group, prev)


def ring_exchange(tensors, *, group=None, tag: int = 0):
    """Send ``tensors`` to the next rank, receive as many from the previous one.

    Starts the transfers (``dist.batch_isend_irecv``) and returns ``(received,
    requests)`` at once; call ``wait()`` on every request before reading ``received``.
    Tensor ``i`` travels with tag ``tag + i``, so that two exchanges in flight between
    the same ranks never mix.
    """
    tensors = [t.contiguous() for t in tensors]
    nxt, prev = _neighbours(group)
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for i, (t, buffer) in enumerate(zip(tensors, received)):
        ops.append(dist.P2POp(dist.isend, t, nxt, group=group, tag=tag + i))
        ops.append(dist.P2POp(dist.irecv, buffer, prev, group=group, tag=tag + i))
    requests = dist.batch_isend_irecv(ops)
    _record("send", sum(nbytes(t) for t in tensors), calls=len(tensors))
    return received, requests


def wait_all(requests) -> None:
    """Wait for every request of a :func:`ring_exchange`."""
    for request in requests:
        request.wait()


def all_reduce(tensor: torch.Tensor, *, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (``dist.all_reduce``)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    _record("all_reduce", nbytes(tensor))
    return tensor


def gather_shapes(tensors: dict, *, group=None) -> list[dict]:
    """Every rank's shapes of ``tensors`` (``{name: tensor}``): one dict per rank.

    One ``dist.all_gather`` of ``len(tensors) x 17`` int64 values (not counted).
    Every rank of ``group`` must call it with the same names.
    """
    rows = []
    device = None
    for name, t in tensors.items():
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"{name} has more than {_MAX_DIMS} axes: {tuple(t.shape)}")
        device = t.device if device is None else device
        rows.append([t.dim(), *t.shape, *[0] * (_MAX_DIMS - t.dim())])
    mine = torch.tensor(rows, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [
        {name: tuple(row[1 : 1 + row[0]]) for name, row in zip(tensors, table.tolist())}
        for table in everyone
    ]


def check_same_shapes(
    where: str, tensors: dict, *, group=None, shapes=None
) -> list[dict]:
    """``ValueError`` on every rank unless all ranks hold ``tensors`` of one shape.

    ``where`` names the calling function in the message; ``tensors`` is
    ``{name: tensor}``; ``shapes``, :func:`gather_shapes`'s list when already
    gathered. Returns that list when they agree.
    """
    if shapes is None:
        shapes = gather_shapes(tensors, group=group)
    for name in tensors:
        seen = [s[name] for s in shapes]
        if len(set(seen)) > 1:
            listed = ", ".join(f"rank {r}: {shape}" for r, shape in enumerate(seen))
            raise ValueError(
                f"{where}: the ranks disagree on the shape of {name} ({listed}); "
                f"every rank must pass the same shapes"
            )
    return shapes
