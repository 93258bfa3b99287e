"""Regenerate dfmamba_st/data/dlpfc_151673_hvg.h5ad from the shared DLPFC 151673 file.

All spots; the raw counts restricted to the 3,000 genes ``dfm.tl.embed`` chooses on the full slice (scanpy's
``flavor="seurat_v3"`` scores on the raw counts, needs scikit-misc; ties at the cut broken by gene name, so the file
is the same whatever CPU makes it, and ``tl.embed`` on it gives what it gives on the full slice); obs layer /
array_row / array_col / sample_id; obsm spatial; uns spatial with the low-resolution H&E image and scale factors;
uns source. Written with gzip compression.

Usage (from the repository root)::

    python benchmarks/make_bundled_slice.py [--shared ../shared/data] [--n-top-genes 3000]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import sparse

from dfmamba_st.tl._features import gene_ranks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "dfmamba_st" / "data" / "dlpfc_151673_hvg.h5ad"


def build(shared: Path, n_top_genes: int = 3000) -> ad.AnnData:
    src = shared / "dlpfc" / "dlpfc_151673.h5ad"
    full = ad.read_h5ad(src)
    X = sparse.csr_matrix(full.X)
    if not np.array_equal(X.data, np.round(X.data)):
        raise ValueError(f"{src} does not hold raw integer counts in X")
    ranks = gene_ranks(X, full.var_names, is_counts=True)  # tl.embed's choice is the genes ranked below n_top_genes
    genes = full.var_names[ranks.to_numpy() < n_top_genes]  # in the original gene order
    sub = full[:, genes].copy()
    X = sparse.csr_matrix(sub.X, dtype=np.float32)
    X.sort_indices()
    var = sub.var[["gene_ids"]].copy()
    var["highly_variable_rank"] = ranks[genes].astype(np.float32).to_numpy()
    obs = sub.obs[["layer", "array_row", "array_col", "sample_id"]].copy()
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["spatial"] = np.asarray(sub.obsm["spatial"], dtype=np.float64)
    lib = full.uns["spatial"]["151673"]
    out.uns["spatial"] = {
        "151673": {
            "images": {"lowres": np.asarray(lib["images"]["lowres"], dtype=np.uint8)},
            "scalefactors": dict(lib["scalefactors"]),
            "metadata": dict(lib.get("metadata", {})),
        }
    }
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out.uns["source"] = (
        f"DLPFC 151673 (Maynard et al. 2021, Nat Neurosci 24:425; spatialLIBD), made by "
        f"benchmarks/make_bundled_slice.py from the project's shared dlpfc_151673.h5ad (sha256 {sha}; counts from "
        f"{full.uns['source']}; labels: {full.uns.get('label_source', 'n/a')}). Genes: the {n_top_genes} most "
        "variable of its 7,319 by scanpy highly_variable_genes(flavor='seurat_v3') scores on the raw counts, ties "
        "at the cut broken by gene name (dfmamba_st.tl._features.gene_ranks, the choice dfm.tl.embed makes)."
    )
    out.uns["gene_selection"] = {
        "flavor": "seurat_v3",
        "n_top_genes": n_top_genes,
        "from_n_genes": full.n_vars,
        "ties": "by gene name",
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--n-top-genes", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    adata = build(args.shared, args.n_top_genes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.out, compression="gzip", compression_opts=9)
    print(adata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
