"""Order spots along a space-filling curve: the tissue becomes a sequence."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import check_adata, check_library_key, h5ad_safe, library_indices
from ..core import curves

__all__ = ["serialize", "spot_cells"]


def spot_cells(adata: AnnData, *, spatial_key: str = "spatial") -> tuple[np.ndarray, str]:
    """Integer grid cells of every spot and how they were obtained.

    On a Visium hexagonal grid (``obs['array_row']``, ``obs['array_col']``, with ``row + col`` even) a spot sits at
    ``(array_row, array_col // 2)``, a square grid in which hex neighbours stay neighbours. Without a grid,
    ``obsm[spatial_key]`` is quantised (about one spot per cell; spots sharing a cell are all kept).

    Returns
    -------
    ``(cells, source)`` with ``cells`` (n_obs, 2) int64 and ``source`` ``"visium_grid"``, ``"grid"`` or ``"quantized"``.
    """
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        rc = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(rc)):
            raise ValueError(
                "obs['array_row'/'array_col'] contain NaN or inf; fix or drop those spots, "
                "or delete the columns to serialize from obsm['spatial']."
            )
        if np.all(rc == np.round(rc)):
            rc = rc.astype(np.int64) - rc.min(axis=0).astype(np.int64)
            if np.all((rc[:, 0] + rc[:, 1]) % 2 == (rc[0, 0] + rc[0, 1]) % 2):
                return np.stack([rc[:, 0], rc[:, 1] // 2], axis=1), "visium_grid"
            return rc, "grid"
    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        if not np.all(np.isfinite(xy)):
            raise ValueError(f"obsm[{spatial_key!r}] contains NaN or inf coordinates; fix or drop those spots.")
        return curves.quantize(xy), "quantized"
    raise KeyError(
        "No spatial coordinates: expected obs['array_row'] and obs['array_col'] (Visium grid) "
        f"or obsm[{spatial_key!r}] (x, y). Add one of them, e.g. from squidpy.read.visium."
    )


def serialize(
    adata: AnnData,
    *,
    curve: curves.Curve = "hilbert",
    library_key: str | None = None,
    spatial_key: str = "spatial",
    key_added: str = "dfm_order",
    copy: bool = False,
) -> AnnData | None:
    """Order spots along a space-filling curve, one sequence per library.

    Parameters
    ----------
    adata
        Annotated data matrix with a Visium grid in ``obs['array_row'/'array_col']`` or coordinates in
        ``obsm[spatial_key]``.
    curve
        ``"hilbert"`` (default), ``"hilbert_t"`` (Hilbert curve of the transposed grid) or ``"zorder"``.
    library_key
        Column of ``obs`` naming the slice of each spot; each slice becomes its own sequence.
    spatial_key
        Key of the coordinates in ``obsm``, used when there is no grid.
    key_added
        Name of the ``obs`` column that receives the position along the curve.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    Returns ``None`` if ``copy=False``, else a new :class:`~anndata.AnnData`. Sets

    ``adata.obs[key_added]``
        Position of every spot along the curve within its library (0, 1, ...; every spot gets one).
    ``adata.uns[key_added]['params']``
        The parameters and how the grid was obtained (``visium_grid``, ``grid`` or ``quantized``).

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> adata.obs["dfm_order"].is_unique
    True
    """
    check_adata(adata)
    check_library_key(adata, library_key)
    if curve not in ("hilbert", "hilbert_t", "zorder"):
        raise ValueError(f"Unknown curve {curve!r}; use 'hilbert', 'hilbert_t' or 'zorder'.")
    cells, source = spot_cells(adata, spatial_key=spatial_key)
    position = np.empty(adata.n_obs, dtype=np.int64)
    n_duplicates = 0
    for idx in library_indices(adata, library_key):
        lib_cells = cells[idx]
        lib_cells = lib_cells - lib_cells.min(axis=0)
        order = curves.curve_order(lib_cells, curve)
        position[idx[order]] = np.arange(idx.size)
        n_duplicates += idx.size - len(np.unique(lib_cells, axis=0))
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Series(position, index=adata.obs_names)
    adata.uns[key_added] = {
        "params": h5ad_safe(
            {
                "curve": curve,
                "library_key": library_key,
                "spatial_key": spatial_key,
                "grid": source,
                "n_spots_sharing_a_cell": int(n_duplicates),
            }
        )
    }
    if n_duplicates:
        warnings.warn(
            f"{n_duplicates} spots share a grid cell with another spot; all are kept, ties in input order.",
            stacklevel=2,
        )
    return adata if copy else None
