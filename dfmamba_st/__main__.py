"""Command line: ``python -m dfmamba_st`` runs serialize → embed → cluster on a slice and writes the results.

Without ``--input`` it runs on the real DLPFC slice 151673 that ships inside the package (offline).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the spatial-domain workflow from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m dfmamba_st",
        description="Spatial domains with DF-Mamba: serialize → embed → cluster (→ score against an annotation).",
    )
    parser.add_argument("--input", type=Path, help="an .h5ad file (default: the bundled DLPFC 151673 slice)")
    parser.add_argument("--n-clusters", type=int, default=7, help="number of domains (0: choose automatically)")
    parser.add_argument("--truth-key", default="layer", help="obs column with a manual annotation to score against")
    parser.add_argument("--preset", default="auto", choices=["auto", "cpu", "paper"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("dfmamba_st_results"), help="output folder")
    args = parser.parse_args(argv)

    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import dfmamba_st as dfm

    adata = ad.read_h5ad(args.input) if args.input else dfm.datasets.dlpfc_151673_hvg()
    name = args.input.stem if args.input else "dlpfc_151673 (bundled)"
    print(f"dfmamba_st {dfm.__version__}: {name}, {adata.n_obs} spots x {adata.n_vars} genes")
    start = time.time()
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, preset=args.preset, epochs=args.epochs, seed=args.seed, device=args.device)
    dfm.tl.cluster(adata, args.n_clusters or None)
    seconds = time.time() - start
    params = adata.uns["dfm"]["params"]
    print(
        f"serialize + embed + cluster: {seconds:.1f} s (preset {params['preset']}, device {params['device']}), "
        f"{adata.obs['dfm_domain'].cat.categories.size} domains"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    truth = args.truth_key if args.truth_key in adata.obs else None
    if truth:
        scores = dfm.metrics.evaluate(adata, truth)
        print(scores.round(3).to_string())
        print(
            f"(one training run, --seed {args.seed}; scores move with the seed: docs/spatial.md, 'The bundled slice', "
            "has ten seeds of this slice with the baselines)"
        )
        scores.to_csv(args.out / "scores.csv")
    dfm.pl.domains(adata, truth_key=truth, return_fig=True, show=False).savefig(args.out / "domains.png", dpi=120)
    dfm.pl.gates(adata, return_fig=True, show=False).savefig(args.out / "gates.png", dpi=120)
    adata.write_h5ad(args.out / "result.h5ad", compression="gzip")
    print(f"wrote {args.out}/result.h5ad, domains.png, gates.png" + (", scores.csv" if truth else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
