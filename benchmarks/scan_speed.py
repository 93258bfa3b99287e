"""Speed and memory of the selective-scan backends (forward + backward, fp32, CPU or a CUDA GPU).

Every (backend, L, d_inner) configuration runs in its own subprocess, so that memory numbers do not
mix and a slow configuration can be cut off. In the subprocess the inputs are built, one warm-up call
is made (numba: loads or compiles the kernels), then ``--reps`` timed forward+backward passes run;
the table reports their median.

Memory: the peak resident set size of the subprocess during one forward+backward pass, minus the
resident size just before it (Linux: the peak is reset through ``/proc/self/clear_refs``; glibc is
told to return freed blocks to the system at once, ``MALLOC_MMAP_THRESHOLD_=65536`` and ``malloc_trim``
before the pass). It therefore
counts everything the pass allocates -- outputs, saved tensors, workspace, the input gradients --
for torch, numpy and numba alike. With ``--device cuda`` the inputs live on the GPU, every timed pass ends with
``torch.cuda.synchronize()``, and memory is the peak of ``torch.cuda.max_memory_allocated`` during the pass minus
what was allocated before it (the same things, counted by PyTorch's allocator).

Usage::

    python benchmarks/scan_speed.py            # L in {1024, 4096, 16384}, d_inner in {256, 1024}
    python benchmarks/scan_speed.py --quick    # small sizes (36 s on one thread, 2026-12-06)
    python benchmarks/scan_speed.py --full     # also the reference loop at the longest length
    python benchmarks/scan_speed.py --device cuda --backends torch cuda   # a GPU: PyTorch against mamba-ssm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._threads import available_cores, thread_env  # noqa: E402


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _release_free_memory() -> None:
    """Return freed heap pages to the system, so reusing them shows up in the next peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(
    backend: str, length: int, d_inner: int, N: int, batch: int, reps: int, threads: int, device: str = "cpu"
) -> dict:
    """Time and measure one configuration in this process."""
    import torch

    cuda = device == "cuda"

    from dfmamba_st import set_threads
    from dfmamba_st.core.scan import selective_scan

    set_threads(threads)  # numba's pool first, then torch's (the worker's variables allow that many)

    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, d_inner, length, generator=g).requires_grad_()
    delta = (0.01 + 0.1 * torch.rand(batch, d_inner, length, generator=g)).requires_grad_()
    A = (-torch.rand(d_inner, N, generator=g) - 0.1).requires_grad_()
    B = torch.randn(batch, N, length, generator=g).requires_grad_()
    C = torch.randn(batch, N, length, generator=g).requires_grad_()
    D = torch.randn(d_inner, generator=g).requires_grad_()
    z = torch.randn(batch, d_inner, length, generator=g).requires_grad_()
    w = torch.randn(batch, d_inner, length, generator=g)
    leaves = [u, delta, A, B, C, D, z]
    if cuda:
        leaves = [t.detach().cuda().requires_grad_() for t in leaves]
        u, delta, A, B, C, D, z = leaves
        w = w.cuda()

    def step() -> None:
        y = selective_scan(u, delta, A, B, C, D, z, backend=backend)
        grads = torch.autograd.grad((y * w).sum(), leaves)
        del y, grads
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    if backend == "reference":  # nothing to compile: warm up on a short sequence only
        selective_scan(u[..., :32], delta[..., :32], A, B[..., :32], C[..., :32], D, z[..., :32], backend=backend)
    else:
        step()
    warmup = time.perf_counter() - t0
    times = []
    cpu_times = []
    peak_mib = None
    for i in range(reps):
        measure = i == reps - 1
        if measure:
            _release_free_memory()
            if cuda:
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ok = True
            else:
                before = _rss_kib("VmRSS")
                ok = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if measure and ok:
            if cuda:
                peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
            else:
                peak_mib = (_rss_kib("VmHWM") - before) / 1024
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "times": times,
        "warmup": warmup,
        "peak_mib": peak_mib,
    }


def run_config(args: argparse.Namespace, backend: str, length: int, d_inner: int) -> dict:
    reps = args.reps if backend != "reference" else max(1, min(args.reps, args.reference_reps))
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([backend, length, d_inner, args.N, args.batch, reps, args.threads, args.device]),
    ]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = thread_env(args.threads, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=path)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout} s"}
    except subprocess.CalledProcessError as err:
        return {"error": err.stderr.strip().splitlines()[-1] if err.stderr.strip() else f"exit {err.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: dict, backends: list[str], lengths: list[int], dims: list[int]) -> None:
    """Markdown table; speed-ups are against the reference loop at the same (L, d_inner)."""
    cols = ["backend", "d_inner", "L", "wall s", "CPU s", "peak MiB", "speed-up wall", "speed-up CPU"]
    cols += ["growth/4x L wall", "growth/4x L CPU"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for d_inner in dims:
        for backend in backends:
            for length in lengths:
                res = results.get((backend, length, d_inner), {"error": "not run"})
                if "error" in res:
                    print(f"| {backend} | {d_inner} | {length} | {res['error']} | | | | | | |")
                    continue
                ref = results.get(("reference", length, d_inner), {})
                prev = results.get((backend, length // 4, d_inner), {}) if length // 4 in lengths else {}

                def ratio(num: dict, den: dict, key: str) -> float | None:
                    a, b = num.get(key), den.get(key)
                    return a / b if a is not None and b is not None and b > 0 else None

                cells = [
                    backend,
                    str(d_inner),
                    str(length),
                    fmt(res["seconds"], ".4f"),
                    fmt(res.get("cpu_seconds"), ".4f"),
                    fmt(res.get("peak_mib"), ".1f"),
                    fmt(ratio(ref, res, "seconds"), ".1f"),
                    fmt(ratio(ref, res, "cpu_seconds"), ".1f"),
                    fmt(ratio(res, prev, "seconds"), ".2f"),
                    fmt(ratio(res, prev, "cpu_seconds"), ".2f"),
                ]
                print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: L in {256, 1024}, d_inner 64")
    parser.add_argument("--full", action="store_true", help="run the reference loop at every length")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384)")
    parser.add_argument("--d-inner", type=int, nargs="+", help="channel counts (default 256 1024)")
    parser.add_argument("--backends", nargs="+", default=["reference", "torch", "numba"])
    parser.add_argument("--N", type=int, default=16, help="state size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the inputs live")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--reference-reps", type=int, default=2, help="at most this many for the slow loop")
    parser.add_argument("--reference-max-length", type=int, default=4096, help="longest L for the loop (no --full)")
    parser.add_argument(
        "--threads",
        type=int,
        default=available_cores(),
        help="torch, numba and BLAS threads of each timed process (default: the cores this process may use)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--table-from", type=Path, help="print the table of a --json file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.table_from:
        rows = json.loads(args.table_from.read_text())
        results = {(r["backend"], r["L"], r["d_inner"]): r for r in rows}
        keys = list(results)
        backends = list(dict.fromkeys(k[0] for k in keys))
        lengths = sorted({k[1] for k in keys})
        dims = sorted({k[2] for k in keys})
        print_table(results, backends, lengths, dims)
        return

    if args.threads < 1:
        parser.error(f"--threads {args.threads}: at least 1.")
    lengths = args.lengths or ([256, 1024] if args.quick else [1024, 4096, 16384])
    dims = args.d_inner or ([64] if args.quick else [256, 1024])
    ref_max = max(lengths) if args.full else args.reference_max_length
    print(
        f"selective scan, forward+backward, {args.device} fp32, batch {args.batch}, N {args.N}, "
        f"{args.threads} thread(s), "
        f"median of {args.reps} reps (reference loop: {min(args.reps, args.reference_reps)}) after a warm-up"
    )
    print(
        "wall s / CPU s: median wall-clock / process CPU time (all threads) of one forward+backward; "
        f"peak MiB: peak {'CUDA-allocator' if args.device == 'cuda' else 'RSS'} increase of the subprocess during "
        "one forward+backward "
        "(outputs, saved tensors, workspace and input gradients)"
    )
    results = {}
    for d_inner in dims:
        for length in lengths:
            for backend in args.backends:
                if backend == "reference" and length > ref_max:
                    results[backend, length, d_inner] = {"error": f"skipped (L > {ref_max}; --full runs it)"}
                    continue
                res = run_config(args, backend, length, d_inner)
                results[backend, length, d_inner] = res
                print(f"  done {backend:9s} L={length:6d} d_inner={d_inner:5d}: {res}", file=sys.stderr, flush=True)

    print_table(results, args.backends, lengths, dims)
    if args.json:
        rows = [{"backend": k[0], "L": k[1], "d_inner": k[2], **v} for k, v in results.items()]
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
