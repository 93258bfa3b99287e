"""How many random restarts the tied GMM of ``tl.cluster`` needs on DLPFC embeddings.

For each slice and seed the default workflow (``pp.serialize`` + ``tl.embed``) runs once; the same embedding is
then clustered by ``tl.cluster`` (K = 7, refinement on) with every number of restarts in ``--restarts``
(``n_init=``) and every clustering seed in ``--cluster-seeds``. A result should depend on the embedding, not on
the GMM's random start: the table prints, per number of restarts, the mean ARI, the mean over embeddings of the
ARI range across clustering seeds, the mean log-likelihood per spot of the fit kept, and the seconds per
``tl.cluster`` call.

Usage::

    python benchmarks/gmm_restarts.py                      # 3 slices x 3 seeds x 5 clustering seeds, 10 and 30
    python benchmarks/gmm_restarts.py --slices 151673 --seeds 0 --restarts 10 30 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.st_dlpfc import DEFAULT_DATA, FILES  # noqa: E402
from dfmamba_st import set_threads  # noqa: E402


def rows_for_slice(path: Path, seed: int, restarts: list[int], cluster_seeds: list[int]) -> list[dict]:
    """Embed one slice with ``seed`` and cluster it with ``tl.cluster`` for every (restarts, clustering seed)."""
    import anndata as ad

    import dfmamba_st as dfm

    adata = ad.read_h5ad(path)
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, seed=seed, progress=False)
    rows = []
    for cluster_seed in cluster_seeds:
        for n_init in restarts:
            start = time.perf_counter()
            dfm.tl.cluster(adata, 7, n_init=n_init, random_state=cluster_seed, key_added="pred", progress=False)
            seconds = time.perf_counter() - start
            score = dfm.metrics.evaluate(adata, "layer", pred_key="pred").iloc[0]["ari"]
            rows.append(
                {
                    "seed": seed,
                    "cluster_seed": cluster_seed,
                    "restarts": n_init,
                    "ari": float(score),
                    "loglik": float(adata.uns["pred"]["log_likelihood"]),
                    "seconds": seconds,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--slices", nargs="+", default=list(FILES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="embedding seeds")
    parser.add_argument("--cluster-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--restarts", nargs="+", type=int, default=[10, 30])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    frames = []
    for slice_id in args.slices:
        for seed in args.seeds:
            rows = rows_for_slice(args.data_dir / FILES[slice_id], seed, args.restarts, args.cluster_seeds)
            frame = pd.DataFrame(rows).assign(slice=slice_id)
            print(frame.pivot(index="cluster_seed", columns="restarts", values="ari").round(3).to_string(), flush=True)
            frames.append(frame)
    table = pd.concat(frames)
    spread = table.groupby(["restarts", "slice", "seed"])["ari"].agg(lambda a: a.max() - a.min())
    summary = table.groupby("restarts").agg(
        ari_mean=("ari", "mean"), loglik_mean=("loglik", "mean"), seconds=("seconds", "mean")
    )
    summary["ari_range_within_embedding"] = spread.groupby("restarts").mean()
    per_slice = table.pivot_table(index="slice", columns="restarts", values="ari", aggfunc="mean")
    print("\nARI mean per slice (over embedding seeds and clustering seeds)")
    print(per_slice.round(3).to_string())
    print("\nsummary")
    print(summary.round(4).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
