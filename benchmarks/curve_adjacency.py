"""How well sets of space-filling curves keep the spatial neighbours of DLPFC spots close along a sequence.

For every pair of neighbours in ``tl.embed``'s spatial graph (6 nearest spots on the Visium grid; the spot itself,
which the graph also holds, is no pair) the gap is the
smallest distance between the two spots, in positions, along any of the curves read. The table gives, per slice
and set of curves, the share of pairs whose gap exceeds 1, 4, 16, 64 and 256 positions. A pair far apart on every
curve can only meet through the model's long-range state. Pure geometry: no model, a few seconds.

Usage::

    python benchmarks/curve_adjacency.py [--data-dir ../shared/data/dlpfc]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.st_dlpfc import DEFAULT_DATA, FILES  # noqa: E402
from dfmamba_st.core.curves import pair_gaps  # noqa: E402
from dfmamba_st.pp._serialize import library_layouts  # noqa: E402

CURVE_SETS = (
    ("hilbert",),
    ("hilbert", "hilbert_t"),
    ("hilbert", "hilbert_s"),
    ("hilbert", "hilbert_t", "zorder"),
    ("hilbert", "hilbert_t", "hilbert_s", "hilbert_ts"),
)
WINDOWS = (1, 4, 16, 64, 256)


def far_shares(path: Path) -> list[dict]:
    """One row per curve set: the share of neighbour pairs more than ``w`` positions apart on every curve."""
    layout = library_layouts(ad.read_h5ad(path, backed="r"))[0]
    graph = layout.graph().tocoo()
    pairs = graph.row != graph.col  # the graph holds each spot itself (gap 0): not a pair of neighbours
    rows_, cols = graph.row[pairs], graph.col[pairs]
    orders = {c: layout.order(c) for c in {c for s in CURVE_SETS for c in s}}
    rows = []
    for names in CURVE_SETS:
        gap = pair_gaps([orders[c] for c in names], rows_, cols)
        rows.append({"curves": "+".join(names), **{f">{w}": float(np.mean(gap > w)) for w in WINDOWS}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    frames = [pd.DataFrame(far_shares(args.data_dir / f)).assign(slice=s) for s, f in FILES.items()]
    table = pd.concat(frames).set_index(["slice", "curves"])
    print("share of neighbour pairs more than w positions apart on every curve read")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
