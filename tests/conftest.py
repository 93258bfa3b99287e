"""Shared test helpers."""

import importlib.util
from types import ModuleType

import pytest
from _shared import BENCHMARKS


@pytest.fixture
def benchmark_module():
    """``benchmark_module("ts_forecast")``: a script of ``benchmarks/`` loaded as a module (it is not a package)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def bundled():
    """The slice shipped in the package (DLPFC 151673 cut to 3,000 genes), read once per test module."""
    import dfmamba_st as dfm

    return dfm.datasets.dlpfc_151673_hvg()


@pytest.fixture
def top(bundled):
    """The top-left of the bundled slice (492 spots), a fresh copy per test."""
    from _shared import crop

    return crop(bundled, rows=(0, 20), cols=(0, 60))


@pytest.fixture
def info_log():
    """What scanpy's logging writes at the ``info`` level while the test runs."""
    import io

    import scanpy as sc

    buf = io.StringIO()
    verbosity, logfile = sc.settings.verbosity, sc.settings.logfile
    sc.settings.verbosity, sc.settings.logfile = "info", buf
    yield buf
    sc.settings.verbosity, sc.settings.logfile = verbosity, logfile


@pytest.fixture
def keep_torch_threads():
    """torch's, numba's and the BLAS libraries' thread counts as the test found them, given back afterwards (a
    benchmark job run in-process sets them)."""
    import numba
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    blas = {pool["prefix"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)
    threadpool_limits(limits=blas)


@pytest.fixture
def one_torch_thread(keep_torch_threads):
    """torch on one thread for the test, the caller's thread count afterwards.

    The CI machine is small and shared: more threads than cores makes small models many times slower.
    """
    import torch

    torch.set_num_threads(1)
