"""Clustering and spatial-coherence scores.

Agreement with a manual annotation (ARI, NMI, homogeneity, completeness) comes from scikit-learn.
The two spatial scores, CHAOS and PAS, follow the reference implementation of SpatialPCA
(Shang & Zhou 2022, *Nat. Commun.* 13:7203; functions ``fx_CHAOS`` / ``fx_PAS`` / ``fx_1NN`` / ``fx_kNN`` in
``R/SpatialPCA_utilties.R`` of https://github.com/shangll123/SpatialPCA), which the spatial-clustering benchmark
SDMBench re-implemented in Python (Yuan et al. 2024, *Nat. Methods*, "Benchmarking spatial clustering methods with
spatially resolved transcriptomics data"; ``_compute_CHAOS`` / ``_compute_PAS`` in ``SDMBench/SDMBench.py`` of
https://github.com/zhaofangyuan98/SDMBench). Both are lower-is-better. Neighbour searches use a k-d tree, so memory
stays linear in the number of spots (the reference code computes one row of the distance matrix per spot).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy.spatial import cKDTree
from sklearn import metrics as skm

from ._utils import (
    check_library_key,
    recorded_spatial_key,
    resolve_library_key,
    shared_positions,
    user_stacklevel,
    warn_extra_coordinates,
    warn_pooled_slices,
    whole_number,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["COLUMNS", "chaos", "evaluate", "pas"]

#: Columns of the table returned by :func:`evaluate`, in order.
COLUMNS: tuple[str, ...] = ("ari", "nmi", "homogeneity", "completeness", "chaos", "pas", "n_spots")
#: Index of :func:`evaluate`'s first row, over all scored spots (the rows of the libraries, when any, follow it).
POOLED = "all"


def _as_labels(labels: Sequence | np.ndarray | pd.Series, n: int | None = None, name: str = "labels") -> np.ndarray:
    lab = pd.Series(np.asarray(labels, dtype=object) if not isinstance(labels, pd.Series) else labels.to_numpy())
    if n is not None and len(lab) != n:
        raise ValueError(f"`{name}` has {len(lab)} entries but `coords` has {n} rows; they must match spot for spot.")
    if lab.isna().any():
        raise ValueError(
            f"`{name}` contains {int(lab.isna().sum())} missing values; drop those spots first "
            "(`evaluate` does this for you)."
        )
    return pd.factorize(lab)[0]


def _as_coords(coords: np.ndarray, what: str = "`coords`", spots: str = "spots", fix: str = "") -> np.ndarray:
    """``coords`` as a float array, refused when empty or not finite; the error names ``what`` and suggests ``fix``."""
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (n_spots, n_dims) array, got shape {xy.shape}.")
    unplaced = int((~np.isfinite(xy)).any(axis=1).sum())
    if unplaced:
        raise ValueError(f"{what} has NaN or inf coordinates for {unplaced} {spots}: fix them, drop those spots{fix}.")
    return xy


def chaos(labels: Sequence | np.ndarray | pd.Series, coords: np.ndarray) -> float:
    """Spatial chaos score (CHAOS) of a labelling; lower means spatially more coherent domains.

    Definition (SpatialPCA ``fx_CHAOS``, Shang & Zhou 2022; SDMBench ``_compute_CHAOS``, Yuan et al. 2024):
    standardise each coordinate axis to mean 0 and standard deviation 1 (R's ``scale``: sample standard
    deviation, ``ddof=1``); for every cluster with at least two spots, build the 1-nearest-neighbour graph among
    the spots of that cluster only and sum the edge lengths (each spot's distance to its nearest spot of the same
    cluster); CHAOS is the sum over clusters divided by the total number of spots. Clusters with a single spot
    contribute 0 (the reference skips them) but count in the denominator.

    A compact domain has short within-cluster nearest-neighbour distances, about one spot spacing; a
    fragmented labelling leaves members of a cluster far apart.

    Parameters
    ----------
    labels
        Cluster label of each spot (any hashable values, no missing values).
    coords
        Spot coordinates, shape ``(n_spots, n_dims)``, e.g. ``adata.obsm["spatial"]``.

    Returns
    -------
    The CHAOS score (a non-negative float).

    Notes
    -----
    SDMBench uses scikit-learn's ``StandardScaler`` (``ddof=0``) and also skips clusters of two spots; the values
    differ from ours by at most a factor ``sqrt(n / (n - 1))`` from the scaling, plus those two-spot clusters.
    Uses :class:`scipy.spatial.cKDTree`; memory is linear in the number of spots.

    Examples
    --------
    Four spots on a line, two per cluster. After standardisation (sample sd of 0, 1, 2, 3 is 1.291) the
    nearest same-cluster neighbour of every spot is 1 / 1.291 away in the contiguous labelling and
    2 / 1.291 away in the alternating one:

    >>> import numpy as np
    >>> xy = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    >>> round(chaos(["a", "a", "b", "b"], xy), 4)
    0.7746
    >>> round(chaos(["a", "b", "a", "b"], xy), 4) > round(chaos(["a", "a", "b", "b"], xy), 4)
    True
    """
    xy = _as_coords(coords)
    codes = _as_labels(labels, n=xy.shape[0])
    n = xy.shape[0]
    if n < 2:
        return 0.0
    sd = xy.std(axis=0, ddof=1)
    sd[sd == 0] = 1.0  # a constant axis carries no distance; R's scale() would give NaN here
    z = (xy - xy.mean(axis=0)) / sd
    total = 0.0
    for c in np.unique(codes):
        pts = z[codes == c]
        if pts.shape[0] < 2:
            continue
        dist, _ = cKDTree(pts).query(pts, k=2)
        total += float(dist[:, 1].sum())
    return total / n


def pas(labels: Sequence | np.ndarray | pd.Series, coords: np.ndarray, *, k: int = 10) -> float:
    """Percentage of abnormal spots (PAS) of a labelling, as a fraction in [0, 1]; lower is better.

    Definition (SpatialPCA ``fx_PAS`` / ``fx_kNN``, Shang & Zhou 2022; SDMBench ``_compute_PAS``, Yuan et al.
    2024): a spot is *abnormal* when more than ``k / 2`` of its ``k`` nearest spots (Euclidean distance on the
    unscaled coordinates, the spot itself excluded) carry a different label; with the reference ``k = 10`` that is
    at least 6 of 10. PAS is the number of abnormal spots divided by the number of spots.

    Parameters
    ----------
    labels
        Cluster label of each spot (any hashable values, no missing values).
    coords
        Spot coordinates, shape ``(n_spots, n_dims)``.
    k
        Number of nearest neighbours. When there are at most ``k`` spots, all other spots are used, with a warning:
        each spot is then compared with the whole tissue, and PAS says little about spatial coherence.

    Returns
    -------
    The PAS score (a float between 0 and 1).

    Notes
    -----
    Ties in distance (common on Visium pixel coordinates and on lattices) are broken by spot order, as R's
    ``order`` does in the reference, so the result equals the reference exactly, also where spots share a
    position: such a spot counts as its neighbour, the spot itself never does (the reference, too, removes the spot
    by its index). Uses :class:`scipy.spatial.cKDTree`
    (memory linear in the number of spots).

    Examples
    --------
    A 5 × 5 grid labelled ``"a"`` except its centre spot, ``"b"``. With ``k = 4`` a spot is abnormal when at
    least 3 of its 4 nearest spots differ: only the centre is (its 4 nearest all differ), so PAS = 1 / 25:

    >>> import numpy as np
    >>> xy = np.array([(i, j) for i in range(5) for j in range(5)], dtype=float)
    >>> labels = np.array(["a"] * 25)
    >>> labels[12] = "b"
    >>> pas(labels, xy, k=4)
    0.04
    """
    xy = _as_coords(coords)
    codes = _as_labels(labels, n=xy.shape[0])
    n = xy.shape[0]
    k = whole_number(k, "`k`")
    kk = min(k, n - 1)
    if kk < 1:
        return 0.0
    if kk < k:
        warnings.warn(
            f"PAS with k={k} neighbours on {n} spots: each spot is compared with all {kk} others, the whole tissue, "
            "so the score says little about spatial coherence; use a smaller k.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    neigh = _knn_stable(xy, kk)
    n_diff = (codes[neigh] != codes[:, None]).sum(axis=1)
    return float((n_diff > kk / 2).sum()) / n


def _knn_stable(xy: np.ndarray, k: int, pad: int = 8) -> np.ndarray:
    """Indices of the ``k`` nearest other spots of every spot, ties broken by spot index (as R's ``order``)."""
    n = xy.shape[0]
    tree = cKDTree(xy)
    m = min(n, k + 1 + pad)
    dist, idx = tree.query(xy, k=m)
    dist = np.where(idx == np.arange(n)[:, None], np.inf, dist)  # the spot itself never counts
    order = np.lexsort((idx, dist), axis=-1)
    idx_s = np.take_along_axis(idx, order, axis=-1)
    dist_s = np.take_along_axis(dist, order, axis=-1)
    neigh = idx_s[:, :k].copy()
    if m < n:
        # a tie at the k-th distance may continue past the queried candidates: redo those rows exactly
        farthest = np.where(np.isinf(dist), -np.inf, dist).max(axis=1)
        for i in np.flatnonzero(dist_s[:, k - 1] >= farthest):
            cand = np.asarray(tree.query_ball_point(xy[i], r=dist_s[i, k - 1] * (1 + 1e-9)), dtype=np.intp)
            cand = cand[cand != i]
            d = np.sqrt(((xy[cand] - xy[i]) ** 2).sum(axis=1))
            neigh[i] = cand[np.lexsort((cand, d))][:k]
    return neigh


#: Label strings that mean "missing": what ``astype(str)`` makes of NaN / None / pandas' NA, and R's ``NA``.
MISSING_STRINGS: frozenset[str] = frozenset({"", "nan", "none", "na", "<na>"})


def _is_missing(values: pd.Series, ignore: Hashable | Sequence[Hashable] | None = ()) -> np.ndarray:
    """Spots whose label is missing (NaN, None, one of :data:`MISSING_STRINGS`) or in ``ignore``.

    Labels in ``ignore`` are text (compared as text, in any case) or numbers (compared by value, so that ``7``
    matches a label ``7.0`` of a numeric column); one label may be given on its own.
    """
    if ignore is None:
        ignore = ()
    elif isinstance(ignore, str) or not isinstance(ignore, Iterable):
        ignore = (ignore,)
    # a copy: under pandas' copy-on-write (the default from pandas 3) to_numpy() gives a read-only view
    missing = values.isna().to_numpy().copy()
    as_str = _label_texts(values)
    texts = {v.strip().lower() for v in ignore if isinstance(v, str)}
    missing |= as_str.isin(MISSING_STRINGS | texts).to_numpy()
    missing |= values.isin([v for v in ignore if not isinstance(v, str)]).to_numpy()
    return missing


def _label_texts(values: pd.Series) -> pd.Series:
    """Labels as the text compared with :data:`MISSING_STRINGS` and ``ignore``: stripped, lower case."""
    return values.astype(str).str.strip().str.lower()


def _say_which_texts_mean_missing(values: pd.Series, key: str) -> None:
    """Log (scanpy's ``info``) how many spots of ``obs[key]`` carry a text label read as missing, such as ``"NA"``.

    Read on the distinct labels, not on every spot (:func:`_is_missing` has gone over the spots already).
    """
    labels = pd.Series(values.dropna().unique())
    named = labels[_label_texts(labels).isin(MISSING_STRINGS).to_numpy()]
    if len(named):
        shown = sorted(set(named.astype(str).str.strip()))
        logg.info(
            f"{int(values.isin(named).sum())} spots of obs[{key!r}] labelled {shown} are taken as unannotated "
            f"(texts read as missing: {sorted(MISSING_STRINGS)}) and not scored."
        )


def _score(truth: np.ndarray, pred: np.ndarray, xy: np.ndarray, k: int, slices: np.ndarray) -> dict[str, float]:
    """The scores of one row.

    ``slices`` names the slice of each spot. The spatial scores never pair spots of two slices: each slice is scored
    on its own, and the scores are averaged weighted by spots (both are means over spots).
    """
    n = len(truth)
    if n == 0:
        return dict.fromkeys(COLUMNS[:-1], np.nan) | {"n_spots": 0}
    parts = [slices == s for s in pd.unique(slices)]
    return {
        "ari": float(skm.adjusted_rand_score(truth, pred)),
        "nmi": float(skm.normalized_mutual_info_score(truth, pred)),
        "homogeneity": float(skm.homogeneity_score(truth, pred)),
        "completeness": float(skm.completeness_score(truth, pred)),
        "chaos": sum(chaos(pred[m], xy[m]) * m.sum() for m in parts) / n,
        "pas": sum(pas(pred[m], xy[m], k=k) * m.sum() for m in parts) / n,
        "n_spots": n,
    }


def evaluate(
    adata: AnnData,
    truth_key: str,
    pred_key: str = "dfm_domain",
    *,
    spatial_key: str | None = None,
    library_key: str | None = None,
    ignore: Hashable | Sequence[Hashable] | None = ("undetermined",),
    k: int = 10,
) -> pd.DataFrame:
    """Score a spatial-domain labelling against a manual annotation.

    Only spots with a truth label are scored: a spot is left out when ``obs[truth_key]`` is missing (NaN/None, or
    the strings ``""``, ``"nan"``, ``"None"``, ``"NA"``, ``"<NA>"`` that ``astype(str)`` or an R export leave in
    its place) or one of ``ignore`` (compared case-insensitively, e.g. her2st's ``"undetermined"``).
    Spots without a prediction (missing in the same sense) are left out too, with a warning. The spatial scores
    (:func:`chaos`, :func:`pas`) are computed from the predicted labels of the same scored spots and their
    coordinates (the first two columns of ``obsm[spatial_key]``, x and y, as every step of the package reads them,
    with a warning when further columns vary; only the scored spots need coordinates), separately within each
    library (the ``library_key`` given, or else the one ``tl.cluster`` recorded in ``uns[pred_key]``: slices in one
    AnnData often share coordinates), and averaged over spots in a row that covers several. Labels are compared by
    value (``1`` and ``1.0`` are one domain; the text ``"1"`` and the number ``1`` are two). The AnnData is not
    modified.

    Parameters
    ----------
    adata
        Annotated data matrix with both label columns in ``obs`` and coordinates in ``obsm[spatial_key]``.
    truth_key
        Column of ``adata.obs`` with the reference annotation (e.g. ``"layer"`` for DLPFC, ``"label"`` for her2st).
    pred_key
        Column of ``adata.obs`` with the predicted domains (``dfm.tl.cluster`` writes ``"dfm_domain"``).
    spatial_key
        Key of ``adata.obsm`` with the spot coordinates. By default the one ``tl.cluster`` recorded in
        ``uns[pred_key]`` (the coordinates the spots were serialized on), else ``"spatial"``.
    library_key
        Column of ``adata.obs`` naming the slice of each spot: every slice is scored on its own as well. By default
        the one ``tl.cluster`` recorded in ``uns[pred_key]`` (``pp.serialize``'s ``library_key``), as the other
        steps take it.
    ignore
        Truth labels that mean "not annotated", besides missing values: one label or several; ``None`` for none.
        Text is compared in any case, numbers by value (``7`` matches ``7.0`` in a numeric column).
    k
        Number of neighbours for :func:`pas` (10 in the reference definition).

    Returns
    -------
    A tidy :class:`pandas.DataFrame` with columns ``ari``, ``nmi``, ``homogeneity``, ``completeness``
    (scikit-learn's ``adjusted_rand_score``, ``normalized_mutual_info_score``, ``homogeneity_score``,
    ``completeness_score``; higher is better), ``chaos``, ``pas`` (lower is better) and ``n_spots`` (spots
    scored). The first row, ``"all"``, scores the whole AnnData; with a library key (given or recorded) one row per
    library follows, indexed by library name (the index named after the key, else ``"library"``).

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> adata.obs["dfm_domain"] = adata.obs["layer"]  # the annotation scored against itself
    >>> table = dfm.metrics.evaluate(adata, "layer")
    >>> list(table.columns)
    ['ari', 'nmi', 'homogeneity', 'completeness', 'chaos', 'pas', 'n_spots']
    >>> float(table.loc["all", "ari"]), int(table.loc["all", "n_spots"])
    (1.0, 3611)
    """
    for key in (truth_key, pred_key):
        if key not in adata.obs:
            step = " Run dfm.tl.cluster(adata) first." if key == pred_key else ""
            raise KeyError(f"`adata.obs` has no column {key!r}; available columns: {list(adata.obs.columns)}.{step}")
    spatial_key = spatial_key or recorded_spatial_key(adata, pred_key)
    if spatial_key not in adata.obsm:
        raise KeyError(f"`adata.obsm` has no {spatial_key!r}; available keys: {list(adata.obsm.keys())}.")
    slice_key = resolve_library_key(adata, library_key, pred_key)
    check_library_key(adata, slice_key)
    truth_s = adata.obs[truth_key]
    pred_s = adata.obs[pred_key]
    keep = ~_is_missing(truth_s, ignore)
    _say_which_texts_mean_missing(truth_s, truth_key)
    if not keep.any():
        warnings.warn(
            f"No spot has a truth label in obs[{truth_key!r}] (all missing or in `ignore`); nothing is scored.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    no_pred = _is_missing(pred_s) & keep
    if no_pred.any():
        warnings.warn(
            f"{int(no_pred.sum())} annotated spots have no prediction in obs[{pred_key!r}]; they are not scored.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        keep &= ~no_pred
    # labels by value, as scikit-learn, chaos and pas compare them (text would split 1 and 1.0 into two domains)
    truth = pd.factorize(truth_s)[0]
    pred = pd.factorize(pred_s)[0]
    warn_extra_coordinates(adata, spatial_key)
    xy_all = np.full((adata.n_obs, 2), np.nan)  # coordinates of the scored spots only: an unscored spot may lack them
    if keep.any():
        xy_all[keep] = _as_coords(
            np.asarray(adata.obsm[spatial_key])[keep, :2],
            what=f"obsm[{spatial_key!r}]",
            spots="scored spots, which CHAOS and PAS need",
            fix=", or pass spatial_key= other coordinates",
        )

    if slice_key is None:
        wrong = "CHAOS and PAS computed as if they were one (wrong)"
        warn_pooled_slices(
            adata[keep],  # the scored spots: one annotated slice of several is scored alone
            shared_positions(xy_all[keep]),
            None,
            caller="evaluate",
            shared=wrong,
        )
    # the slices (the key given, or the one tl.cluster recorded): a row each, and spatial scores within each
    groups: dict[Hashable, np.ndarray] = {POOLED: np.ones(adata.n_obs, dtype=bool)}  # first, as without a key
    slices = np.zeros(adata.n_obs)
    if slice_key is not None:
        lib = adata.obs[slice_key]
        slices = lib.astype(str).to_numpy()
        categorical = isinstance(lib.dtype, pd.CategoricalDtype)
        cats = lib.cat.remove_unused_categories().cat.categories if categorical else pd.unique(lib)  # with spots
        if POOLED in set(cats):
            raise ValueError(
                f"obs[{slice_key!r}] names a library {POOLED!r}, the name of the row pooled over all libraries; "
                "rename that library."
            )
        groups.update({c: (lib == c).to_numpy() for c in cats})
    rows = {}
    for name, in_lib in groups.items():
        m = in_lib & keep
        rows[name] = _score(truth[m], pred[m], xy_all[m], k, slices[m])
    out = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    out["n_spots"] = out["n_spots"].astype(int)
    out.index.name = slice_key or "library"
    return out
