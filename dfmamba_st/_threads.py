"""One call that sets every CPU thread pool the package uses: :func:`set_threads`."""

from __future__ import annotations

import warnings

from ._utils import user_stacklevel, whole_number


def set_threads(threads: int) -> dict[str, int]:
    """Run the package's CPU work on ``threads`` threads: numba's scan kernel, torch, and the BLAS libraries.

    By default every pool takes one thread per core. Next to other work that holds cores (a shared server, several
    notebooks at once) fewer threads run faster: on a 2-core machine with one core busy, :func:`~dfmamba_st.tl.embed`
    took 255 s on two threads against 26.5 s on one (``docs/spatial.md``, "Threads on a machine shared with other
    work"). Call it before the work, once per Python session; it holds until it is called again.

    numba's count is set first: where numba's pool and torch share one OpenMP runtime, starting the pool resets
    torch's count (a ``torch.set_num_threads(1)`` became one thread per core on the install of 2026-12-06; on the
    install of 2026-12-07 each has its own runtime and the order made no difference). numba cannot run more threads
    than it was allowed when it started (``NUMBA_NUM_THREADS``, the cores it saw unless set): a larger request is
    capped there, with a warning. The BLAS pools (scanpy's PCA, the mixtures' linear algebra) are limited through
    threadpoolctl; a BLAS library loaded after the call keeps its own count.

    Parameters
    ----------
    threads
        Threads per pool, a whole number ``>= 1``.

    Returns
    -------
    The counts now in force, ``{"numba": ..., "torch": ...}``.

    Examples
    --------
    >>> import torch
    >>> import dfmamba_st as dfm
    >>> before = torch.get_num_threads()
    >>> dfm.set_threads(1)  # one thread per pool, e.g. next to other jobs
    {'numba': 1, 'torch': 1}
    >>> used = dfm.set_threads(before)  # torch's count before the call, for every pool
    """
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    threads = whole_number(threads, "threads")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")  # not as a context: for the rest of the session
    used = {"numba": numba.get_num_threads(), "torch": torch.get_num_threads()}
    if used["numba"] < threads:
        warnings.warn(
            f"numba's scan kernel runs {used['numba']} of the {threads} threads asked for: NUMBA_NUM_THREADS, read "
            "when numba started, caps it (set the variable before starting Python to allow more).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return used
