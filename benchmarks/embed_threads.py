"""Seconds of the default ``tl.embed`` on the bundled slice with one thread and with one per core, on an idle machine
and with all cores but one kept busy by other processes.

torch (and numba) use one thread per core by default. When other work holds some of the cores, threads wait for each
other at every parallel step; this measures what that costs on this machine. Each run is a fresh process (its own
thread settings); the busy cores run a pure-Python loop each. The baseline is the one-thread run of the same
condition, measured in the same run of the script.

Usage::

    python benchmarks/embed_threads.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._threads import available_cores, thread_env  # noqa: E402

JOB = """
import sys, time
import dfmamba_st as dfm
threads = int(sys.argv[1])
dfm.set_threads(threads)
adata = dfm.datasets.dlpfc_151673_hvg()
dfm.pp.serialize(adata)
start = time.perf_counter()
dfm.tl.embed(adata, progress=False, seed=0)
print(time.perf_counter() - start)
"""


def _spin() -> None:
    while True:
        pass


def embed_seconds(threads: int) -> float:
    """Seconds of ``tl.embed`` (defaults, seed 0) in a fresh process with ``threads`` torch and numba threads."""
    done = subprocess.run(
        [sys.executable, "-c", JOB, str(threads)],
        env=thread_env(threads),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cores = available_cores()
    if cores < 2:
        raise SystemExit("needs at least 2 cores")
    rows = []
    for busy in (0, cores - 1):
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            for threads in (1, cores):
                for repeat in range(args.repeats):
                    seconds = embed_seconds(threads)
                    rows.append(dict(busy_cores=busy, threads=threads, repeat=repeat, seconds=seconds))
                    print(f"busy cores {busy}, threads {threads}, repeat {repeat}: {seconds:.1f} s", flush=True)
        finally:
            for p in spinners:
                p.terminate()
                p.join()
        time.sleep(2)
    runs = pd.DataFrame(rows)
    table = runs.groupby(["busy_cores", "threads"])["seconds"].agg(["min", "median", "max"]).reset_index()
    one = table[table["threads"] == 1].set_index("busy_cores")["median"]
    table["vs_one_thread"] = table["median"] / table["busy_cores"].map(one)
    print(f"\ntl.embed defaults on the bundled slice (3,639 spots), {cores} cores, {args.repeats} runs each")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return table


if __name__ == "__main__":
    main()
