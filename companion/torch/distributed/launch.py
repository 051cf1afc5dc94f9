r"""Start ``world_size`` processes that share a ``torch.distributed`` process group.

:func:`launch` runs ``fn(*args)`` once in each of ``world_size`` fresh processes
(``spawn``), each joined to one process group: gloo on CPU by default, NCCL when asked
for and enough GPUs are present. It is PyTorch's own engine, ``torch.distributed``, on
localhost (``MASTER_ADDR=127.0.0.1`` and a free port); nothing here moves tensors
itself. It returns the list of the ranks' return values, rank 0 first. A worker's
exception is raised again in the parent, of the same type where it can be rebuilt,
with the rank and the worker's traceback in its message; the other workers are then
stopped, since they would wait for the failed one forever.

Under ``torchrun`` (the environment already names ``RANK`` and ``WORLD_SIZE``),
:func:`launch` spawns nothing: this process joins the group from the environment, runs
``fn(*args)`` and returns every rank's value (gathered with ``all_gather_object``), the
same list as above. So one script runs both ways::

    python my_script.py                      # launch spawns the processes
    torchrun --nproc-per-node 4 my_script.py  # torchrun did

``fn`` must be importable by name (a function defined in a module, not in a notebook
cell or a lambda), since ``spawn`` pickles it by its qualified name; its return value
must pickle too (numbers, numpy arrays, tensors: tensors come back by value).

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue as _queue
import socket
import traceback

import torch
import torch.distributed as dist

__all__ = ["launch", "free_port", "under_torchrun", "device", "WorkerError"]


class WorkerError(RuntimeError):
    """A worker failed with an exception that could not be rebuilt in the parent."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or set up the same way)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"))


def _default_backend(world_size: int) -> str:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def device() -> torch.device:
    """The device this rank computes on: ``cuda:<local rank>`` under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _loopback_environment(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # gloo picks its network interface from the host name; on a machine without a
    # network that can fail, so name the loopback interface when there is one.
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _worker(fn, rank, world_size, port, backend, timeout_s, args, results) -> None:
    _loopback_environment(rank, world_size, port)
    # share the cores: world_size processes each with every core would oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(*args)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        report = (type(exc).__name__, str(exc), traceback.format_exc(), payload)
        results.put((rank, False, report))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _raise_from_worker(rank: int, report) -> None:
    name, message, trace, payload = report
    text = f"rank {rank}: {message}\n--- traceback in rank {rank} ---\n{trace}"
    original = pickle.loads(payload) if payload is not None else None
    if original is not None:
        try:
            rebuilt = type(original)(text)
        except Exception:
            rebuilt = None
        if rebuilt is not None:
            rebuilt.rank = rank
            raise rebuilt from None
    error = WorkerError(f"{name} in {text}")
    error.rank = rank
    raise error


def _launch_under_torchrun(fn, world_size, args, backend):
    env_size = int(os.environ["WORLD_SIZE"])
    if env_size != world_size:
        raise ValueError(
            f"world_size={world_size} but torchrun started WORLD_SIZE={env_size}"
        )
    if not dist.is_initialized():
        backend = backend or _default_backend(int(os.environ["LOCAL_WORLD_SIZE"]))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    value = fn(*args)
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def launch(fn, world_size: int, *args, backend: str | None = None, timeout=300.0):
    """Run ``fn(*args)`` in ``world_size`` processes of one group; return the values.

    ``backend``: ``"gloo"`` (CPU; the default without enough GPUs) or ``"nccl"``.
    ``timeout`` (seconds) bounds the whole run and each collective. Returns
    ``[value of rank 0, value of rank 1, ...]``. Raises the first failing worker's
    exception (same type when it can be rebuilt, else :class:`WorkerError`), its
    message starting ``rank <r>:``; ``TimeoutError`` when the workers do not finish.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if under_torchrun():
        return _launch_under_torchrun(fn, world_size, args, backend)
    backend = backend or _default_backend(world_size)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [
        context.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, timeout, args, results),
            name=f"companion-rank-{rank}",
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    values: dict[int, object] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except _queue.Empty:
                for rank, worker in enumerate(workers):
                    if rank not in values and worker.exitcode not in (None, 0):
                        raise WorkerError(
                            f"rank {rank}: process died with exit code "
                            f"{worker.exitcode} before reporting"
                        ) from None
                if datetime.datetime.now() > deadline:
                    raise TimeoutError(
                        f"workers {sorted(set(range(world_size)) - set(values))} did "
                        f"not finish within {timeout} s"
                    ) from None
                continue
            if not ok:
                _raise_from_worker(rank, payload)
            values[rank] = pickle.loads(payload)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=10)
        results.close()
    return [values[rank] for rank in range(world_size)]
