"""Seam error of tiled inference: one trained model reads DLPFC 151673 whole and in tiles of decreasing size.

Prints, per tile size: relative and largest absolute difference of the DF-Mamba block of the embedding against the
whole-sequence reading, seconds of inference, and the ARI of the domains (GMM, K = 7) against the manual layers.

Run from the repository root::

    python benchmarks/tiling_seams.py [--seed 0] [--threads 2] [--h5ad PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dfmamba_st import set_threads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--h5ad", default=None, help="a slice with obs['layer'] (default: the bundled 151673)")
    p.add_argument("--tile-sizes", type=int, nargs="+", default=[2048, 1024, 512, 256])
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import anndata as ad

    import dfmamba_st as dfm

    set_threads(args.threads)
    adata = dfm.datasets.dlpfc_151673_hvg() if args.h5ad is None else ad.read_h5ad(args.h5ad)
    dfm.pp.serialize(adata)
    whole_tile = max(8192, -(-adata.n_obs // 1024) * 1024)  # one tile holds the whole sequence
    model = dfm.tl.embed(adata, seed=args.seed, progress=False, return_model=True, tile_size=whole_tile)
    n_pcs = model.features.n_features
    whole = adata.obsm["X_dfm"][:, n_pcs:].copy()
    dfm.tl.cluster(adata, 7, random_state=args.seed, progress=False)
    rows = [(f"whole ({whole_tile})", 0.0, 0.0, np.nan, dfm.metrics.evaluate(adata, "layer")["ari"].iloc[0])]
    for tile in args.tile_sizes:
        start = time.perf_counter()
        dfm.tl.embed(adata, model=model, tile_size=tile, progress=False)
        seconds = time.perf_counter() - start
        diff = adata.obsm["X_dfm"][:, n_pcs:] - whole
        dfm.tl.cluster(adata, 7, random_state=args.seed, progress=False)
        ari = dfm.metrics.evaluate(adata, "layer")["ari"].iloc[0]
        rows.append((str(tile), np.linalg.norm(diff) / np.linalg.norm(whole), np.abs(diff).max(), seconds, ari))
    print(f"\n{adata.n_obs} spots, seed {args.seed}, {args.threads} threads\n")
    print("| tile size | relative difference | max abs difference | embed s (model given) | ARI |")
    print("|---|---|---|---|---|")
    for name, rel, mx, sec, ari in rows:
        print(f"| {name} | {rel:.2e} | {mx:.2e} | {'-' if np.isnan(sec) else f'{sec:.1f}'} | {ari:.4f} |")


if __name__ == "__main__":
    main()
