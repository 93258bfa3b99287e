"""Several slices in one run: one model and one clustering over all of them, against each slice on its own.

DLPFC 151673 and 151674 (adjacent sections of one donor, K = 7) by default. Two methods, three ways each, every
job in a fresh process (so peak memory is its own) with every thread pool at ``--threads``:

- ``dfmamba_st joint``: the slices in one AnnData (``obs['library']``; the genes they all share, as
  ``anndata.concat(join="inner")`` keeps them), ``pp.serialize`` / ``tl.embed`` / ``tl.cluster`` with
  ``library_key="library"``: one model trained over all slices, one GMM over all spots, so a domain has one label in
  every slice;
- ``dfmamba_st per slice, shared genes``: the default workflow on each slice alone (``benchmarks/st_dlpfc.py``'s
  job; seconds summed over the slices, peak memory their maximum), each slice cut to the genes the joint job has:
  the two differ only in analysing the slices together;
- ``dfmamba_st per slice, own genes``: the same on each slice's whole file (its 3,000 HVGs chosen among all its
  genes), as a slice analysed alone would be; its genes differ from the joint job's, so it does not isolate the
  effect of analysing the slices together;
- ``pca_nbmean_gmm joint`` / ``per slice, shared genes`` / ``per slice, own genes``: the neighbour-mean baseline of
  ``benchmarks/st_dlpfc.py`` (genes, scaling and PCs fitted on all slices together, each spot averaged with its 18
  nearest spots of its own slice, one GMM), and the same on each slice alone.

Prints one table: ARI on each slice, the pooled ARI over all spots (joint methods only: it is high when one domain
label means the same layer in every slice; per-slice labels are not comparable across slices), the number of
domains found in each slice, seconds, peak MB. ``--cluster`` options go to every ``tl.cluster`` call (as in
``benchmarks/st_dlpfc.py``).

Usage::

    python benchmarks/st_multislice.py                                  # 151673 + 151674, seeds 0-2
    python benchmarks/st_multislice.py --seeds 0 1 2 3 4 --threads 1
    python benchmarks/st_multislice.py --cluster n_clusters=none   # every method chooses K (the knee of the BIC)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._options import add_options_flag, parse_options  # noqa: E402
from benchmarks.st_dlpfc import (  # noqa: E402
    DEFAULT_DATA,
    FILES,
    HER2ST_DATA,
    _cluster_options,
    _job,
    _peak_mb,
    _scores,
    cluster_baseline,
    load_slice,
    run_in_worker,
    slice_path,
)

METHODS = ("dfmamba_st", "pca_nbmean_gmm")


def _joint_job(
    method: str, paths: dict[str, str], seed: int, threads: int, cluster_options: dict | None = None
) -> dict:
    """Both slices in one AnnData, one model (dfmamba_st) or one set of PCs (baseline), one GMM."""
    import anndata as ad

    import dfmamba_st as dfm  # in the worker: after start_worker set the thread variables

    dfm.set_threads(threads)

    loaded = {s: load_slice(p) for s, p in paths.items()}
    ks = {k for _, k in loaded.values()}
    if len(ks) != 1:
        counts = {s: k for s, (_, k) in loaded.items()}
        raise ValueError(f"the slices have different numbers of truth domains: {counts}")
    (k,) = ks
    n_clusters, cluster = _cluster_options(cluster_options, k)
    adata = ad.concat(
        {s: a for s, (a, _) in loaded.items()}, label="library", join="inner", index_unique="-", merge="same"
    )
    start = time.time()
    if method == "dfmamba_st":
        dfm.pp.serialize(adata, library_key="library")
        dfm.tl.embed(adata, library_key="library", seed=seed, progress=False)
        dfm.tl.cluster(adata, n_clusters, library_key="library", random_state=seed, **cluster)
        key = "dfm_domain"
    else:  # each spot averaged within its own slice; the GMM fits each slice's curve in turn
        key = cluster_baseline(adata, method, n_clusters, seed, cluster, library_key="library")
    seconds = time.time() - start
    library = adata.obs["library"].to_numpy()
    return {
        "method": f"{method} joint",
        "seed": seed,
        **{f"ari {s}": _scores(adata[library == s], key)["ari"] for s in paths},
        "ari pooled": _scores(adata, key)["ari"],
        **{f"k_found {s}": adata.obs[key][library == s].nunique() for s in paths},
        "seconds": seconds,
        "peak_mb": _peak_mb(),
    }


def shared_genes(paths: dict[str, str]) -> list[str]:
    """The genes every slice has, in the first slice's order (those ``anndata.concat(join="inner")`` keeps)."""
    import anndata as ad

    names = []
    for path in paths.values():
        backed = ad.read_h5ad(path, backed="r")
        names.append(backed.var_names.copy())
        backed.file.close()
    first = names[0]
    return [g for g in first if all(g in other for other in names[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder of the DLPFC slices")
    parser.add_argument("--slices", nargs="+", default=["151673", "151674"], help=f"two or more of {list(FILES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of every pool (torch, numba, BLAS/OpenMP) of each job"
    )
    add_options_flag(parser, "--cluster", "options of tl.cluster for every method, e.g. --cluster n_clusters=none")
    args = parser.parse_args(argv)
    if len(args.slices) < 2:
        parser.error("--slices needs two or more slices")

    import numpy as np
    import pandas as pd

    paths = {s: str(slice_path(s, args.data_dir, HER2ST_DATA)) for s in args.slices}
    cluster_options = parse_options(args.cluster, "--cluster")
    if cluster_options:
        print(f"tl.cluster options (every method): {cluster_options}", flush=True)
    genes = shared_genes(paths)
    print(f"genes shared by {', '.join(args.slices)}: {len(genes)}", flush=True)
    rows = []
    for method in METHODS:
        for seed in args.seeds:
            rows.append(run_in_worker(_joint_job, args.threads, method, paths, seed, args.threads, cluster_options))
            for panel, kept in (("shared genes", genes), ("own genes", None)):
                singles = [
                    run_in_worker(
                        _job, args.threads, method, paths[s], s, seed, args.threads, {}, cluster_options, kept
                    )
                    for s in args.slices
                ]
                rows.append(
                    {
                        "method": f"{method} per slice, {panel}",
                        "seed": seed,
                        **{f"ari {r['slice']}": r["ari"] for r in singles},
                        "ari pooled": np.nan,
                        **{f"k_found {r['slice']}": r["k_found"] for r in singles},
                        "seconds": sum(r["seconds"] for r in singles),
                        "peak_mb": max(r["peak_mb"] for r in singles),
                    }
                )
            for r in rows[-3:]:
                print(f"{r['method']:>40} seed {seed}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print("\nper run")
    print(table.round(3).to_string(index=False))
    print(f"\nmean over seeds {args.seeds}")
    print(table.drop(columns="seed").groupby("method", sort=False).mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
