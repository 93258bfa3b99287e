"""Thread counts of a benchmark: the environment of a worker process, or the pools of the running process."""

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


def set_threads(threads: int) -> dict[str, int]:
    """Set this process's torch and numba pools to ``threads`` and limit its BLAS pools; returns torch's and numba's.

    For a process already running (a worker started with :func:`thread_env` has them all from the start): numba
    cannot run more threads than ``NUMBA_NUM_THREADS`` allowed at its start, so its count is capped there (the
    returned count says so); BLAS libraries loaded later keep their own start-up count (``tl.cluster`` fits its
    mixtures on one BLAS thread itself).
    """
    from threadpoolctl import threadpool_limits

    from dfmamba_st._utils import set_cpu_threads

    threadpool_limits(limits=threads, user_api="blas")  # not as a context: for the rest of the process
    return set_cpu_threads(threads)


def start_worker(threads: int) -> None:
    """A spawned worker's initializer: every pool's variable set to ``threads`` before numpy, torch or numba load.

    Pass it as ``ProcessPoolExecutor(initializer=start_worker, initargs=(threads,))`` with the ``spawn`` context (a
    fresh interpreter, which has imported none of them yet).
    """
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
