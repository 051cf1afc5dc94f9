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
import math
import multiprocessing
import os
import pickle
import queue as _queue
import socket
import time
import traceback

import torch
import torch.distributed as dist

__all__ = ["launch", "free_port", "under_torchrun", "device", "WorkerError"]


#: ``timeout=math.inf``: the collectives still need a finite one (a year)
_NO_TIMEOUT_S = 365 * 24 * 3600.0
#: how long a worker's reported failure waits for a peer's exit to show
_GRACE_S = 2.0


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


def _may_follow_a_crash(report) -> bool:
    """Whether a worker's error may be a consequence of a peer's death.

    The collectives report a lost peer as ``RuntimeError`` (gloo) or one of
    ``torch.distributed``'s errors, which derive from it; any other exception (a
    ``ValueError`` of the function itself) is a failure of its own.
    """
    name, _, _, payload = report
    if payload is not None:
        return isinstance(pickle.loads(payload), RuntimeError)
    return name == "RuntimeError" or name.startswith("Dist")


def _raise_if_died(workers, values, then=None) -> None:
    """``WorkerError`` for the first worker that exited non-zero without a result.

    A worker that reported an exception exits with code 0, so a non-zero code is a
    worker that died before reporting. ``then``: ``(rank, report)`` of a worker whose
    reported failure followed, added to the message.
    """
    reporter = None if then is None else then[0]
    for rank, worker in enumerate(workers):
        if rank in values or rank == reporter or worker.exitcode in (None, 0):
            continue
        message = f"rank {rank}: exited with code {worker.exitcode} before reporting"
        if then is not None:
            other, (name, text, _, _) = then
            first_line = text.strip().splitlines()[0] if text.strip() else ""
            message += f"; then rank {other} failed: {name}: {first_line}"
        error = WorkerError(message)
        error.rank = rank
        raise error from None


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


def _check_timeout(timeout) -> float:
    """``timeout`` in seconds: a positive number; ``math.inf`` for none."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds (math.inf for none), got "
            f"{type(timeout).__name__} {timeout!r}"
        )
    timeout = float(timeout)
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(
            f"timeout must be a positive number of seconds (math.inf for none), got "
            f"{timeout}"
        )
    return timeout


def _check_picklable(fn, args) -> None:
    """``spawn`` pickles ``fn`` by its qualified name and ``args`` by value."""
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"fn must be importable at module level (a function defined in a module, "
            f"not a lambda, a nested function or a notebook cell), since spawn pickles "
            f"it by name; {getattr(fn, '__qualname__', fn)!r} is not ({exc})"
        ) from None
    try:
        pickle.dumps(args)
    except Exception as exc:
        raise TypeError(f"args must pickle, to reach the workers: {exc}") from None


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
    ``timeout`` (seconds, ``math.inf`` for none) bounds the whole run and each
    collective. Returns ``[value of rank 0, value of rank 1, ...]``. Raises the first
    failing worker's exception (same type when it can be rebuilt, else
    :class:`WorkerError`), its message starting ``rank <r>:``; a worker that exits
    without reporting (``os._exit``, a crash) is that first failure even when the
    others then fail in a collective that waited for it (``rank <r>: exited with code
    <c>``); ``TimeoutError`` when the workers do not finish. The arguments are checked
    before any process starts.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    timeout = _check_timeout(timeout)
    if under_torchrun():
        return _launch_under_torchrun(fn, world_size, args, backend)
    _check_picklable(fn, args)
    backend = backend or _default_backend(world_size)
    # collectives need a finite timeout: "none" is a year
    collective_s = timeout if math.isfinite(timeout) else _NO_TIMEOUT_S
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [
        context.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, collective_s, args, results),
            name=f"companion-rank-{rank}",
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    values: dict[int, object] = {}
    start = time.monotonic()
    try:
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except _queue.Empty:
                _raise_if_died(workers, values)
                if time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"workers {sorted(set(range(world_size)) - set(values))} did "
                        f"not finish within {timeout} s"
                    ) from None
                continue
            if not ok and _may_follow_a_crash(payload):
                # a worker that died without reporting (os._exit, a crash) is the
                # first failure: the others' errors in a collective that waited for
                # it (gloo: RuntimeError "Connection closed by peer") follow from it.
                # Its exit may be a moment behind their reports.
                grace = time.monotonic() + _GRACE_S
                while True:
                    _raise_if_died(workers, values, then=(rank, payload))
                    others = [w for r, w in enumerate(workers) if r != rank]
                    if time.monotonic() > grace or not any(
                        w.is_alive() for w in others
                    ):
                        break
                    time.sleep(0.02)
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
