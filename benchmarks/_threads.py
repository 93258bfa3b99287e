"""Thread counts of a benchmark's worker processes (a running process sets its pools with ``dfm.set_threads``)."""

from __future__ import annotations

import os

# numba refuses more threads than NUMBA_NUM_THREADS allowed when it started, and the BLAS/OpenMP pools size
# themselves from these at start-up: a worker gets its count here, not from a call after import
THREAD_VARIABLES = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask under ``taskset`` or a cgroup; all cores elsewhere)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """This process's environment with every thread pool of a worker set to ``threads`` (and ``extra`` variables)."""
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads)), **extra}


def start_worker(threads: int) -> None:
    """A spawned worker's initializer: every pool's variable set to ``threads`` before numpy, torch or numba load.

    Pass it as ``ProcessPoolExecutor(initializer=start_worker, initargs=(threads,))`` with the ``spawn`` context (a
    fresh interpreter, which has imported none of them yet).
    """
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
