"""dfm.set_threads: every CPU pool the package uses, numba's first, capped where numba must be."""

from __future__ import annotations

import warnings

import numba
import pytest
import torch
from threadpoolctl import threadpool_info

import dfmamba_st as dfm


def test_set_threads_sets_numba_torch_and_blas(keep_torch_threads):
    assert dfm.set_threads(1) == {"numba": 1, "torch": 1}
    assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and set(blas) == {1}  # numpy's BLAS is loaded: its pool is limited too


@pytest.mark.parametrize("threads", [1, 3])
def test_set_threads_sets_numba_before_torch_and_limits_blas(monkeypatch, keep_torch_threads, threads):
    """The calls, recorded whatever this machine's pools start with (BLAS may already run one thread); faked pools, so
    that 3 threads can be asked for on any machine (here numba started with 8 allowed)."""
    import threadpoolctl

    calls = []
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 8)
    monkeypatch.setattr(numba, "set_num_threads", lambda n: calls.append(("numba", n)))
    monkeypatch.setattr(numba, "get_num_threads", lambda: calls[0][1])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("torch", n)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[1][1])
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda **kw: calls.append(("blas", kw)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below numba's cap: no warning
        assert dfm.set_threads(threads) == {"numba": threads, "torch": threads}
    # numba first: where it shares torch's OpenMP runtime, starting its pool resets torch's count
    assert calls == [("numba", threads), ("torch", threads), ("blas", {"limits": threads, "user_api": "blas"})]


def test_set_threads_warns_when_numba_is_capped(monkeypatch, keep_torch_threads):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)  # as if numba had started with one thread allowed
    message = r"numba's scan kernel runs 1 of the 2 threads asked for: NUMBA_NUM_THREADS"
    with pytest.warns(UserWarning, match=message) as record:
        used = dfm.set_threads(2)
    assert used == {"numba": 1, "torch": 2}
    assert record[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize(
    ("threads", "error"), [(0, ValueError), (1.5, ValueError), ("2", TypeError), (True, TypeError)]
)
def test_set_threads_refuses_what_is_not_a_count(threads, error, keep_torch_threads):
    before = torch.get_num_threads()
    with pytest.raises(error, match="threads must be a whole number >= 1"):
        dfm.set_threads(threads)
    assert torch.get_num_threads() == before  # checked before anything is set
