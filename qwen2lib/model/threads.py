"""How many threads the workbook's own computations use: one per core that is actually free, or ``$QWEN2LIB_THREADS``.

Why not torch's default, one thread per core: its OpenMP threads meet at a barrier after every parallel region, so
when another process holds one of the cores every region waits for the thread that was descheduled. Beside one
busy 2-thread job, training steps of ``tiny`` took 1.2 to 5.5 s instead of 0.36 s on 2 cores, and under a load of 9
four 2-thread steps took 10 to 16 s where one thread took 4. With a thread per free core a second process costs
its share instead. The count is decided once, when ``qwen2lib`` is imported (``apply_workbook_threads``), before
this process has run anything, so its own threads are not mistaken for another's load; torch uses it, and so do
onnxruntime sessions not given a count (``compile.runtime.session_options``). Benchmarks set their own fixed
counts after the import, and the recipe of ``tiny`` fixes its own (its weights depend on it).
"""
from __future__ import annotations

import functools
import math
import os

import torch

THREADS_VARIABLE = "QWEN2LIB_THREADS"


def free_threads(cores: int, load: float) -> int:
    """Threads for a process that may use ``cores`` cores while other processes keep ``load`` of them busy:
    the cores they leave, rounded (a core more than half busy is left to them), at least 1, at most ``cores``."""
    return max(1, min(cores, math.floor(cores - max(0.0, load) + 0.5)))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def others_load(cores: int) -> float:
    """How many of our ``cores`` other processes keep busy, estimated without waiting.

    The 1-minute load average alone overstates it right after a job ends (a notebook that just finished still
    counts for most of a minute) and the count of runnable threads now alone is noisy; the smaller of the two is
    busy both recently and now. Both are machine-wide, so they are scaled to our share of the machine's cores.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            running = int(fh.read().split()[3].split("/")[0]) - 1  # less the thread reading it: this process
        load = min(load, running)
    except (OSError, IndexError, ValueError):  # not Linux: the load average alone
        pass
    return load * cores / max(cores, os.cpu_count() or cores)


def threads_from_environment(value: str | None) -> int | None:
    """``$QWEN2LIB_THREADS`` read: a whole number >= 1, or None for "decide from the free cores" (unset, '', 'auto')."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_VARIABLE}={value!r}: a whole number of threads >= 1, or 'auto' (the free cores)")
    return threads


@functools.cache
def workbook_threads() -> int:
    """The thread count of this process's computations: ``$QWEN2LIB_THREADS``, else ``$OMP_NUM_THREADS`` (a choice
    someone made for this machine), else the free cores when first asked (once per process)."""
    chosen = threads_from_environment(os.environ.get(THREADS_VARIABLE))
    if chosen is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        chosen = max(1, int(os.environ["OMP_NUM_THREADS"]))
    if chosen is None:
        cores = usable_cores()
        chosen = free_threads(cores, others_load(cores))
    return chosen


def apply_workbook_threads() -> int:
    """Set torch's intra-op thread count to ``workbook_threads()``; the count."""
    threads = workbook_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
