"""The environment of a benchmark's worker process that runs with a given number of threads."""

from __future__ import annotations

import os

# numba refuses more threads than NUMBA_NUM_THREADS allowed when it started, and the BLAS/OpenMP pools size
# themselves from these at start-up: a worker gets its count here, not from a call after import
THREAD_VARIABLES = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """This process's environment with every thread pool of a worker set to ``threads`` (and ``extra`` variables)."""
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads)), **extra}
