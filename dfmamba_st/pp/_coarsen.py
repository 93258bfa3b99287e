"""Merge spots into coarser bins: the ×2 / ×4 inputs of the zero-shot scale test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import check_adata, check_library_key
from ._serialize import library_layouts

__all__ = ["coarsen"]


def _majority(values: pd.Series, groups: np.ndarray, n_groups: int) -> pd.Series:
    """Most frequent non-missing value of ``values`` in each group (missing if the group has none)."""
    frame = pd.DataFrame({"g": groups, "v": values.to_numpy()}).dropna()
    top = frame.groupby("g")["v"].agg(lambda v: v.value_counts().index[0])
    out = pd.Series([np.nan] * n_groups, dtype=object)
    out.iloc[top.index.to_numpy()] = top.to_numpy()
    if isinstance(values.dtype, pd.CategoricalDtype):
        return pd.Categorical(out, categories=values.cat.categories)
    return out


def coarsen(
    adata: AnnData,
    factor: int,
    *,
    layer: str | None = None,
    library_key: str | None = None,
    spatial_key: str = "spatial",
) -> AnnData:
    """Merge spots into ``factor × factor`` bins of the spot grid, summing their counts.

    Parameters
    ----------
    adata
        Spots with a Visium grid or coordinates (see :func:`dfmamba_st.pp.serialize`), raw counts in ``X`` or
        ``layers[layer]``.
    factor
        Bin side in grid cells (2 → ×2 coarser, 4 → ×4).
    layer
        Counts to sum (default ``X``).
    library_key
        Column of ``obs`` naming the slice; bins never mix slices.
    spatial_key
        Key of the coordinates in ``obsm``.

    Returns
    -------
    A new :class:`~anndata.AnnData` with one observation per bin: ``X`` the summed counts;
    ``obs['array_row'/'array_col']`` the bin's grid position; ``obs['n_spots']`` how many spots it merged;
    categorical ``obs`` columns carried over as the majority label of the merged spots; ``obsm[spatial_key]`` the
    mean position; ``uns`` copied (so tissue images still plot).

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> coarse = dfm.pp.coarsen(adata, 2)
    >>> bool(abs(coarse.X.sum() - adata.X.sum()) < 1e-3 * adata.X.sum())
    True
    """
    check_adata(adata)
    check_library_key(adata, library_key)
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive whole number, got {factor!r}.")
    factor = int(factor)
    cells = np.zeros((adata.n_obs, 2), dtype=np.int64)
    lib_codes = np.zeros(adata.n_obs, dtype=np.int64)
    for code, layout in enumerate(library_layouts(adata, library_key=library_key, spatial_key=spatial_key)):
        lib_codes[layout.idx] = code
        cells[layout.idx] = layout.cells
    bins = cells // factor
    keys = np.stack([lib_codes, bins[:, 0], bins[:, 1]], axis=1)
    uniq, groups = np.unique(keys, axis=0, return_inverse=True)
    groups = groups.ravel()
    n_bins = len(uniq)
    member = sp.csr_matrix(
        (np.ones(adata.n_obs, dtype=np.float32), (groups, np.arange(adata.n_obs))), (n_bins, adata.n_obs)
    )
    counts = adata.X if layer is None else adata.layers[layer]
    X = member @ (counts if sp.issparse(counts) else sp.csr_matrix(counts))
    n_spots = np.asarray(member.sum(axis=1)).ravel()

    obs = pd.DataFrame(index=[f"bin{factor}_{i}" for i in range(n_bins)])
    obs["array_row"] = uniq[:, 1]
    obs["array_col"] = uniq[:, 2]
    obs["n_spots"] = n_spots.astype(np.int64)
    if library_key is not None:
        obs[library_key] = _majority(adata.obs[library_key], groups, n_bins)
    for col in adata.obs.columns:
        if col not in obs and isinstance(adata.obs[col].dtype, pd.CategoricalDtype):
            obs[col] = _majority(adata.obs[col], groups, n_bins)
    out = AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs, var=adata.var.copy(), uns=dict(adata.uns))
    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        out.obsm[spatial_key] = (member @ xy) / n_spots[:, None]
    out.uns["dfm_coarsen"] = {"params": {"factor": factor, "layer": layer, "library_key": library_key}}
    return out
