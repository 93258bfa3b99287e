"""Scaling of the whole workflow (serialize + embed + cluster) on a layered synthetic tissue, 10k to 1M spots.

The tissue is seeded and has no grid, like single cells from Xenium/CosMx/MERFISH: points scattered uniformly over
a 3:2 rectangle (about one per unit area), cut into six curved layers of unequal width (cortex-like bands with a
wavy boundary). Each spot draws Poisson counts for 200 genes from its layer's profile (15 markers per layer
raised 1.8-fold, a shared background, a per-spot size factor), at a low depth (about 150 counts), so one spot
alone is noisy and its layer has to be read from its neighbourhood. The truth is the layer of every spot. The
layers are simple: what this benchmark measures is time and memory; its ARI shows that nothing breaks with size,
and the baselines, run on the same tissue in the same process, show how easy the layers are.

Each size runs in a fresh process (its own peak RSS, no caches shared); the table prints spots, seconds of
serialize + embed + cluster, peak RSS of that process after them (data generation included, the baselines not),
ARI against the layers, the growth of the time per 4× spots (``(t2/t1) ** (log 4 / log(n2/n1))``), and the ARI and
seconds of the two baselines of ``benchmarks/st_dlpfc.py`` (PCA → GMM of single spots, and of the PCs averaged over
each spot and its 18 nearest; K = 6) on the same tissue. Default settings of the package throughout (preset "cpu",
``tl.cluster(n_clusters=6, random_state=seed)``). A size that fails gets a row saying so, and the script exits with
status 1.

Run from the repository root::

    python benchmarks/scale.py                 # 10k, 50k, 200k
    python benchmarks/scale.py --big           # and 1M
    python benchmarks/scale.py --sizes 20000   # any sizes
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._threads import thread_env  # noqa: E402
from benchmarks.st_dlpfc import BASELINES, cluster_baseline  # noqa: E402

N_GENES = 200
N_LAYERS = 6
MARKERS = 15
DEPTH = 150.0
FOLD = 0.6


def layered_tissue(n_spots: int, seed: int = 0):
    """The synthetic tissue as an AnnData: counts in ``X`` (sparse), points in ``obsm['spatial']``, ``obs['layer']``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    width, height = math.sqrt(1.5 * n_spots), math.sqrt(n_spots / 1.5)
    xy = rng.uniform(size=(n_spots, 2)) * [width, height]
    depth = xy[:, 1] / height + 0.06 * np.sin(2 * np.pi * 1.5 * xy[:, 0] / width)
    edges = np.cumsum([0.10, 0.18, 0.14, 0.20, 0.16])  # six layers of unequal width
    layer = np.searchsorted(edges, depth)

    profile = np.random.default_rng(12345).normal(0.0, 0.5, size=N_GENES)  # the same genes at every size
    effect = np.zeros((N_LAYERS, N_GENES))
    for k in range(N_LAYERS):
        effect[k, k * MARKERS : (k + 1) * MARKERS] = FOLD
    log_rate = profile[None, :] + effect
    rate = np.exp(log_rate) / np.exp(log_rate).sum(axis=1, keepdims=True) * DEPTH
    size = rng.lognormal(0.0, 0.3, size=n_spots)
    rows = []
    for begin in range(0, n_spots, 100_000):  # in blocks: no dense n × genes float64 of the whole tissue
        block = slice(begin, min(n_spots, begin + 100_000))
        counts = rng.poisson(size[block, None] * rate[layer[block]]).astype(np.float32)
        rows.append(sp.csr_matrix(counts))
    X = sp.vstack(rows, format="csr")
    obs = pd.DataFrame({"layer": pd.Categorical(layer.astype(str))}, index=[f"spot{i}" for i in range(n_spots)])
    var = pd.DataFrame(index=[f"gene{g}" for g in range(N_GENES)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = xy * 10.0  # µm-like units
    return adata


def run_one(n_spots: int, seed: int, threads: int) -> dict:
    """Generate, then time serialize + embed + cluster in this process (peak RSS of the process after them), then the
    baselines on the same tissue."""
    import dfmamba_st as dfm

    dfm.set_threads(threads)
    adata = layered_tissue(n_spots, seed)
    start = time.perf_counter()
    dfm.pp.serialize(adata)
    t_serialize = time.perf_counter()
    dfm.tl.embed(adata, progress=False, seed=seed)
    t_embed = time.perf_counter()
    dfm.tl.cluster(adata, N_LAYERS, random_state=seed, progress=False)
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the baselines
    scores = dfm.metrics.evaluate(adata, "layer")
    baselines = {}
    for kind in BASELINES:  # a baseline that fails (memory at 1M spots) costs its own columns, not the method's row
        begin = time.perf_counter()
        try:
            key = cluster_baseline(adata, kind, N_LAYERS, seed, {})
        except (MemoryError, ValueError) as err:
            print(f"{kind} failed on {n_spots} spots: {err!r}", file=sys.stderr)
            baselines[f"{kind}_s"] = baselines[f"{kind}_ari"] = float("nan")
            continue
        baselines[f"{kind}_s"] = time.perf_counter() - begin
        baselines[f"{kind}_ari"] = float(dfm.metrics.evaluate(adata, "layer", pred_key=key)["ari"].iloc[0])
    return {
        "spots": n_spots,
        "seconds": end - start,
        "serialize_s": t_serialize - start,
        "embed_s": t_embed - t_serialize,
        "cluster_s": end - t_embed,
        "peak_rss_gb": peak,
        "ari": float(scores["ari"].iloc[0]),
        "nmi": float(scores["nmi"].iloc[0]),
        **baselines,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000, 200_000])
    p.add_argument("--big", action="store_true", help="add 1,000,000 spots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / numba / OpenMP threads of each run")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.seed, args.threads)))
        return
    sizes = sorted(set(args.sizes + ([1_000_000] if args.big else [])))
    rows, failed = [], []
    for n in sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--seed", str(args.seed), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
        if done.returncode != 0:
            print(f"{n} spots failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            failed.append(n)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"done {n} spots: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(f"\nlayered synthetic tissue, seed {args.seed}, {args.threads} threads; serialize + embed + cluster\n")
    print(
        "| spots | seconds | serialize s | embed s | cluster s | peak RSS GB | ARI | NMI | time growth per 4x "
        "| PCA → GMM ARI (s) | neighbour mean ARI (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        growth = "-"
        if i:
            prev = rows[i - 1]
            exponent = math.log(4) / math.log(row["spots"] / prev["spots"])
            growth = f"{(row['seconds'] / prev['seconds']) ** exponent:.2f}"
        baselines = " | ".join(f"{row[f'{kind}_ari']:.3f} ({row[f'{kind}_s']:.1f})" for kind in BASELINES)
        print(
            f"| {row['spots']:,} | {row['seconds']:.1f} | {row['serialize_s']:.1f} | {row['embed_s']:.1f} | "
            f"{row['cluster_s']:.1f} | {row['peak_rss_gb']:.2f} | {row['ari']:.3f} | {row['nmi']:.3f} | {growth} "
            f"| {baselines} |"
        )
    for n in failed:
        print(f"| {n:,} | failed (its error above, on stderr) |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
