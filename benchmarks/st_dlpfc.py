"""DLPFC spatial-domain benchmark: dfmamba_st's default CPU workflow against two baselines, in one run.

Every job runs in a fresh process (so peak memory is its own) whose torch, numba and BLAS/OpenMP pools all have
``--threads`` threads (the variables are set before any of them loads; the table says torch's and numba's). Prints one
table: method, slice, seed, ARI, NMI, completeness, seconds (serialize + embed + cluster, or the baseline's
pipeline), peak RSS (MB), how much of it the pipeline added (``pipeline_mb``: the peak less the peak before the timed
steps, which already holds the imports and the slice, about 0.5 GB) and, for a job on a GPU, the peak of PyTorch's
CUDA allocator (MB); the means over seeds; and every method paired with the neighbour-mean baseline on the same
slice and seed (mean difference, its standard error, seeds up / down), per slice and over all pairs. Then
zero-shot scale (model trained on native 151673 → ×2 / ×4 coarsened 151673) and transfer (model trained on 151673 →
151674, against training on 151674 itself), with the same ``--embed`` options. ``--cluster`` options go to every
``tl.cluster`` call of every method (baselines included), so a change of the clustering is measured on all of them
alike;
``--cluster n_clusters=none`` lets every method's ``tl.cluster`` choose K itself (the knee of the BIC curve), and
``k_found`` in the table says how many domains each run found.

Slices: the three DLPFC slices (truth ``obs['layer']``, K = 7) by default; the HER2+ breast-cancer sections
``A1 B1 C1 D1`` (legacy Spatial Transcriptomics, no Visium grid; truth the pathologist's ``obs['label']`` without
"undetermined", K = the number of regions annotated in the section) with ``--slices``: data the defaults were not
tuned on. ``bundled`` is the slice that ships inside the package (151673 cut to 3,000 HVGs; what ``python -m
dfmamba_st`` runs), so the benchmark also runs on a machine without ``../shared``. Every method gets K from the truth
of its slice.

Baselines (same clustering as ``tl.cluster``, a tied-covariance GMM with K clusters on the 20 leading PCs, no
refinement; the spots serialized first, so every method's GMM fits them in the curve's order), on the genes
``tl.embed`` uses (the 3,000 with the highest scanpy ``seurat_v3`` scores, ties at the cut broken by name; scanpy's
own pick breaks them in an order that depends on the CPU):
- ``pca_gmm``: log-normalised HVGs → 30 PCs → GMM;
- ``pca_nbmean_gmm``: the same PCs averaged over each spot and its 18 nearest spots → GMM.

Ablation (not run by default, ``--methods dfm_features``): ``tl.embed``'s own spot features (HVGs → 50 PCs, the
preset's) averaged over two rings of grid neighbours — the expression half of the default ``"concat"`` readout —
clustered by ``tl.cluster`` with its defaults (refinement on), no DF-Mamba: what the model adds to its own input.
Ablation ``--methods dfmamba_st --embed epochs=0``: the workflow with the model left at the initial weights its
training starts from: what training adds.

Usage::

    python benchmarks/st_dlpfc.py                       # 3 slices x 3 seeds + zero-shot + transfer
    python benchmarks/st_dlpfc.py --seeds 0 --slices 151673 --no-extra   # quick
    python benchmarks/st_dlpfc.py --methods dfmamba_st --no-extra --embed readout_hops=0   # an ablation
    python benchmarks/st_dlpfc.py --methods dfmamba_st --no-extra --embed epochs=0   # the model untrained
    python benchmarks/st_dlpfc.py --no-extra --cluster tol=1e-6   # EM of every method's GMM run to convergence
    python benchmarks/st_dlpfc.py --no-extra --cluster n_clusters=none   # K chosen by tl.cluster, not the truth
    python benchmarks/st_dlpfc.py --slices A1 B1 C1 D1 --no-extra   # the HER2ST sections (held-out tissue)
    python benchmarks/st_dlpfc.py --slices bundled --no-extra       # the slice python -m dfmamba_st runs
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import inspect
import multiprocessing as mp
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._options import add_options_flag, parse_options  # noqa: E402
from benchmarks._threads import start_worker  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dlpfc"
FILES = {"151673": "dlpfc_151673.h5ad", "151674": "dlpfc_151674.h5ad", "151510": "dlpfc_151510_500genes_drsc.h5ad"}
HER2ST_DATA = REPO.parent / "shared" / "data" / "her2st"
HER2ST_FILES = {s: f"her2st_{s}.h5ad" for s in ("A1", "B1", "C1", "D1")}
BUNDLED = REPO / "dfmamba_st" / "data" / "dlpfc_151673_hvg.h5ad"  # dfm.datasets.dlpfc_151673_hvg()'s file
SLICES = [*FILES, *HER2ST_FILES, "bundled"]
BASELINES = ("pca_gmm", "pca_nbmean_gmm")
METHODS = (*BASELINES, "dfmamba_st", "dfm_features")
#: the method every other is paired with, seed for seed
PAIRED_WITH = "pca_nbmean_gmm"


def slice_path(slice_id: str, data_dir: Path | str = DEFAULT_DATA, her2st_dir: Path | str = HER2ST_DATA) -> Path:
    """The file of a DLPFC slice (in ``data_dir``), a HER2ST section (in ``her2st_dir``) or the ``bundled`` slice."""
    if slice_id == "bundled":
        return BUNDLED
    if slice_id in FILES:
        return Path(data_dir) / FILES[slice_id]
    if slice_id in HER2ST_FILES:
        return Path(her2st_dir) / HER2ST_FILES[slice_id]
    raise ValueError(f"Unknown slice {slice_id!r}; choose from {SLICES}.")


def load_slice(path: Path | str):
    """Read a slice and put its truth in ``obs['truth']`` (NaN where unscored); returns ``(adata, K)``."""
    import anndata as ad
    import pandas as pd

    adata = ad.read_h5ad(path)
    truth = (adata.obs["layer"] if "layer" in adata.obs else adata.obs["label"]).astype(object)
    truth = truth.where(truth.notna() & (truth.astype(str) != "undetermined"))  # HER2ST: not a region
    adata.obs["truth"] = pd.Categorical(truth)
    return adata, int(adata.obs["truth"].nunique())


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak_mb() -> float:
    """Peak memory PyTorch's CUDA allocator held in this process (NaN when the job never touched a GPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else float("nan")


def _scores(adata, key: str) -> dict:
    import dfmamba_st as dfm

    row = dfm.metrics.evaluate(adata, "truth", pred_key=key).loc["all"]
    return {
        "k_found": int(adata.obs[key].nunique()),
        "ari": float(row["ari"]),
        "nmi": float(row["nmi"]),
        "completeness": float(row["completeness"]),
    }


def _cluster_options(options: dict | None, k: int) -> tuple[int | None, dict]:
    """K for ``tl.cluster`` (the truth's, unless ``--cluster`` sets ``n_clusters``) and the other options (no progress
    bar, which would fill the log)."""
    options = {"progress": False, **(options or {})}
    return options.pop("n_clusters", k), options


def baseline_rep(adata, kind: str, seed: int, library_key: str | None = None):
    """The baselines' representation: log-normalised HVGs → 30 PCs (``pca_gmm``), averaged over each spot and its
    18 nearest spots of the same library (``pca_nbmean_gmm``). Genes and PCs are fitted on all libraries together."""
    if kind not in BASELINES:
        raise ValueError(f"Unknown baseline {kind!r}; choose from {BASELINES}.")
    import numpy as np
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    from dfmamba_st._utils import library_indices
    from dfmamba_st.tl._features import expression_matrix, top_genes

    work = adata.copy()
    if work.n_vars > 3000:  # the genes tl.embed takes (scanpy's seurat_v3 scores, ties at the cut by name)
        counts, is_counts, _ = expression_matrix(work, None)
        work = work[:, top_genes(counts, work.var_names, 3000, is_counts)].copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    with warnings.catch_warnings():  # scanpy says, once per job, that centring densifies the sparse matrix
        warnings.filterwarnings("ignore", message="zero-centering a sparse array", category=UserWarning)
        sc.pp.scale(work, max_value=10)
    pcs = sc.pp.pca(work.X, n_comps=30, random_state=seed)
    if kind == "pca_gmm":
        return pcs
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    smoothed = np.empty_like(pcs)
    for idx in library_indices(adata, library_key):
        _, nbrs = NearestNeighbors(n_neighbors=19).fit(xy[idx]).kneighbors(xy[idx])
        smoothed[idx] = pcs[idx[nbrs]].mean(axis=1)
    return smoothed


def cluster_baseline(
    adata, kind: str, n_clusters: int | None, seed: int, cluster: dict, library_key: str | None = None
) -> str:
    """A baseline's domains: its representation (:func:`baseline_rep`) in ``obsm['X_base']``, the spots serialized
    (each library its own sequence) so that the GMM fits them in curve order as for the other methods, then
    ``tl.cluster`` without refinement. Returns the key of the domains in ``obs``."""
    import dfmamba_st as dfm

    adata.obsm["X_base"] = baseline_rep(adata, kind, seed, library_key=library_key)
    dfm.pp.serialize(adata, library_key=library_key)
    options = {"refine": False, **cluster}
    dfm.tl.cluster(adata, n_clusters, use_rep="X_base", random_state=seed, key_added="base", **options)
    return "base"


def _job(
    kind: str,
    path: str,
    slice_id: str,
    seed: int,
    threads: int,
    embed_options: dict,
    cluster_options: dict | None = None,
    genes: list[str] | None = None,
) -> dict:
    """One method on one slice and seed, in this (fresh) process; ``genes`` restricts the slice to those genes."""
    import dfmamba_st as dfm  # in the worker: after start_worker set the thread variables

    used = dfm.set_threads(threads)

    adata, k = load_slice(path)
    if genes is not None:
        adata = adata[:, adata.var_names.isin(genes)].copy()
    n_clusters, cluster = _cluster_options(cluster_options, k)
    before = _peak_mb()  # the imports and the slice
    start = time.time()
    if kind == "dfmamba_st":
        dfm.pp.serialize(adata)
        dfm.tl.embed(adata, seed=seed, progress=False, **embed_options)
        dfm.tl.cluster(adata, n_clusters, random_state=seed, **cluster)
        key = "dfm_domain"
    elif kind == "dfm_features":
        from dfmamba_st.tl._embed import PRESETS, _library_sequences, _tokens
        from dfmamba_st.tl._features import FeatureTransform

        cpu = PRESETS["cpu"]
        transform = FeatureTransform.fit(
            adata, layer=None, n_top_genes=cpu["n_top_genes"], n_pcs=cpu["n_pcs"], seed=seed, chosen=False
        )
        features, _ = transform.transform(adata)
        dfm.pp.serialize(adata)
        hops = inspect.signature(dfm.tl.embed).parameters["hops"].default  # tl.embed's default rings
        libraries = _library_sequences(adata, None, "spatial", ("hilbert",))
        # the neighbourhood half of tl.embed's tokens, built by tl.embed's own code: its "concat" expression block
        adata.obsm["X_features"] = _tokens(features, libraries, hops)[:, features.shape[1] :]
        dfm.tl.cluster(adata, n_clusters, use_rep="X_features", random_state=seed, key_added="base", **cluster)
        key = "base"
    elif kind in BASELINES:
        key = cluster_baseline(adata, kind, n_clusters, seed, cluster)
    else:
        raise ValueError(f"Unknown method {kind!r}; choose from {METHODS}.")
    seconds = time.time() - start
    peak = _peak_mb()
    return {
        "method": kind,
        "slice": slice_id,
        "k": k,
        "seed": seed,
        **_scores(adata, key),
        "seconds": seconds,
        "peak_mb": peak,
        "pipeline_mb": peak - before,
        "gpu_peak_mb": _gpu_peak_mb(),
        "torch_threads": used["torch"],
        "numba_threads": used["numba"],
    }


def _extra(
    data_dir: str, seed: int, threads: int, embed_options: dict, cluster_options: dict | None = None
) -> list[dict]:
    """Zero-shot ×2/×4 on 151673 and transfer 151673 → 151674 (one fresh process), with ``--embed``'s and
    ``--cluster``'s options."""
    import dfmamba_st as dfm  # in the worker: after start_worker set the thread variables

    dfm.set_threads(threads)
    rows = []
    native, k = load_slice(slice_path("151673", data_dir))
    k, cluster = _cluster_options(cluster_options, k)
    dfm.pp.serialize(native)
    model = dfm.tl.embed(native, seed=seed, progress=False, return_model=True, **embed_options)
    dfm.tl.cluster(native, k, random_state=seed, **cluster)
    rows.append({"test": "native 151673", **_scores(native, "dfm_domain")})
    for factor in (2, 4):
        coarse = dfm.pp.coarsen(native, factor)
        dfm.pp.serialize(coarse)
        dfm.tl.embed(coarse, model=model, progress=False, **embed_options)
        dfm.tl.cluster(coarse, k, random_state=seed, **cluster)
        rows.append({"test": f"zero-shot x{factor} 151673 ({coarse.n_obs} bins)", **_scores(coarse, "dfm_domain")})
    other, k = load_slice(slice_path("151674", data_dir))
    k, cluster = _cluster_options(cluster_options, k)
    dfm.pp.serialize(other)
    dfm.tl.embed(other, model=model, progress=False, **embed_options)
    dfm.tl.cluster(other, k, random_state=seed, **cluster)
    n_missing = len(other.uns["dfm"]["missing_genes"])
    rows.append(
        {"test": f"transfer 151673 -> 151674 ({n_missing} model genes missing)", **_scores(other, "dfm_domain")}
    )
    dfm.tl.embed(other, seed=seed, progress=False, **embed_options)
    dfm.tl.cluster(other, k, random_state=seed, **cluster)
    rows.append({"test": "trained on 151674 itself", **_scores(other, "dfm_domain")})
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """One row per slice and method: the seeds' mean, min and max ARI, mean NMI, completeness and seconds, K found,
    and the peak memory."""
    return table.groupby(["slice", "k", "method"]).agg(
        k_found_min=("k_found", "min"),
        k_found_max=("k_found", "max"),
        ari_mean=("ari", "mean"),
        ari_min=("ari", "min"),
        ari_max=("ari", "max"),
        nmi_mean=("nmi", "mean"),
        completeness_mean=("completeness", "mean"),
        seconds_mean=("seconds", "mean"),
        peak_mb_max=("peak_mb", "max"),
        pipeline_mb_max=("pipeline_mb", "max"),
        gpu_peak_mb_max=("gpu_peak_mb", "max"),
    )


def paired(table: pd.DataFrame, baseline: str = PAIRED_WITH) -> pd.DataFrame:
    """Every other method's ARI less ``baseline``'s on the same slice and seed: per slice and over all pairs.

    Columns: ``pairs``, ``mean_diff``, ``se`` (the standard error of the mean difference; NaN for one pair), ``up`` /
    ``down`` (pairs above / below the baseline). Empty when the baseline or no other method ran.
    """
    import numpy as np
    import pandas as pd

    ari = table.pivot_table(index=["slice", "seed"], columns="method", values="ari")
    rows = []
    for method in ari.columns.drop(baseline, errors="ignore") if baseline in ari.columns else []:
        diff = (ari[method] - ari[baseline]).dropna()
        groups = [*diff.groupby(level="slice"), ("all", diff)] if diff.size else []
        for where, d in groups:
            se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
            rows.append(
                {
                    "method": method,
                    "slice": where,
                    "pairs": d.size,
                    "mean_diff": float(d.mean()),
                    "se": se,
                    "up": int((d > 0).sum()),
                    "down": int((d < 0).sum()),
                }
            )
    return pd.DataFrame(rows, columns=["method", "slice", "pairs", "mean_diff", "se", "up", "down"])


def _workers(threads: int) -> dict:
    """The options of a job's process pool: every thread pool of the worker set to ``threads`` from its start."""
    return {"initializer": start_worker, "initargs": (threads,)}


def run_in_worker(fn, threads: int, *args):
    """``fn(*args)`` in a fresh (spawned) process with every thread pool at ``threads``: its own peak memory."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), **_workers(threads)) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder of the DLPFC slices")
    parser.add_argument("--her2st-dir", default=str(HER2ST_DATA), help="folder of the HER2ST sections")
    parser.add_argument("--slices", nargs="+", default=list(FILES), help=f"of {SLICES}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=["pca_gmm", "pca_nbmean_gmm", "dfmamba_st"], metavar="METHOD"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of every pool (torch, numba, BLAS/OpenMP) of each job"
    )
    parser.add_argument("--no-extra", action="store_true", help="skip the zero-shot and transfer tests")
    add_options_flag(
        parser,
        "--embed",
        "options of tl.embed for dfmamba_st (ablations; none means None), e.g. --embed epochs=40 n_pcs=none",
    )
    add_options_flag(parser, "--cluster", "options of tl.cluster for every method, e.g. --cluster tol=1e-6 n_init=100")
    args = parser.parse_args(argv)

    import pandas as pd

    paths = {s: str(slice_path(s, args.data_dir, args.her2st_dir)) for s in args.slices}
    embed_options = parse_options(args.embed, "--embed")
    if "extra_curves" in embed_options:  # a comma-separated list of curve names; empty: the primary curve alone
        embed_options["extra_curves"] = tuple(v for v in str(embed_options["extra_curves"]).split(",") if v)
    if embed_options:
        print(f"tl.embed options: {embed_options}", flush=True)
    cluster_options = parse_options(args.cluster, "--cluster")
    if cluster_options:
        print(f"tl.cluster options (every method): {cluster_options}", flush=True)
    rows = []
    for slice_id in args.slices:
        for method in args.methods:
            for seed in args.seeds:
                row = run_in_worker(
                    _job,
                    args.threads,
                    method,
                    paths[slice_id],
                    slice_id,
                    seed,
                    args.threads,
                    embed_options,
                    cluster_options,
                )
                rows.append(row)
                print(
                    f"{row['method']:>15} {row['slice']} seed {seed}: ARI {row['ari']:.3f} "
                    f"({row['seconds']:.1f} s, {row['peak_mb']:.0f} MB)",
                    file=sys.stderr,
                    flush=True,
                )
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print("\nper run")
    print(table.round(3).to_string(index=False))
    summary = summarise(table)
    print(f"\nsummary over seeds {args.seeds}")
    print(summary.round(3).to_string())
    pairs = paired(table)
    if not pairs.empty:
        print(f"\nARI less {PAIRED_WITH}'s, same slice and seed")
        print(pairs.round(4).to_string(index=False))
    if not args.no_extra:
        extra = run_in_worker(
            _extra, args.threads, args.data_dir, args.seeds[0], args.threads, embed_options, cluster_options
        )
        print(f"\nzero-shot scale and transfer (seed {args.seeds[0]})")
        print(pd.DataFrame(extra).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
