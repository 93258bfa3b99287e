"""dfm.set_threads: every CPU pool the package uses, numba's first, capped where numba must be."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_set_threads_sets_numba_before_torch(monkeypatch, keep_torch_threads):
    calls = []
    monkeypatch.setattr(numba, "set_num_threads", lambda n: calls.append(("numba", n)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("torch", n)))
    dfm.set_threads(1)
    assert calls == [("numba", 1), ("torch", 1)]  # starting numba's pool resets torch's count


def test_set_threads_warns_when_numba_is_capped(monkeypatch, keep_torch_threads):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)  # as if numba had started with one thread allowed
    with pytest.warns(UserWarning, match=r"numba's scan kernel runs 1 threads, not 2: NUMBA_NUM_THREADS") as record:
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


def test_set_threads_holds_after_numbas_pool_starts():
    """A fresh process started without the thread variables (NUMBA_NUM_THREADS=4 stands for a 4-core machine):
    numba's pool, when it starts, sets the OpenMP count torch shares, so the counts must survive a parallel kernel."""
    code = (
        "import torch, numba\n"
        "import dfmamba_st as dfm\n"
        "from dfmamba_st.core import selective_scan\n"
        "counts = dfm.set_threads(1)\n"
        "u = torch.randn(1, 4, 64); A = -torch.rand(4, 2); B = torch.randn(1, 2, 64)\n"
        "selective_scan(u, torch.rand(1, 4, 64), A, B, B.clone(), backend='numba')  # a parallel numba kernel\n"
        "print(counts['torch'], counts['numba'], torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "4"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1", "1"]  # returned, and still so after numba's kernel ran
