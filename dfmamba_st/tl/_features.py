"""Per-spot input features: counts → log-normalised HVGs → standardised → (optionally) PCA, and spatial rings.

The fitted transform is kept (gene list, means, scales, loadings) so that a trained model can embed a new slice or
coarsened data with exactly the same features (genes aligned by name).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from .._utils import serialized_rows, user_stacklevel

__all__ = [
    "FeatureTransform",
    "expression_matrix",
    "expression_name",
    "gene_ranks",
    "input_kind",
    "recovered_counts",
    "smooth",
    "spatial_graph",
    "top_genes",
]

#: the spatial graph links all spots at one position to each other (quadratic in their number): more than this many at
#: one position (coordinates missing and filled with one value) are refused
MAX_AT_ONE_POSITION = 1_000
#: standardisation and PCA are fitted on at most this many spots (a seeded random subset beyond it)
MAX_FIT_SPOTS = 50_000
#: spots densified at a time when features are computed (the n_spots × n_genes matrix is never dense)
CHUNK_SPOTS = 16_384
#: raw counts are normalised to this total per spot before log1p
COUNTS_TARGET = 1e4
#: non-integer input above this is neither counts nor log-normalised (log1p of counts normalised to 10^4 per spot
#: stays below 9.3, to 10^6 below 13.9); scanpy's dispersions would overflow in expm1 on it (above ~88)
MAX_LOG_VALUE = 20.0
#: non-integer input whose spot totals vary by less than this (coefficient of variation) was normalised, not logged
CONSTANT_TOTAL_CV = 1e-3
#: log-normalised values are taken back to counts (:func:`recovered_counts`) when all lie this close to whole numbers,
#: relative to their size (float32 values of the DLPFC slices: within 1e-6, any target_sum)
RECOVERY_RTOL = 1e-5
#: a spot without a gene counted once is scaled by the smallest whole number up to this that makes its values whole
#: (17 was the most any spot needed on random 20-500-gene panels of 151673; a larger bound lets noise fit: 2026-12-06)
MAX_SMALLEST_COUNT = 20
#: spots with at most this many expressed genes often have counts that share a factor, which recovery cannot see
FEW_GENES = 2


def _where_else(adata: AnnData, layer: str | None) -> str:
    """Where else ``adata`` may keep its expression: its other layers and ``adata.raw`` (ends the sentence)."""
    others = [name for name in adata.layers if name != layer]
    options = [f"layer= one of {others}"] if others else []
    if adata.raw is not None:
        options.append("adata.raw.to_adata() (scanpy keeps the log-normalised data there before sc.pp.scale)")
    return f": e.g. {'; or '.join(options)}." if options else "."


class Expression(NamedTuple):
    """What :func:`expression_matrix` read.

    The matrix, whether it is raw counts, and whether those counts were recovered from log-normalised values (three
    fields, so that unpacking it into two names fails).
    """

    matrix: sp.csr_matrix
    is_counts: bool
    recovered: bool


def input_kind(is_counts: bool, recovered: bool) -> str:
    """What :func:`expression_matrix` read, in words (``uns['dfm']['params']['input']``)."""
    return "recovered counts" if recovered else "counts" if is_counts else "log-normalised"


def expression_name(layer: str | None) -> str:
    """Where the expression is read, as the messages name it: ``adata.X`` or ``adata.layers['name']``."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def expression_matrix(adata: AnnData, layer: str | None, *, counts_for: str | None = None) -> Expression:
    """The expression to use (sparse float32), whether it is raw counts and whether these were recovered.

    Log-normalised counts are returned as the raw counts :func:`recovered_counts` takes them back to (logged). Raises
    a clear error for a missing layer, NaN/inf or negative values, no expression at all, fewer than 2 genes, gene
    names that are not unique (genes are chosen and aligned by name), and non-integer values that are not
    log-normalised: above ``MAX_LOG_VALUE``, or spot totals all equal (normalised but not log-transformed). Other
    log-normalised values are returned as they are, with a warning; ``counts_for`` (e.g. ``"dfm.pp.coarsen sums
    counts"``) refuses them instead: the caller needs counts.
    """
    if not adata.var_names.is_unique:
        repeated = adata.var_names[adata.var_names.duplicated()].unique()
        raise ValueError(
            f"adata.var_names are not unique ({len(repeated)} repeated, e.g. {list(repeated[:3])}); genes are matched "
            "by name, so make them unique first: adata.var_names_make_unique() (as scanpy suggests after read_visium)."
        )
    if adata.isbacked:
        raise ValueError(
            "adata is opened in backed mode (read_h5ad(..., backed='r')), whose expression is not in memory: load "
            "it first with adata = adata.to_memory()."
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers; available layers: {list(adata.layers)}.")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is empty; pass layer= with the expression to use.")
    # no copy of a float32 CSR matrix in canonical form (its arrays shared with the caller's): nothing in the package
    # changes such a matrix in place (recovered_counts and the log-normalisation make arrays of their own; tests check
    # adata.X is left as it was), and a copy of the whole matrix cost as much again as the data (+0.9 GB at 100,000
    # cells, an audit). scipy sorts the indices and sums the duplicates of any other in place (e.g. in expm1): copied
    X = sp.csr_matrix(X, dtype=np.float32)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    where = expression_name(layer)
    if adata.n_vars < 2:
        raise ValueError(f"The AnnData has {adata.n_vars} gene(s); at least 2 are needed.")
    if X.nnz and not np.all(np.isfinite(X.data)):
        raise ValueError(f"{where} contains NaN or inf values; fix or remove them before embedding.")
    if X.nnz and X.data.min() < 0:
        raise ValueError(
            f"{where} contains negative values (is it already scaled?). Pass raw counts or log-normalised data"
            + _where_else(adata, layer)
        )
    if not X.data.any():
        raise ValueError(f"{where} is zero everywhere: there is no expression to embed (is it the right layer?).")
    if np.all(X.data == np.round(X.data)):
        return Expression(X, True, False)
    largest = float(X.data.max())
    counts = recovered_counts(X) if largest <= MAX_LOG_VALUE else None
    if counts is not None:
        logg.warning(  # said at scanpy's default verbosity: the input is not used as given
            f"{where} holds log1p of counts (scaled per spot, as sc.pp.normalize_total does, or not): their raw "
            "counts were recovered and are used"
        )
        few = int(np.sum(np.diff(counts.indptr) <= FEW_GENES))
        if counts_for is not None and few:
            warnings.warn(
                f"{where} holds log-normalised counts, taken back to raw counts up to a factor per spot (counts 2 and "
                f"4 come back as 1 and 2, a single gene's count as 1), and {few} spots express at most {FEW_GENES} "
                f"genes, where such a factor is likely: {counts_for}, and sums over them may be low. Pass the raw "
                "counts (layer='counts') for exact sums.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return Expression(counts, True, True)
    if counts_for is not None:
        raise ValueError(
            f"{where} holds non-integer values, but {counts_for} (log-normalised values whose counts cannot be "
            "recovered cannot be summed). Pass the raw counts: keep them in a layer before normalising "
            "(adata.layers['counts'] = adata.X.copy()) and pass layer='counts'."
        )
    fix = (
        "Pass raw counts (whole numbers; e.g. layer='counts'), or log-normalised values (sc.pp.normalize_total "
        "then sc.pp.log1p). Corrected counts that are not whole numbers (ambient-RNA removal) can be rounded."
    )
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals = totals[totals > 0]
    if totals.size > 1 and totals.std() < CONSTANT_TOTAL_CV * totals.mean():
        raise ValueError(
            f"{where} looks normalised but not log-transformed (every spot sums to {totals.mean():.4g}): run "
            f"sc.pp.log1p on it first. {fix}"
        )
    if largest > MAX_LOG_VALUE:
        raise ValueError(
            f"{where} holds non-integer values up to {largest:.4g}: neither raw counts nor log-normalised "
            f"values (log1p of normalised counts stays below ~{MAX_LOG_VALUE:g}). {fix}"
        )
    layers = f"adata.layers holds {list(adata.layers)}" if len(adata.layers) else "adata has no layers"
    warnings.warn(
        f"{where} holds log-normalised values whose raw counts cannot be recovered (not sc.pp.normalize_total "
        "then sc.pp.log1p of whole counts): they are used as they are (a model trained on them ranks its genes "
        "by scanpy's 'seurat' dispersion instead of 'seurat_v3' on counts). The accuracy in the docs was "
        f"measured on raw counts: pass them if you have them (layer=; {layers}).",
        stacklevel=user_stacklevel(),
    )
    return Expression(X, False, False)


def _whole(values: np.ndarray) -> np.ndarray:
    """Which values are whole numbers to within ``RECOVERY_RTOL`` of their size (float32 rounding, not noise)."""
    return np.abs(values - np.round(values)) <= RECOVERY_RTOL * np.maximum(np.abs(values), 1.0)


def recovered_counts(X: sp.csr_matrix) -> sp.csr_matrix | None:
    """The raw counts behind log-normalised values, or ``None`` when they cannot be recovered exactly.

    ``sc.pp.normalize_total`` scales each spot's counts by one factor (any target, genes removed afterwards or not)
    and ``sc.pp.log1p`` takes ``log(1 + x)``: ``expm1`` undoes the log, and dividing each spot by its smallest
    non-zero value gives back its counts when some gene of the spot was counted once (every spot of the DLPFC slices
    151673 and 151674 has one); a spot whose smallest count is larger (a small panel) is then multiplied by the
    smallest whole number up to ``MAX_SMALLEST_COUNT`` that makes its values whole (counts 2 and 3: ratios 1 and 1.5,
    times 2). The result is kept only if every value lies within ``RECOVERY_RTOL`` (relative) of a whole number
    (within 1e-6 on those slices, from float32 values, any ``target_sum``); other transforms (log2, scaled or
    corrected values) give fractions and ``None``, and so does a spot whose smallest count is above
    ``MAX_SMALLEST_COUNT`` with no common factor.

    A spot's counts are known only up to a common factor: a spot whose counts share one (a single expressed gene,
    or counts 2 and 4) comes back divided by it (1; 1 and 2). The per-spot normalisation of ``tl.embed`` does not
    see that factor; sums over spots (``pp.coarsen``) do.

    Examples
    --------
    >>> import numpy as np, scanpy as sc, scipy.sparse as sp
    >>> import dfmamba_st as dfm
    >>> from dfmamba_st.tl._features import recovered_counts
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> counts = sp.csr_matrix(adata.X, dtype=np.float32)
    >>> sc.pp.normalize_total(adata)
    >>> sc.pp.log1p(adata)
    >>> bool(np.array_equal(recovered_counts(sp.csr_matrix(adata.X)).toarray(), counts.toarray()))
    True
    >>> recovered_counts(sp.csr_matrix(adata.X / np.log(2))) is None  # log2: not counts
    True
    """
    values = sp.csr_matrix(X, dtype=np.float64, copy=True)  # eliminate_zeros rewrites the index arrays in place
    values.eliminate_zeros()
    values.data = np.expm1(values.data)
    n_values = np.diff(values.indptr)
    filled = n_values > 0
    smallest = np.ones(values.shape[0])
    smallest[filled] = np.minimum.reduceat(values.data, values.indptr[:-1][filled])
    values.data /= np.repeat(smallest, n_values)
    multiplier = np.ones(values.shape[0])
    pending = np.unique(np.repeat(np.arange(values.shape[0]), n_values)[~_whole(values.data)])
    for factor in range(2, MAX_SMALLEST_COUNT + 1):  # each spot takes the smallest that makes its values whole
        if not pending.size:
            break
        ratios = values[pending]  # rows with a fraction, so none is empty and reduceat counts each row's own
        fractions = np.add.reduceat(~_whole(ratios.data * factor), ratios.indptr[:-1])
        multiplier[pending[fractions == 0]] = factor
        pending = pending[fractions > 0]
    if pending.size:
        return None
    values.data = np.round(values.data * np.repeat(multiplier, n_values))
    return sp.csr_matrix(values, dtype=np.float32)


def naming_hint(var: pd.DataFrame, genes: list[str], n_found: int) -> str:
    """Why most of a model's genes are missing from the names ``var.index`` (``n_found`` of them match).

    Another ``var`` column naming more of them (symbols vs Ensembl IDs), else a narrower panel.
    """
    model_genes = set(genes)
    found = {c: int(var[c].astype(str)[lambda v: v.isin(model_genes)].nunique()) for c in var.columns}
    column = max(found, key=found.get, default=None)
    if column is not None and found[column] > n_found:
        return (
            f" adata.var[{column!r}] names {found[column]} of them: the model was trained on genes named that way; "
            f"use it as the names (adata.var_names = adata.var[{column!r}].astype(str); adata.var_names_make_unique())."
        )
    return (
        f" adata holds {len(var)} genes and none of its var columns names more of the model's: a smaller panel "
        "than the training data's, or genes named another way (symbols vs Ensembl IDs)?"
    )


@dataclass
class FeatureTransform:
    """A fitted map from a slice's expression to per-spot feature vectors.

    Attributes
    ----------
    genes
        Genes used, in order.
    mean, scale
        Per-gene standardisation of the log-normalised expression (fitted on the training slice). A gene that does not
        vary over the training spots has an infinite scale: its standardised value is 0 on every slice, as it was in
        training, where its weights learnt nothing (model files written before 2026-12-07 hold 1.0 there: the gene's
        deviation from its training value).
    loadings
        (n_genes, n_components) PCA loadings, or ``None`` to use the standardised genes themselves.
    log_normalize
        Whether the training input was raw counts (normalised to 10^4 per spot and log1p-transformed).
    log_total
        For log-normalised training input: the median spot total it was normalised to (of ``expm1`` over all genes),
        so that raw counts given later are normalised the same way; ``None`` for counts.
    share
        For counts: each gene's share of the training counts over :attr:`genes` (all spots summed). A spot's counts
        are normalised by its total over the model's genes; on a slice that lacks some of them, that total is divided
        by the present genes' share, so that the present genes keep the scale they had in training (without it,
        every present gene rose with the share missing). ``None`` for log-normalised training input and in model
        files written before it was kept (no correction).
    """

    genes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    loadings: np.ndarray | None
    log_normalize: bool
    log_total: float | None = None
    share: np.ndarray | None = None

    @property
    def rescales_totals(self) -> bool:
        """Whether, with genes missing, a spot's total over the present ones is divided by their :attr:`share`."""
        return self.share is not None and self.log_normalize

    @property
    def n_features(self) -> int:
        """Width of the feature vectors."""
        return len(self.genes) if self.loadings is None else self.loadings.shape[1]

    @classmethod
    def fit(
        cls,
        adata: AnnData,
        *,
        layer: str | None,
        n_top_genes: int,
        n_pcs: int | None,
        seed: int,
        chosen: bool = True,
        order_key: str = "dfm_order",
        library_key: str | None = None,
    ) -> FeatureTransform:
        """Choose HVGs (scanpy, seurat_v3 on counts) and fit standardisation and PCA on ``adata``.

        HVGs are chosen on all spots (sparse); the standardisation and the PCA on at most ``MAX_FIT_SPOTS`` of them
        (a random subset drawn with ``seed`` along the curve of ``obs[order_key]``, or the spots' names without it:
        the same spots whatever the order of the rows, as in :func:`~dfmamba_st.tl.embed`), so memory stays bounded
        on large tissues. With fewer genes than ``n_top_genes`` all are used: a warning when the user ``chosen`` that
        number, a log message for a preset's.
        """
        X, is_counts, _ = expression_matrix(adata, layer)
        order = serialized_rows(adata, order_key, library_key)
        return cls.fit_matrix(
            X, is_counts, adata.var_names, n_top_genes=n_top_genes, n_pcs=n_pcs, seed=seed, chosen=chosen, order=order
        )

    @classmethod
    def fit_matrix(
        cls,
        X: sp.csr_matrix,
        is_counts: bool,
        var_names: pd.Index,
        *,
        n_top_genes: int,
        n_pcs: int | None,
        seed: int,
        chosen: bool = True,
        order: np.ndarray | None = None,
    ) -> FeatureTransform:
        """:meth:`fit` on an expression matrix already read by :func:`expression_matrix` (genes ``var_names``).

        Genes are named as text (``var_names`` as ``str``), as they are after a round trip through an ``.h5ad`` file.
        On more than ``MAX_FIT_SPOTS`` spots the subset is drawn along ``order`` (the rows in an order of their own,
        e.g. :func:`~dfmamba_st._utils.serialized_rows`), so that it holds the same spots, in the same order, whatever
        the order of the rows; by row position without it.
        """
        var_names = pd.Index(var_names).astype(str)
        log_total = None if is_counts else float(np.median(_row_totals(X.expm1())))
        n_vars = len(var_names)
        genes = list(var_names)
        if n_top_genes >= n_vars:
            if n_top_genes > n_vars:
                message = f"n_top_genes={n_top_genes} but the data has {n_vars} genes: using all {n_vars}."
                if chosen:
                    warnings.warn(message, stacklevel=user_stacklevel())
                else:
                    logg.info(f"    {message}")
        else:
            genes = top_genes(X, var_names, n_top_genes, is_counts)
        X = X[:, var_names.get_indexer(genes)]
        share = None
        if is_counts:  # (on every spot: a column sum)
            totals = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
            share = (totals / max(totals.sum(), 1.0)).astype(np.float32)
        if X.shape[0] > MAX_FIT_SPOTS:  # positions along ``order``: the same spots whatever the rows' order
            drawn = np.sort(np.random.default_rng(seed).choice(X.shape[0], MAX_FIT_SPOTS, replace=False))
            X = X[drawn if order is None else np.asarray(order)[drawn]]
        dense = _log_normalize(X, is_counts).toarray()
        mean = dense.mean(axis=0)
        scale = dense.std(axis=0)
        # a gene that does not vary over these spots taught the model nothing: infinite scale, so that it is 0 on
        # every slice (as here) rather than its deviation from this value, which weights never trained would read
        scale[scale == 0] = np.inf
        loadings = None
        if n_pcs is not None and n_pcs < len(genes):
            z = dense  # standardised in place: no second or third n_spots x n_genes array
            z -= mean
            z /= scale
            np.clip(z, -10, 10, out=z)
            del dense
            n_pcs = min(n_pcs, z.shape[0] - 1)
            loadings = sc.pp.pca(z, n_comps=n_pcs, random_state=seed, return_info=True)[1].T.astype(np.float32)
        return cls(genes, mean.astype(np.float32), scale.astype(np.float32), loadings, is_counts, log_total, share)

    def transform(self, adata: AnnData, *, layer: str | None = None) -> tuple[np.ndarray, list[str]]:
        """Features of every spot of ``adata``; returns ``(features, missing_genes)``.

        Genes are aligned by name; genes missing from ``adata`` are set to their training mean (0 after
        standardisation) and reported, and the spot totals over the genes present are divided by their training
        :attr:`share` (when kept). Input of the other kind than the training input (raw counts against
        log-normalised values) is first brought to the training input's kind, with a warning (see
        :meth:`as_training_input`).
        """
        X, is_counts, _ = expression_matrix(adata, layer)
        return self.transform_matrix(X, is_counts, adata.var)

    def transform_matrix(self, X: sp.csr_matrix, is_counts: bool, var: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """:meth:`transform` of an expression matrix already read by :func:`expression_matrix` (genes ``var``).

        Genes are matched by name as text, as in :meth:`fit_matrix`; when none matches, the error says which ``var``
        column names them, if one does (:func:`naming_hint`). With genes missing, the spot totals over the present
        ones are divided by their training :attr:`share`.
        """
        position = pd.Index(var.index).astype(str).get_indexer(self.genes)
        present = position >= 0
        missing = [g for g, ok in zip(self.genes, present) if not ok]
        if not present.any():
            raise ValueError(
                f"None of the model's genes are in adata.var_names (e.g. {self.genes[:3]})."
                + naming_hint(var, self.genes, 0)
            )
        X = self.as_training_input(X, is_counts)
        columns = sp.csr_matrix(
            (np.ones(present.sum(), dtype=np.float32), (position[present], np.flatnonzero(present))),
            shape=(len(var), len(self.genes)),
        )
        X = sp.csr_matrix(X @ columns)  # the model's genes, in its order; missing genes are empty columns
        target = COUNTS_TARGET
        if self.rescales_totals and missing:  # a spot's total over the present genes is this share of the whole
            target *= float(self.share[present].sum()) or 1.0
        width = self.n_features
        out = np.empty((X.shape[0], width), dtype=np.float32)
        for begin in range(0, X.shape[0], CHUNK_SPOTS):
            chunk = _log_normalize(X[begin : begin + CHUNK_SPOTS], self.log_normalize, target).toarray()
            z = np.clip((chunk - self.mean) / self.scale, -10, 10)
            z[:, ~present] = 0.0
            out[begin : begin + CHUNK_SPOTS] = z if self.loadings is None else z @ self.loadings
        return out, missing

    def as_training_input(self, X: sp.csr_matrix, is_counts: bool) -> sp.csr_matrix:
        """``X`` (all genes) as the kind of input the transform was fitted on, raw counts or log-normalised values.

        Log-normalised values given to a model trained on counts are mapped back with ``expm1``: the per-spot
        scaling they carry is then undone by the normalisation over the model's genes, so the features equal the
        counts' exactly when the values are ``sc.pp.normalize_total`` (any target) then ``sc.pp.log1p``. Raw counts
        given to a model trained on log-normalised values are normalised to the training data's median spot total
        (:attr:`log_total`) and log1p-transformed, what ``sc.pp.normalize_total`` + ``sc.pp.log1p`` did if the
        training data were made that way. Both cases warn: other log transforms (e.g. log2) do not map exactly.
        """
        if is_counts == self.log_normalize:
            return X
        if self.log_normalize:
            done = "mapped back with expm1 and normalised over the model's genes like the training counts"
            X = X.expm1()
        else:
            target = self.log_total or COUNTS_TARGET
            done = f"normalised to {target:.6g} per spot (the training data's median total) and log1p-transformed"
            X = _log_normalize(X, True, target)
        trained, given = ("raw counts", "log-normalised values") if self.log_normalize else ("log-normalised", "counts")
        warnings.warn(
            f"The model was trained on {trained}; adata holds {given}: they were {done}. This matches the training "
            "features when the log-normalised data are sc.pp.normalize_total then sc.pp.log1p (natural log).",
            stacklevel=user_stacklevel(),
        )
        return X

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to store in a model file."""
        out = {"mean": self.mean, "scale": self.scale}
        if self.loadings is not None:
            out["loadings"] = self.loadings
        if self.share is not None:
            out["share"] = self.share
        return out

    def config(self) -> dict:
        """JSON-serialisable settings to store in a model file."""
        return {"genes": self.genes, "log_normalize": self.log_normalize, "log_total": self.log_total}

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> FeatureTransform:
        """Rebuild from :meth:`config` and :meth:`state`."""
        return cls(
            list(config["genes"]),
            arrays["mean"],
            arrays["scale"],
            arrays.get("loadings"),
            config["log_normalize"],
            config.get("log_total"),  # None in files written before it was kept
            arrays.get("share"),  # likewise
        )


#: scikit-misc's loess (scanpy's seurat_v3 fit of variance on mean) crashes the process on 3 points or fewer
#: (scikit-misc 0.5.3): with fewer varying genes than this the fit is not tried
MIN_LOESS_GENES = 10


def _scanpy_scores(X: sp.csr_matrix, var_names: pd.Index, flavor: str, column: str) -> pd.Series:
    tmp = AnnData(X=X, var=pd.DataFrame(index=var_names))
    with warnings.catch_warnings():
        # every gene is ranked, so scanpy warns that n_top_genes reaches the number of scored genes: expected here
        warnings.filterwarnings("ignore", message=".*n_top_genes.*", category=UserWarning)
        return sc.pp.highly_variable_genes(tmp, flavor=flavor, n_top_genes=len(var_names), inplace=False)[column]


def _variance_scores(X: sp.csr_matrix, var_names: pd.Index) -> pd.Series:
    """seurat_v3's standardised variances; ``ValueError`` when its loess fit fails (or would crash: too few genes)."""
    mean = np.asarray(X.mean(axis=0)).ravel()
    varying = int((np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2 > 0).sum())
    if varying < MIN_LOESS_GENES:
        raise ValueError(f"only {varying} genes vary")
    return _scanpy_scores(X, var_names, "seurat_v3", "variances_norm")


def gene_ranks(X: sp.csr_matrix, var_names: pd.Index, is_counts: bool) -> pd.Series:
    """Rank of every gene by variability (0 = most variable), the same on every machine; :func:`top_genes` cuts it.

    scanpy scores the genes (``flavor="seurat_v3"`` on counts, ``"seurat"`` on log-normalised values). On counts of
    too few spots for seurat_v3's loess fit of variance on mean (it failed below a few hundred spots on crops of
    DLPFC slices), the counts are log-normalised and scored with ``"seurat"``, with a warning. Its own pick
    orders tied scores with NumPy's default sort, whose order of equal values depends on the CPU's vector extensions
    (on DLPFC 151673, 15 genes tie at the 3,000th place and a machine with AVX-512 keeps two others than one
    without). Here the scores are compared after rounding to float32, so that differences in the last bits of the
    float64 scores (as between machines) do not split a tie unless they straddle a float32 rounding step, and ties
    are broken by gene name.
    """
    if not is_counts:
        scores = _scanpy_scores(X, var_names, "seurat", "dispersions_norm")
    else:
        try:
            scores = _variance_scores(X, var_names)
        except ValueError as err:  # scikit-misc's loess reports a singular fit as a ValueError (with bytes)
            reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
            warnings.warn(
                f"Ranking genes with scanpy's seurat_v3 (a loess fit of variance on mean) failed on these "
                f"{X.shape[0]} spots ({reason}); they were ranked by scanpy's 'seurat' dispersion of the "
                "log-normalised counts instead. seurat_v3 works with a few hundred spots or more; "
                f"n_top_genes >= {len(var_names)} keeps every gene without ranking.",
                stacklevel=user_stacklevel(),
            )
            scores = _scanpy_scores(_log_normalize(X, True), var_names, "seurat", "dispersions_norm")
    score = np.nan_to_num(scores.to_numpy(np.float32), nan=-np.inf)
    order = np.lexsort((np.asarray(var_names, dtype=str), -score))  # by score, then by name
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return pd.Series(ranks, index=var_names, name="rank")


def top_genes(X: sp.csr_matrix, var_names: pd.Index, n_top_genes: int, is_counts: bool) -> list[str]:
    """The ``n_top_genes`` most variable genes (:func:`gene_ranks` below ``n_top_genes``), in ``var_names`` order.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> from dfmamba_st.tl._features import expression_matrix, top_genes
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> X, is_counts, _ = expression_matrix(adata, None)
    >>> genes = top_genes(X, adata.var_names, 500, is_counts)
    >>> len(genes), genes == [g for g in adata.var_names if g in set(genes)]
    (500, True)
    """
    ranks = gene_ranks(X, var_names, is_counts)
    return list(var_names[ranks.to_numpy() < n_top_genes])


def _row_totals(X: sp.csr_matrix) -> np.ndarray:
    return np.asarray(X.sum(axis=1)).ravel()


def _log_normalize(X: sp.csr_matrix, is_counts: bool, target: float = COUNTS_TARGET) -> sp.csr_matrix:
    """Counts normalised to ``target`` per spot and log1p-transformed; log-normalised values as they are."""
    if not is_counts:
        return X
    totals = _row_totals(X)
    totals[totals == 0] = 1.0
    return sp.csr_matrix(sp.diags(target / totals) @ X).log1p()


def spatial_graph(points: np.ndarray, *, n_neighbors: int = 6) -> sp.csr_matrix:
    """Row-normalised sparse graph of each spot, itself included, and its ``n_neighbors`` nearest spots.

    Spots as far as the ``n_neighbors``-th nearest one are all kept (up to a relative 1e-6), so ties on a grid do
    not leave the choice to the order of the spots: the graph is the same whatever the order of ``points``.
    Distances are counted between distinct positions: spots at one position are linked to each other and to the
    spots of the ``n_neighbors`` nearest other positions (else seven spots at one point would see only each other).
    More than ``MAX_AT_ONE_POSITION`` spots at one position are refused (every pair of them would be linked).
    Symmetrised, built with a k-d tree (never an N×N dense matrix). On the Visium grid's hexagonal positions
    (:class:`~dfmamba_st.pp.LibraryLayout` ``.points``) an inner spot's six touching spots are its neighbours.
    """
    from scipy.spatial import cKDTree

    n = points.shape[0]
    if n == 1:
        return sp.csr_matrix(np.ones((1, 1), dtype=np.float32))
    points = np.asarray(points, dtype=np.float64)
    positions, at, counts = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    if counts.max() > MAX_AT_ONE_POSITION:
        crowded = positions[counts.argmax()]
        raise ValueError(
            f"{counts.max():,} spots share one position ({', '.join(f'{v:g}' for v in crowded)}); the spatial graph "
            f"links all spots at a position to each other, so at most {MAX_AT_ONE_POSITION:,} are taken. Missing "
            "coordinates filled with one value, or several slices in one frame without library_key=? Fix the "
            "coordinates, or pass library_key= to dfm.pp.serialize."
        )
    distinct = cKDTree(positions)
    dist, _ = distinct.query(positions, k=min(n_neighbors, len(positions) - 1) + 1)  # the position itself first
    radius = dist.reshape(len(positions), -1)[:, -1]  # (k = 1, one position: the query's result is 1-D)
    near = cKDTree(points).query_ball_point(points, radius[at.ravel()] * (1 + 1e-6))
    rows = np.repeat(np.arange(n), [len(found) for found in near])
    graph = sp.csr_matrix((np.ones(rows.size), (rows, np.concatenate(near))), shape=(n, n))
    graph = (graph + graph.T).sign()  # each spot is its own neighbour (distance 0) once
    degree = np.asarray(graph.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / degree) @ graph, dtype=np.float32)


def smooth(features: np.ndarray, graph: sp.csr_matrix, hops: int) -> np.ndarray:
    """Average ``features`` over the graph ``hops`` times (a spot and its rings of neighbours)."""
    out = features
    for _ in range(hops):
        out = graph @ out
    return np.asarray(out, dtype=np.float32)
