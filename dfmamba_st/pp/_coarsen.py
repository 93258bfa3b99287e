"""Merge spots into coarser bins: the ×2 / ×4 inputs of the zero-shot scale test."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from .._utils import (
    EMBED_RECORD,
    check_adata,
    check_library_key,
    h5ad_safe,
    is_tool_record,
    is_whole_number,
    recorded_spatial_key,
    resolve_library_key,
    warn_pooled_slices,
    whole_number,
)
from ._serialize import identical_positions, library_layouts, warn_off_tissue

__all__ = ["coarsen"]


def _majority(values: pd.Series, groups: np.ndarray, n_groups: int) -> pd.Categorical:
    """Most frequent non-missing value of ``values`` (categorical) in each group (missing if the group has none).

    A tie goes to the first category, whatever the order of the rows. Positional (an array, not a Series), so that it
    lands on the bins whatever their index.
    """
    categories = values.cat.categories
    frame = pd.DataFrame({"g": groups, "v": pd.Categorical(values.to_numpy(), categories=categories)}).dropna()
    counts = frame.groupby(["g", "v"], observed=True, sort=True).size().rename("n").reset_index()
    top = counts.sort_values(["g", "n"], ascending=[True, False], kind="stable").drop_duplicates("g")
    out = pd.Series([np.nan] * n_groups, dtype=object)
    out.iloc[top["g"].to_numpy()] = top["v"].to_numpy()
    return pd.Categorical(out, categories=categories)


#: ``uns`` entries that describe the fine spots or their log-transformed ``X``, dropped besides the tool records
_FINE_ONLY_UNS = ("log1p",)


def _check_factor(factor: object) -> int:
    if is_whole_number(factor, 1) and factor == 1:
        raise ValueError("factor must be >= 2 (the bin side in grid cells): factor=1 would give back the slice itself.")
    return whole_number(factor, "factor (the bin side in grid cells)", minimum=2)


def coarsen(
    adata: AnnData,
    factor: int,
    *,
    layer: str | None = None,
    library_key: str | None = None,
    spatial_key: str | None = None,
) -> AnnData:
    """Merge spots into ``factor × factor`` bins of the spot grid, summing their counts.

    Parameters
    ----------
    adata
        Spots with a Visium grid or coordinates (see :func:`dfmamba_st.pp.serialize`), raw counts in ``X`` or
        ``layers[layer]``. Counts are summed, so they must be whole numbers: log-normalised counts
        (``sc.pp.normalize_total`` then ``sc.pp.log1p``) are taken back to their counts, exactly, and summed (the
        bins hold counts); other non-integer data are refused (keep the counts in a layer, e.g.
        ``adata.layers['counts']``, and pass ``layer='counts'``).
    factor
        Bin side in grid cells, a whole number >= 2 (2 → ×2 coarser, 4 → ×4).
    layer
        Counts to sum (default ``X``).
    library_key
        Column of ``obs`` naming the slice; bins never mix slices. By default the key recorded by
        :func:`~dfmamba_st.pp.serialize` (``uns['dfm_order']``) or :func:`~dfmamba_st.tl.embed`, if any.
    spatial_key
        Key of the coordinates in ``obsm``. By default the one :func:`~dfmamba_st.pp.serialize` recorded
        (``uns['dfm_order']``) or :func:`~dfmamba_st.tl.embed`, else ``"spatial"``. Another key that ``obsm`` lacks
        is an error (``KeyError``), as in :func:`~dfmamba_st.pp.serialize`.

    Returns
    -------
    A new :class:`~anndata.AnnData` with one observation per bin: ``X`` the summed counts (CSR float32);
    ``obs['array_row'/'array_col']`` the bin's grid position (on a Visium grid its row and column; from coordinates
    its bins of x and of y, in that order, as :func:`~dfmamba_st.pp.serialize` reads them: not Visium's row = y);
    ``obs['n_spots']`` how many spots it merged;
    ``obs[library_key]`` and the other label columns of ``obs`` (categorical, boolean or text) as the majority label
    of the merged spots, categorical (a clustering such as ``obs['dfm_domain']`` too, though not its record; numeric
    ``obs`` columns are dropped, and listed in an info message, as is an ``obs['n_spots']`` of the input,
    replaced); ``var`` copied; ``obsm[spatial_key]`` the mean position (of the spots whose position is known);
    ``uns`` deep-copied (so tissue images still plot, each spot diameter in ``uns['spatial']`` multiplied by
    ``factor``: a bin is drawn as wide as it is) **without** the records of tools run on the fine spots, since they
    describe the fine data: every entry of the form ``{'params': ...}`` (``uns['dfm_order']`` of
    :func:`~dfmamba_st.pp.serialize`, ``uns['dfm']`` of :func:`~dfmamba_st.tl.embed`, ``uns['dfm_domain']`` of
    :func:`~dfmamba_st.tl.cluster`, scanpy's ``uns['pca']``, ``uns['neighbors']``, …) and ``uns['log1p']``;
    ``uns['dfm_coarsen']['params']`` the settings (``None`` stored as ``"None"``, as the other tools store it;
    :func:`~dfmamba_st.pp.serialize` takes its ``library_key``). Other layers, ``obsm`` entries and ``obsp`` are not
    carried over. Run :func:`~dfmamba_st.pp.serialize` on the result before
    :func:`~dfmamba_st.tl.embed`.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> coarse = dfm.pp.coarsen(adata, 2)
    >>> bool(abs(coarse.X.sum() - adata.X.sum()) < 1e-3 * adata.X.sum())
    True
    """
    check_adata(adata)
    library_key = resolve_library_key(adata, library_key, "dfm_order", EMBED_RECORD)
    check_library_key(adata, library_key)
    factor = _check_factor(factor)
    if spatial_key not in (None, "spatial") and spatial_key not in adata.obsm:  # a typo would drop the coordinates
        raise KeyError(f"spatial_key={spatial_key!r} is not in adata.obsm; available keys: {list(adata.obsm)}.")
    spatial_key = spatial_key or recorded_spatial_key(adata, "dfm_order", EMBED_RECORD)
    warn_off_tissue(adata, "they are summed into the bins like the others")
    from ..tl._features import expression_matrix  # here, not at the top: tl imports pp

    # tl.embed's checks (a missing layer, NaN/inf, negative values, no expression), and whole numbers only
    counts, _, _ = expression_matrix(adata, layer, counts_for="dfm.pp.coarsen sums counts")
    cells = np.zeros((adata.n_obs, 2), dtype=np.int64)
    lib_codes = np.zeros(adata.n_obs, dtype=np.int64)
    layouts = library_layouts(adata, library_key=library_key, spatial_key=spatial_key)
    warn_pooled_slices(  # slices pooled without a key would be summed into one another's bins
        adata,
        identical_positions(layouts),
        library_key,
        caller="dfm.pp.coarsen",
        shared="their counts are summed into the same bins",
        unnamed="spots of several slices summed into one bin",
    )
    for code, layout in enumerate(layouts):
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
    X = member @ counts
    n_spots = np.asarray(member.sum(axis=1)).ravel()

    obs = pd.DataFrame(index=[f"bin{factor}_{i}" for i in range(n_bins)])
    obs["array_row"] = uniq[:, 1]
    obs["array_col"] = uniq[:, 2]
    obs["n_spots"] = n_spots.astype(np.int64)
    if library_key is not None:  # whatever its type (text, numbers), as a category like the other labels
        obs[library_key] = _majority(adata.obs[library_key].astype("category"), groups, n_bins)
    dropped_obs, replaced = [], [c for c in ("n_spots",) if c in adata.obs.columns]
    for col in adata.obs.columns:
        if col in obs:
            continue
        values = adata.obs[col]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):  # labels, text, True/False
            obs[col] = _majority(values.astype("category"), groups, n_bins)
        else:
            dropped_obs.append(col)
    uns = {k: v for k, v in adata.uns.items() if not is_tool_record(v) and k not in _FINE_ONLY_UNS}
    dropped_uns = [k for k in adata.uns if k not in uns]
    out = AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs, var=adata.var.copy(), uns=copy.deepcopy(uns))
    for library in out.uns.get("spatial", {}).values():  # a bin spans factor spots a side: drawn that wide
        factors = library.get("scalefactors", {}) if isinstance(library, dict) else {}
        if "spot_diameter_fullres" in factors:
            factors["spot_diameter_fullres"] = float(factors["spot_diameter_fullres"]) * factor
    if spatial_key in adata.obsm:  # the mean of the spots' known positions (NaN for a bin of unknown ones)
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        known = np.isfinite(xy)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.obsm[spatial_key] = (member @ np.where(known, xy, 0.0)) / (member @ known.astype(np.float64))
    out.uns["dfm_coarsen"] = {
        "params": h5ad_safe({"factor": factor, "layer": layer, "library_key": library_key, "spatial_key": spatial_key})
    }
    not_carried = []
    if dropped_obs:
        not_carried.append(f"numeric obs columns {dropped_obs}")
    if replaced:
        not_carried.append(f"obs{replaced} (replaced by the number of spots per bin)")
    if dropped_uns:
        not_carried.append(f"uns records of the fine spots {dropped_uns}")
    if not_carried:
        logg.info(f"dfm.pp.coarsen: {adata.n_obs} spots -> {n_bins} bins; not carried over: {'; '.join(not_carried)}")
    return out
