"""Command line: ``python -m dfmamba_st`` runs serialize → embed → cluster on a slice and writes the results.

Without ``--input`` it runs on the real DLPFC slice 151673 that ships inside the package (offline).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._cli import check_shared_arguments, path_argument, warnings_said_once
from ._version import __version__

#: the annotation scored against when ``--truth-key`` is not given (DLPFC's cortical layers)
DEFAULT_TRUTH_KEY = "layer"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dfmamba_st",
        description="Spatial domains with DF-Mamba: serialize → embed → cluster (→ score against an annotation).",
    )
    parser.add_argument("--version", action="version", version=f"dfmamba_st {__version__}")
    parser.add_argument(
        "--input", type=path_argument, help="an .h5ad file of spots × genes (default: the bundled DLPFC 151673 slice)"
    )
    parser.add_argument(
        "--n-clusters",
        type=int,
        default=7,
        help="number of domains, at least 1; 0 chooses it at the knee of the BIC curve (default: 7)",
    )
    parser.add_argument(
        "--truth-key",
        default=None,
        help=f"obs column with a manual annotation to score against and draw (default: {DEFAULT_TRUTH_KEY!r}, scored "
        "when the input has it; a column named here must exist)",
    )
    parser.add_argument(
        "--library-key",
        default=None,
        help="obs column naming each spot's slice, for an input of several slices: each is its own sequence and is "
        "refined and scored on its own; one model and one mixture cover all, so a domain has one label in every "
        "slice (default: none, one slice)",
    )
    parser.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "cpu", "paper"],
        help="model size: 'cpu' (50 PCs, d_model 64; fast on a laptop), 'paper' (3,000 genes, d_model 3,000; for a "
        "GPU; its accuracy is not measured yet), 'auto' = 'paper' on a CUDA GPU, 'cpu' otherwise (default: auto; "
        "--preset cpu is the measured configuration on a GPU too)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs, at least 1 (default: the preset's, 20 with 'cpu' and 30 with 'paper')",
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed of the training (default: 42)")
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (a CUDA GPU when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N' (default: auto)",
    )
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("dfmamba_st_results"),
        help="output folder for result.h5ad, domains.png, gates.png and scores.csv (default: dfmamba_st_results)",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error a step raises, show Python's traceback, not only the message (default: the message)",
    )
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values before any work starts (``parser.error``: usage, message, exit code 2)."""
    if args.n_clusters < 0:
        parser.error(f"--n-clusters must be at least 1 (or 0 to choose it automatically), got {args.n_clusters}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    check_shared_arguments(parser, args.device, args.out, args.seed)
    if args.input is not None and not args.input.is_file():
        what = "a folder, not a file" if args.input.is_dir() else "no such file"
        parser.error(f"--input {args.input}: {what}")


def _check_input(parser: argparse.ArgumentParser, adata, name: str) -> None:
    """What the input file must hold that no option can change: unique gene names and the spots' positions."""
    if not adata.var_names.is_unique:
        repeated = adata.var_names[adata.var_names.duplicated()].unique()
        parser.error(
            f"--input: {name} has repeated gene names (e.g. {list(repeated[:3])}); make them unique "
            "(adata.var_names_make_unique()) and write the file again"
        )
    if not {"array_row", "array_col"} <= set(adata.obs.columns) and "spatial" not in adata.obsm:
        parser.error(
            f"--input: {name} has no spot positions: neither obs['array_row'/'array_col'] (a Visium grid) nor "
            "obsm['spatial'] (coordinates)"
        )


def _check_columns(parser: argparse.ArgumentParser, args: argparse.Namespace, adata, name: str) -> str | None:
    """The annotation column to score against (or ``None``), after checking the obs columns named on the line."""
    columns = list(adata.obs.columns)
    shown = ", ".join(map(str, columns[:20])) + (", …" if len(columns) > 20 else "")
    if args.library_key is not None and args.library_key not in adata.obs:
        parser.error(f"--library-key {args.library_key!r}: {name} has no such obs column (obs: {shown})")
    if args.library_key is not None and adata.obs[args.library_key].isna().any():
        parser.error(f"--library-key {args.library_key!r}: some spots of {name} have no library (missing values)")
    if args.truth_key is not None:
        if args.truth_key not in adata.obs:
            parser.error(f"--truth-key {args.truth_key!r}: {name} has no such obs column (obs: {shown})")
        return args.truth_key
    return DEFAULT_TRUTH_KEY if DEFAULT_TRUTH_KEY in adata.obs else None


def main(argv: list[str] | None = None) -> int:
    """Run the spatial-domain workflow from the command line.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``); ``--help`` lists them.

    Returns
    -------
    The exit code, 0. Bad arguments end in argparse's usage message and exit code 2, before any work starts; input
    that a step refuses (``ValueError`` or ``KeyError``: e.g. negative or NaN expression, too few spots) ends in
    that step's message and exit code 1, without a traceback (``--traceback`` shows it, for an error that is no input
    problem).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)

    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import dfmamba_st as dfm

    try:
        adata = ad.read_h5ad(args.input) if args.input else dfm.datasets.dlpfc_151673_hvg()
    except OSError as err:  # h5py's "file signature not found" and the like
        parser.error(f"--input {args.input}: not an .h5ad file that anndata can read ({err})")
    name = args.input.stem if args.input else "dlpfc_151673 (bundled)"
    _check_input(parser, adata, name)
    truth = _check_columns(parser, args, adata, name)
    if args.n_clusters > adata.n_obs:
        parser.error(f"--n-clusters {args.n_clusters}: more domains than the {adata.n_obs} spots of {name}")
    print(f"dfmamba_st {dfm.__version__}: {name}, {adata.n_obs} spots x {adata.n_vars} genes")
    if truth is None:
        print(f"no obs[{DEFAULT_TRUTH_KEY!r}]: not scoring (name an annotation with --truth-key)")
    start = time.time()
    library_key = args.library_key
    try:
        dfm.pp.serialize(adata, library_key=library_key)
        dfm.tl.embed(
            adata, preset=args.preset, epochs=args.epochs, seed=args.seed, device=args.device, library_key=library_key
        )
        dfm.tl.cluster(adata, args.n_clusters or None, library_key=library_key)
    except (ValueError, KeyError) as err:  # what the steps refuse in the input, said without a traceback
        if args.traceback:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        parser.exit(1, f"{parser.prog}: error: {name}: {message}\n(--traceback shows where it was raised)\n")
    seconds = time.time() - start
    params = adata.uns["dfm"]["params"]
    print(
        f"serialize + embed + cluster: {seconds:.1f} s (preset {params['preset']}, device {params['device']}), "
        f"{adata.obs['dfm_domain'].cat.categories.size} domains"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if truth:
        scores = dfm.metrics.evaluate(adata, truth, library_key=library_key)
        print(scores.round(3).to_string())
        if args.input is None:  # the bundled slice: where its other seeds are
            print(
                f"(one training run, --seed {args.seed}; scores move with the seed: docs/spatial.md, 'Current "
                "defaults', has ten seeds of this slice (the 151673 row) with the baselines)"
            )
        scores.to_csv(args.out / "scores.csv")
    elif (args.out / "scores.csv").exists():  # an earlier run's scores must not pass for this run's
        (args.out / "scores.csv").unlink()
        print(f"removed {args.out}/scores.csv of an earlier run (this run is not scored)")
    # bbox_inches="tight": nothing drawn outside the figure (a legend of many domains) is cut off
    figure = dfm.pl.domains(adata, truth_key=truth, return_fig=True, show=False)
    figure.savefig(args.out / "domains.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    figure = dfm.pl.gates(adata, return_fig=True, show=False)
    figure.savefig(args.out / "gates.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    adata.write_h5ad(args.out / "result.h5ad", compression="gzip")
    print(f"wrote {args.out}/result.h5ad, domains.png, gates.png" + (", scores.csv" if truth else ""))
    return 0


if __name__ == "__main__":
    with warnings_said_once(_parser().prog):
        raise SystemExit(main())
