"""Timers, memory probes and progress lines shared by the benchmark's sections.

Contenders are timed **interleaved**: round 1 runs A, B, C, round 2 runs A, B, C again,
and so on, and each keeps the median of its rounds. Noise from a shared machine then
hits every contender alike, and the ratios of medians stay meaningful even when the
absolute times drift.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import statistics
import sys
import time
import tracemalloc
from typing import Callable

MiB = 2**20


class Progress:
    """Progress lines on a stream (default stderr), with the seconds since the start."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(
                f"[{time.perf_counter() - self.start:6.1f} s] {message}",
                file=self.stream,
                flush=True,
            )


def race(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    warmup: bool = True,
    min_round_seconds: float = 0.02,
) -> dict[str, float]:
    """Median seconds per call of each callable, in interleaved rounds (A B C A B C).

    The first (warm-up) call also sizes the rounds: a contender faster than
    ``min_round_seconds`` is called several times per round, so that the clock's
    resolution and one-off hiccups weigh less. Without ``warmup`` a round is one call.
    """
    calls = {name: 1 for name in contenders}
    if warmup:
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            first = time.perf_counter() - start
            calls[name] = max(1, min(1000, int(min_round_seconds / max(first, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def traced_peak(run: Callable[[], object]) -> int:
    """Peak bytes allocated (Python's allocators, numpy included) while ``run()`` runs.

    Counted from what was allocated when it started, so inputs do not count; the result
    it returns does (it is allocated inside).
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0, peak - base)


# --- resident memory, for allocations tracemalloc cannot see (torch, TensorFlow) ------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_high_water_mark() -> bool:
    """Linux >= 4.0: make the peak resident size (VmHWM) the current size."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_peak(run: Callable[[], object]) -> int | None:
    """Peak extra resident bytes while ``run()`` runs (``None`` where not measurable).

    Meant for a fresh process started by :func:`fresh_process_env`: the high-water mark
    is reset to the current resident size, ``run()`` runs, and the growth of the mark is
    the
    answer. Fixed malloc thresholds make every large block a fresh mapping, so memory
    freed by earlier calls cannot hide new allocations.
    """
    _trim_malloc()
    if not _reset_high_water_mark():
        return None
    base = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def fresh_process_env() -> dict[str, str]:
    """Environment for a memory-probe subprocess: glibc returns large blocks."""
    env = dict(os.environ)
    env.update(
        MALLOC_MMAP_THRESHOLD_="131072",
        MALLOC_TRIM_THRESHOLD_="131072",
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        TF_ENABLE_ONEDNN_OPTS=env.get("TF_ENABLE_ONEDNN_OPTS", "0"),
    )
    return env


# --- optional frameworks --------------------------------------------------------------


def framework(name: str):
    """The module ``torch`` or ``tensorflow``, or ``None`` if it is not installed.

    Before torch loads, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``: otherwise its idle
    OpenMP threads spin for a while after every call and steal the cores from whatever
    runs next, which in an interleaved race is the numpy contender.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch.compile compiles in this process: a pool of compile workers would keep
    # running after the compile and slow whatever is timed next
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        if name == "tensorflow":
            # silences TF's C++ logs before it loads
            importlib.import_module("companion.tensorflow")
        return importlib.import_module(name)
    except ImportError:
        return None


def set_threads(threads: int, torch_module=None) -> None:
    """Use ``threads`` threads in torch (intra-op); the caller limits numpy's BLAS."""
    if torch_module is not None:
        torch_module.set_num_threads(threads)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def cpu_record() -> dict:
    """The CPU the numbers came from: model, widest vector instruction set, one core's
    L2 cache (as the tiled kernels size their blocks), usable cores.

    The instruction set is what the CPU reports (``/proc/cpuinfo``), and, where torch
    is importable, what its kernels dispatch to (``ATEN_CPU_CAPABILITY`` lowers it, as
    the second-machine settings do).
    """
    from companion.numpy.attention import _l2_cache_bytes

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = (
        "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else ("unknown" if not flags else "SSE")
    )
    record = {"cpu_model": model, "isa": isa, "l2_bytes": _l2_cache_bytes()}
    record["cores"] = cores()
    try:
        import torch

        record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        record["torch_cpu_capability"] = None
    return record
