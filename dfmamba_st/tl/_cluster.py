"""tl.cluster: spatial domains from the embedding (GMM, k-means or Leiden), optionally refined on the tissue."""

from __future__ import annotations

import numbers
import time
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .._utils import (
    MAX_SEED,
    check_adata,
    check_key_added,
    check_library_key,
    check_outputs,
    embed_record_key,
    h5ad_safe,
    is_whole_number,
    recorded_param,
    recorded_spatial_key,
    resolve_library_key,
    seed_number,
    serialized_rows,
    user_stacklevel,
    warn_pooled_slices,
    whole_number,
)
from ..pp._serialize import identical_positions, library_layouts

__all__ = ["choose_n_clusters", "cluster", "refine_labels"]

Method = Literal["gmm", "kmeans", "leiden"]
#: clusterings are fitted on at most this many spots (a seeded random subset) and then predicted for all
MAX_FIT_SPOTS = 50_000
#: random restarts of the final GMM fit (the best likelihood is kept). The tied GMM on DLPFC embeddings has many
#: local optima. With 10 restarts, the same DLPFC embedding clustered with 5 ``random_state``s gave ARIs 0.054 apart
#: on average (9 embeddings of the defaults of 2026-12-02), with 30 0.027 (4 of the 9 within 0.003), and a higher mean
#: ARI (``benchmarks/gmm_restarts.py``, ``docs/spatial_log.md``)
GMM_RESTARTS = 30
#: EM of each GMM restart stops when the mean log-likelihood per spot rises by less than this (scikit-learn's default).
#: That can be short of convergence: on the default embeddings of 2026-12-04 of 151673 and 151510 (seed 0) the best of
#: 30 restarts is the converged optimum all the same, on 151674 (seed 0) it is not. mclust, whose EEE model the tied GMM
#: imitates, stops at a relative change of 1e-5. ``tol=1e-6`` (:func:`cluster`) runs EM to convergence; measured, not
#: adopted as the default: higher on DLPFC, lower on the HER2+ sections (``docs/spatial_log.md``, "EM run to convergence
#: in the clustering").
GMM_TOL = 1e-3
#: cap on EM iterations per restart, high enough never to bind (at most 226 were needed at ``tol=1e-8`` on DLPFC
#: embeddings of 2026-12-04)
GMM_MAX_ITER = 10_000
#: the GMM's covariance regularisation (added to its diagonal), as a share of the mean variance per dimension of what
#: is clustered, so that the domains do not depend on the embedding's units. It was 1e-4 absolute until 2026-12-06:
#: then an embedding divided by 10 lost 0.13 ARI (audit s46). On the default embeddings (mean variance about 0.095 per
#: component) 1e-3 gives about the old value: labels identical on 20 of 21 embeddings (DLPFC and HER2+ sections, seeds
#: 0-2), the 21st +0.0005; the neighbour-mean baseline (variance about 4.3) +0.0006 ARI, SE 0.0004
#: (docs/spatial_log.md, "The GMM's regularisation relative to the data; the refinement's rule")
GMM_REG_COVAR = 1e-3
#: restarts of the k-means fit
KMEANS_RESTARTS = 10
#: restarts of each candidate fit when the number of clusters is chosen by BIC (14 fits; cheaper)
BIC_RESTARTS = 3
#: below this depth of the knee (the chosen point under the chord of the [0, 1]-scaled BIC curve) the choice of K
#: is reported as weak: on the default embeddings (seeds 0-2) the DLPFC curves' knees lay 0.19-0.29 deep (K 6-9 for
#: 7 layers), the HER2+ sections' 0.05-0.15 (K 5-12 for 3-5 regions; docs/spatial.md, "Choosing K"; remeasured in
#: docs/spatial_log.md, "The clustering's settings on the current embeddings"); with the graph of 2026-12-06 still no
#: DLPFC curve and most HER2+ curves below it (docs/spatial.md, "Current defaults")
WEAK_KNEE = 0.15
#: a domain with at least this share of its spots in one library, once the libraries are weighted equally, is reported
#: as found in that library only. Measured (docs/spatial_log.md, "Several slices together"): on two adjacent sections of
#: one donor (DLPFC 151673 + 151674, seeds 0-4) every domain's share lay at 0.50-0.57; on sections of two donors on
#: the genes they share (151673 or 151674 with 151510, seeds 0-2) one to six of the seven domains per run lay above it
LIBRARY_SPECIFIC = 0.95
#: libraries with fewer spots than this per domain are left out of that report: a domain's fraction of a handful of
#: spots says nothing (one spot is 100 % of its library)
MIN_SPOTS_PER_DOMAIN = 10
#: seconds of fitting before a progress bar appears. On the bundled 151673 slice (3,639 spots, one core, 2026-12-06)
#: tl.cluster took 2.2-2.5 s with 7 domains and 6.2-7.2 s choosing K (the bars show briefly there); the fit subset of a
#: large tissue (50,000 spots) takes many times that
PROGRESS_DELAY = 2.0


def _prepare(rep: np.ndarray, n_comps: int | None, fit_rows: np.ndarray, random_state: int) -> np.ndarray:
    # Centred, not standardised: scaling every dimension to unit variance lifts the low-variance directions to the
    # level of the leading ones. On the default embeddings (seeds 0-2, 2026-12-06) standardising lowered the HER2+
    # sections by 0.029 (paired SE 0.024, 12 pairs) and DLPFC by 0.003 (SE 0.010, 9 pairs; docs/spatial_log.md, "The
    # clustering's settings, again on the current embeddings").
    rep = np.array(rep, dtype=np.float64)  # the one float64 copy, centred in place
    rep -= rep[fit_rows].mean(axis=0)
    if n_comps is not None and n_comps < min(rep.shape):
        rep = PCA(n_comps, random_state=random_state).fit(rep[fit_rows]).transform(rep)
    return rep


def _fit_rows(n: int, random_state: int) -> np.ndarray:
    """All rows, or a seeded random subset of ``MAX_FIT_SPOTS`` rows on large data."""
    if n <= MAX_FIT_SPOTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(random_state).choice(n, MAX_FIT_SPOTS, replace=False))


def _one_thread() -> threadpool_limits:
    """A context in which BLAS and OpenMP run on one thread, for the clustering fits.

    The clustering fits are small matrix products, for which threads cost more than they give (measured on a 2-core
    machine, 2026-12-02: 30 GMM restarts on 3,639 spots 8.5 s with two threads, 1.5 s with one; 3 restarts on 51,000
    spots 5.3 s against 2.4 s).
    """
    return threadpool_limits(1)


def _gmm(
    rep: np.ndarray,
    k: int,
    random_state: int | None,
    n_init: int = GMM_RESTARTS,
    tol: float = GMM_TOL,
    bar: tqdm | None = None,
) -> GaussianMixture:
    """The best of ``n_init`` restarts of a tied-covariance GMM, on one thread.

    Tied: one covariance shared by all components, mclust's EEE model, as used by STAGATE and GraphST; its
    diagonal regularised by ``GMM_REG_COVAR`` times ``rep``'s mean variance per dimension (so the fit does not depend
    on ``rep``'s units).

    The restarts run one at a time so that ``bar`` can count them; they draw their starts in turn from one random
    stream and the first of the highest likelihood bound is kept, as scikit-learn's ``n_init`` does, so the fit is the
    one ``GaussianMixture(n_init=n_init)`` returns (tested).
    """
    stream = check_random_state(random_state)
    reg_covar = GMM_REG_COVAR * float(rep.var(axis=0).mean()) or GMM_REG_COVAR  # (a constant rep: any > 0)
    best = None
    with warnings.catch_warnings(), _one_thread():  # (entered once, not per restart)
        # scikit-learn warns when the restart it keeps did not converge; one restart at a time, warn for the kept one
        warnings.filterwarnings("ignore", message="Best performing initialization", category=ConvergenceWarning)
        for _ in range(n_init):
            gmm = GaussianMixture(
                k,
                covariance_type="tied",
                reg_covar=reg_covar,
                tol=tol,
                max_iter=GMM_MAX_ITER,
                random_state=stream,
            )
            gmm.fit(rep)
            if best is None or gmm.lower_bound_ > best.lower_bound_:
                best = gmm
            if bar is not None:
                bar.update()
    if not best.converged_:
        warnings.warn(
            f"The GMM with {k} components did not converge in {GMM_MAX_ITER} EM iterations.",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
    return best


def _progress_bar(total: int, description: str, progress: bool) -> tqdm:
    """A bar over ``total`` GMM fits that appears after ``PROGRESS_DELAY`` seconds and is removed when done."""
    return tqdm(
        total=total, desc=f"dfm.tl.cluster: {description}", disable=not progress, delay=PROGRESS_DELAY, leave=False
    )


def library_specific_domains(labels: np.ndarray, libraries: np.ndarray) -> dict[str, str]:
    """Domains found (almost) only in one library: ``{domain: library}``.

    A domain's share in a library is its fraction of that library's spots, divided by the sum of those fractions
    over the libraries (so a library with more spots does not weigh more); a domain is library-specific when one
    share reaches ``LIBRARY_SPECIFIC``. Libraries with fewer than ``MIN_SPOTS_PER_DOMAIN`` spots per domain are left
    out. Labels and libraries are compared as strings. Works on arrays, not on an AnnData: :func:`cluster` runs it
    with ``library_key`` and stores the result in ``uns[key_added]['library_specific']``.

    Parameters
    ----------
    labels
        One domain label per spot (integers, strings or a categorical).
    libraries
        The library of each spot, in the same order (e.g. ``adata.obs[library_key].to_numpy()``).

    Returns
    -------
    ``{domain: library}`` for every library-specific domain, both as strings; empty when there is none, or fewer
    than two libraries are left with at least ``MIN_SPOTS_PER_DOMAIN`` (10) spots per domain.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.tl import library_specific_domains
    >>> labels = np.array(["0"] * 30 + ["1"] * 30 + ["0"] * 30 + ["2"] * 30)
    >>> libraries = np.repeat(["a", "b"], 60)  # domain "0" in both libraries, "1" only in "a", "2" only in "b"
    >>> library_specific_domains(labels, libraries)
    {'1': 'a', '2': 'b'}
    """
    table = pd.crosstab(pd.Series(labels).astype(str), pd.Series(libraries).astype(str))
    table = table.loc[:, table.sum(axis=0) >= MIN_SPOTS_PER_DOMAIN * table.shape[0]]
    table = table.loc[table.sum(axis=1) > 0]
    if table.shape[1] < 2:
        return {}
    rates = table / table.sum(axis=0)  # a domain's fraction of each library's spots
    shares = rates.div(rates.sum(axis=1), axis=0)
    main = shares.idxmax(axis=1)
    return {d: str(main[d]) for d in shares.index if shares.loc[d, main[d]] >= LIBRARY_SPECIFIC}


def choose_n_clusters(
    rep: np.ndarray,
    *,
    k_range: range = range(2, 16),
    random_state: int | None = 0,
    tol: float = GMM_TOL,
    progress: bool = True,
) -> tuple[int, dict, float]:
    """Pick the number of domains at the knee of the BIC curve of a tied-covariance GMM.

    On spatial embeddings the BIC keeps falling as K grows (the tissue's gradients fill with ever more overlapping
    Gaussians), so its minimum over-splits: on the default embeddings of 2026-12-05 of the DLPFC slices and HER2+
    sections (3 seeds each) it lay at K = 14 or 15 of 2–15, against 7 and 3–5 annotated domains. The knee is where the
    curve stops falling steeply: with K and BIC scaled to [0, 1] over ``k_range``, the K furthest below the straight
    line from the first to the last point (the "kneedle" rule of Satopää et al., 2011), among the K up to the one of the
    lowest BIC (a curve that rises from the first K gives that K, with depth 0: a weak choice). It depends on the range
    searched.
    Measured on the default embeddings (``docs/spatial.md``, "Current defaults", seeds 0–2): K = 6–9 on DLPFC, 6–14
    on the HER2+ sections. Works on an array, not on an AnnData: :func:`cluster` with ``n_clusters=None`` (``"gmm"`` or
    ``"kmeans"``) runs it on the embedding it clusters (centred, reduced to ``n_comps`` principal components) and
    records the curve in ``uns[key_added]``.

    Parameters
    ----------
    rep
        (n_spots, n_dims) embedding to cluster, used as given (no centring, scaling or PCA here).
    k_range
        The numbers of clusters tried (2 to 15). Those above the number of spots are skipped; a ``ValueError`` when
        none is left.
    random_state
        Seed of the GMM fits (``BIC_RESTARTS``, 3, restarts per K): a whole number from 0 to 2**32 - 1, or ``None``.
    tol
        EM of each fit stops when the mean log-likelihood per spot rises by less than this, as in :func:`cluster`.
    progress
        Show a progress bar over the fits when they take more than ``PROGRESS_DELAY`` (2) seconds.

    Returns
    -------
    ``(k, {k: bic}, depth)``: ``depth`` is how far the knee lies below that line (0 for a straight or flat curve, or
    fewer than three K, where ``k`` is the K of the lowest BIC); a shallow knee (below ``WEAK_KNEE``, 0.15) is a weak
    choice.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.tl import choose_n_clusters
    >>> rng = np.random.default_rng(0)
    >>> centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]])
    >>> rep = np.repeat(centres, 50, axis=0) + rng.normal(size=(200, 2))  # four well-separated blobs
    >>> k, bic, depth = choose_n_clusters(rep, k_range=range(2, 9))
    >>> k, sorted(bic), round(depth, 1)
    (4, [2, 3, 4, 5, 6, 7, 8], 0.7)
    """
    if random_state is not None:
        random_state = seed_number(random_state, "random_state (a seed; None for a fresh one)")
    within = [k for k in k_range if k <= rep.shape[0]]
    if not within:
        raise ValueError(f"Every K of k_range={k_range!r} exceeds the {rep.shape[0]} spots; give a lower k_range.")
    k_range = within
    with _progress_bar(len(k_range) * BIC_RESTARTS, "choosing K", progress) as bar:
        bic = {k: float(_gmm(rep, k, random_state, BIC_RESTARTS, tol, bar).bic(rep)) for k in k_range}
    ks = np.array(list(bic), dtype=np.float64)
    values = np.array(list(bic.values()))
    spread = values.max() - values.min()
    if len(ks) < 3 or spread == 0:
        return int(ks[np.argmin(values)]), bic, 0.0
    x = (ks - ks[0]) / (ks[-1] - ks[0])
    y = (values - values.min()) / spread
    below_chord = y[0] + (y[-1] - y[0]) * x - y
    # never beyond the BIC's minimum: on a curve that rises from the first K (as few domains as that, or noise) the
    # distances below the chord are noise, and a K where the BIC has turned up again is no knee
    best = int(np.argmax(below_chord[: int(np.argmin(values)) + 1]))
    return int(ks[best]), bic, max(float(below_chord[best]), 0.0)


def _leiden(rep: np.ndarray, n_clusters: int | None, random_state: int) -> tuple[np.ndarray, float]:
    """Leiden on a 15-NN graph of ``rep``; with ``n_clusters`` the resolution is bisected to give that many."""
    import scanpy as sc

    tmp = AnnData(obsm={"X_rep": rep.astype(np.float32)}, shape=(rep.shape[0], 0))
    # exact neighbours (scikit-learn) at every size: scanpy's approximate ones (pynndescent, from about 4,000 spots)
    # depend on its versions, and scanpy 1.11 with scipy 1.17 fails on them from about 10,000 spots
    sc.pp.neighbors(tmp, use_rep="X_rep", n_neighbors=15, random_state=random_state, transformer="sklearn")

    def run(res: float) -> np.ndarray:
        sc.tl.leiden(tmp, resolution=res, random_state=random_state, flavor="igraph", n_iterations=2, directed=False)
        return tmp.obs["leiden"].cat.codes.to_numpy()

    if n_clusters is None:
        return run(1.0), 1.0
    lo, hi = 0.01, 5.0
    labels, res = run(1.0), 1.0
    for _ in range(30):  # bisection on the resolution
        n = labels.max() + 1
        if n == n_clusters:
            break
        lo, hi = (res, hi) if n < n_clusters else (lo, res)
        res = 0.5 * (lo + hi)
        labels = run(res)
    if labels.max() + 1 != n_clusters:
        warnings.warn(
            f"Leiden found {labels.max() + 1} clusters at best (asked for {n_clusters}), resolution {res:.3g}.",
            stacklevel=user_stacklevel(),
        )
    return labels, res


def refine_labels(labels: np.ndarray, graph: sp.spmatrix) -> np.ndarray:
    """Majority vote on the spatial graph.

    A spot takes the most common label among its neighbours when more than half of them disagree with its own label and
    that label is the only one with the most votes (which gives it more votes than the spot's own); a spot needs at
    least two neighbours (on a sparse graph, any number of neighbours per spot; a spot with one keeps its label). All
    spots vote at once, on the labels given; ties change nothing. Until 2026-12-06 a spot switched whenever more than
    half of its neighbours disagreed, also to a label with no more votes than its own, a tie going to the first label in
    sorted order (audit s46). SpaGCN (Hu et al., 2021) asks more, a new label held by more than half of the neighbours:
    measured on 21 default embeddings (DLPFC and HER2+ sections, seeds 0-2, K of the annotation), that left the domains
    about as patchy as no refinement (PAS 0.0254 against 0.0256 unrefined, 0.0233 with the old rule and 0.0230 with this
    one) at about the same ARI (0.3698, 0.3680, 0.3686; ``docs/spatial_log.md``, "The GMM's regularisation relative to
    the data; the refinement's rule").
    :func:`cluster` runs it on each library's grid graph (``refine=True``).

    Parameters
    ----------
    labels
        One label per spot: integers, strings or a categorical, with no missing value.
    graph
        Sparse (n_spots, n_spots) spatial neighbour graph, e.g. ``adata.obsp['spatial_connectivities']`` from
        squidpy's ``sq.gr.spatial_neighbors``. Any stored entry off the diagonal makes two spots neighbours (weights
        and the diagonal are ignored).

    Returns
    -------
    The refined labels, as a NumPy array of the labels' values.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.sparse as sp
    >>> from dfmamba_st.tl import refine_labels
    >>> row = sp.csr_matrix(np.eye(5, k=1) + np.eye(5, k=-1))  # five spots in a row
    >>> refine_labels(np.array(["a", "a", "b", "a", "a"]), row).tolist()  # the lone "b" joins its neighbours
    ['a', 'a', 'a', 'a', 'a']
    >>> refine_labels(np.array(["a", "a", "b", "c", "c"]), row).tolist()  # a tie: "b" stays
    ['a', 'a', 'b', 'c', 'c']
    """
    values = np.asarray(labels)
    if values.ndim != 1:
        raise ValueError(f"labels must be one label per spot (1-D), got shape {values.shape}.")
    if pd.isna(values).any():
        raise ValueError("labels hold missing values: refine the labelled spots only (select or fill them first).")
    if not sp.issparse(graph) or graph.shape != (values.size, values.size):
        raise ValueError(
            f"graph must be a sparse ({values.size}, {values.size}) matrix, one row and column per label; "
            f"got {type(graph).__name__} of shape {getattr(graph, 'shape', None)}."
        )
    kinds, codes = np.unique(values, return_inverse=True)
    adjacency = sp.csr_matrix(graph, copy=True)
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    adjacency.data[:] = 1.0
    onehot = sp.csr_matrix((np.ones(codes.size), (np.arange(codes.size), codes)), shape=(codes.size, kinds.size))
    votes = (adjacency @ onehot).toarray()
    n_neighbours = votes.sum(axis=1)
    own = votes[np.arange(codes.size), codes]
    out = codes.copy()
    top = votes.max(axis=1)
    # one label has the most votes (when it is the spot's own, taking it changes nothing: so it has more than the own)
    sole = (votes == top[:, None]).sum(axis=1) == 1
    # (a spot with one neighbour keeps its label: two spots that are each other's only neighbour would swap labels;
    # on the spatial graphs of tl.cluster every spot of a library of seven or more positions has six or more)
    switch = (n_neighbours - own > 0.5 * n_neighbours) & sole & (n_neighbours >= 2)
    out[switch] = votes[switch].argmax(axis=1)
    return kinds[out]


def cluster(
    adata: AnnData,
    n_clusters: int | None = None,
    *,
    method: Method = "gmm",
    use_rep: str = "X_dfm",
    n_comps: int | None = 20,
    n_init: int | None = None,
    tol: float = GMM_TOL,
    k_range: range = range(2, 16),
    refine: bool = True,
    library_key: str | None = None,
    key_added: str = "dfm_domain",
    random_state: int | None = 0,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Cluster the spot embedding into spatial domains.

    Parameters
    ----------
    adata
        Annotated data with an embedding in ``obsm[use_rep]`` (from :func:`dfmamba_st.tl.embed`).
    n_clusters
        Number of domains. ``None`` chooses it: for ``"gmm"``/``"kmeans"`` the K in ``k_range`` at the knee of
        the tied-GMM BIC curve (:func:`choose_n_clusters`; a warning when the knee is shallow, the choice weak),
        for ``"leiden"`` resolution 1.
    method
        ``"gmm"`` (Gaussian mixture with one shared covariance, like mclust's EEE; no R needed), ``"kmeans"`` or
        ``"leiden"`` (resolution searched by bisection to give ``n_clusters``).
    use_rep
        Embedding in ``obsm``.
    n_comps
        Centre the embedding and keep this many principal components before clustering (``None``: all). On the
        default embeddings (seeds 0-2, 2026-12-06) the mean ARI was flat within noise over 10-40 components (3 DLPFC
        slices: 0.557-0.571; 4 HER2+ sections: 0.197-0.242) and lower with all of them (0.496, 0.199); 20 is in
        that range.
    n_init
        Random restarts of the GMM or k-means fit; the best (highest likelihood, lowest inertia) is kept.
        ``None``: ``GMM_RESTARTS`` (30) for ``"gmm"``, 10 for ``"kmeans"``. Not used by ``"leiden"``.
    tol
        EM of each GMM restart stops when the mean log-likelihood per spot rises by less than ``tol``: the fit of
        ``"gmm"``, and the BIC fits that choose K when ``n_clusters=None`` (``"gmm"`` and ``"kmeans"``). The
        default (scikit-learn's, ``1e-3``) can stop EM before convergence; ``1e-6`` runs it to convergence on DLPFC
        embeddings (2-5 times the iterations). Measured on DLPFC and HER2+ sections in ``docs/spatial_log.md`` ("EM
        run to convergence in the clustering").
    k_range
        The numbers of domains ``n_clusters=None`` chooses from (2 to 15). The knee depends on the range: widen it
        for tissues with more domains than 15.
    refine
        Smooth the labels by a majority vote over each spot's neighbours on a sparse graph (:func:`refine_labels`):
        its six nearest spots (more where several lie at the sixth distance), and the spots that count it among
        theirs (inside a Visium tissue the six touching spots; at its edges up to about twelve). The positions are
        read before the fit (an error there says ``refine=False`` needs none); a warning says when the vote empties
        a domain, which is then left out of the categories.
    library_key
        Column of ``obs`` naming slices (the refinement graph never links two slices). The domains are shared: one
        mixture over the spots of every slice (on two adjacent DLPFC sections more accurate than one slice at a time;
        across donors the domains split by slice, reported by a warning). By default the key recorded by the
        :func:`~dfmamba_st.tl.embed` run that wrote ``use_rep``, or else by :func:`~dfmamba_st.pp.serialize`; the
        refinement uses the coordinates they recorded too.
    key_added
        ``obs`` column for the domains (and ``uns`` key of the record); not ``"dfm"``, the embedding's record. An
        ``obs`` column or ``uns`` entry of that name that :func:`cluster` did not write (truth labels, another
        tool's result) is not overwritten: an error asks for another name. A non-empty name without ``/``.
    random_state
        Seed of the clustering: a whole number from 0 to 2**32 - 1, or ``None`` for a fresh one each call, drawn from
        the operating system's entropy (``np.random.seed`` does not set it) and recorded in
        ``uns[key_added]['params']['random_state']`` so that the call can be repeated (not a
        :class:`numpy.random.RandomState`, which the record could not store).
    progress
        Show a progress bar over the GMM fits (the restarts, and the fits that choose K) when they take more than
        ``PROGRESS_DELAY`` (2) seconds: on a slice of a few thousand spots they rarely do, on 50,000 (a large tissue's
        fit subset) they take minutes.
    copy
        Work on a copy and return it.

    Returns
    -------
    ``None`` or the copy. Sets ``adata.obs[key_added]`` (categorical, categories ``'0'``, ``'1'``, ... numbered by
    decreasing size; fewer than ``n_clusters`` when the refinement empties a domain, with a warning) and
    ``adata.uns[key_added]['params']`` (the options, resolved: ``n_clusters`` as given or chosen, also when the
    refinement left fewer domains, ``n_init`` the number of restarts run; and ``['bic']``, ``['k_range']``,
    ``['knee']`` when K was chosen; for ``"leiden"`` ``['resolution']``, the resolution found; for ``"gmm"``
    ``['log_likelihood']``, the mean log-likelihood per spot of the fit kept, on the spots it was fitted on; with
    ``library_key``, ``['library_specific']``: the domains found almost only in one library, ``{domain: library}``,
    with a warning when there are any, see :func:`library_specific_domains`).

    Notes
    -----
    On more than ``MAX_FIT_SPOTS`` (50,000) spots the PCA, the choice of K and the clustering are fitted on a
    seeded random subset of that size and then applied to every spot (GMM/k-means predict, Leiden labels the rest
    by a 15-nearest-neighbour vote), so time and memory grow linearly.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> dfm.tl.embed(adata, epochs=1, progress=False)
    >>> dfm.tl.cluster(adata, n_clusters=7)
    >>> adata.obs["dfm_domain"].cat.categories.size
    7
    """
    start = time.time()
    check_adata(adata, min_spots=2, caller="dfm.tl.cluster")
    check_key_added(key_added, "dfm.tl.cluster")
    check_outputs(adata, "dfm.tl.cluster", key_added, key_added, obs=(key_added,))
    if not isinstance(use_rep, str):
        raise TypeError(f"use_rep must name one obsm entry (a str), got {use_rep!r}; available: {list(adata.obsm)}.")
    record = embed_record_key(use_rep)
    order_key = recorded_param(adata, record, "order_key") or "dfm_order"
    library_key = resolve_library_key(adata, library_key, record, order_key)
    check_library_key(adata, library_key)
    if use_rep not in adata.obsm:
        raise KeyError(
            f"obsm[{use_rep!r}] not found: run dfm.tl.embed(adata) first (or pass use_rep= an existing embedding; "
            f"available: {list(adata.obsm)})."
        )
    if method not in ("gmm", "kmeans", "leiden"):
        raise ValueError(f"Unknown method {method!r}; use 'gmm', 'kmeans' or 'leiden'.")
    if n_clusters is not None:
        if not is_whole_number(n_clusters, 1) or n_clusters > adata.n_obs:
            raise ValueError(
                f"n_clusters must be a whole number between 1 and n_obs={adata.n_obs} (or None), got {n_clusters!r}."
            )
        n_clusters = int(n_clusters)
    if random_state is None:  # a fresh seed, drawn here so that the record can repeat the call
        random_state = int(np.random.default_rng().integers(MAX_SEED, endpoint=True))
    random_state = seed_number(random_state, "random_state (a seed; None for a fresh one)")
    if n_init is not None and not is_whole_number(n_init, 1):
        raise ValueError(f"n_init must be a positive whole number, got {n_init}.")
    if n_comps is not None:
        n_comps = whole_number(n_comps, "n_comps (None: every dimension of use_rep)")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}.")
    if not isinstance(k_range, range) or len(k_range) == 0 or k_range.start < 1 or k_range.step < 1:
        raise ValueError(f"k_range must be a non-empty increasing range of numbers of domains ≥ 1, got {k_range!r}.")
    if n_init is None:
        n_init = GMM_RESTARTS if method == "gmm" else KMEANS_RESTARTS
    n_init = int(n_init)
    rep = adata.obsm[use_rep]
    rep = rep.toarray() if sp.issparse(rep) else np.asarray(rep)  # no float64 copy of a float32 embedding
    if not np.all(np.isfinite(rep)):
        raise ValueError(f"obsm[{use_rep!r}] contains NaN or inf; re-run dfm.tl.embed.")
    # the coordinates the spots were serialized on (recorded, and used by metrics.evaluate's spatial scores); read
    # before the fit, so that positions the smoothing cannot use stop the call before any work
    spatial_key = recorded_spatial_key(adata, record, order_key)
    layouts = _smoothing_layouts(adata, library_key, spatial_key) if refine else []
    # the restarts' starts depend on the order of the rows: fit in the order of the curve (or of the spots' names),
    # not of the AnnData
    rows = serialized_rows(adata, order_key, library_key)
    fit_rows = _fit_rows(rows.size, random_state)  # positions along that order
    # centred and projected in the AnnData's order, fitted on the same rows in the same order as on a reordered copy
    # (the numbers are the same), then reordered: a reordered copy of the whole embedding took another N x d array
    # (+0.42 GB on a million spots)
    rep = _prepare(rep, n_comps, rows[fit_rows], random_state)[rows]
    sample = rep[fit_rows]

    extra: dict = {}
    if method == "leiden":
        sample_labels, extra["resolution"] = _leiden(sample, n_clusters, random_state)
        labels = _extend_labels(sample, sample_labels, rep, fit_rows)
    else:
        if n_clusters is None:
            n_clusters, bic, knee = choose_n_clusters(
                sample, k_range=k_range, random_state=random_state, tol=tol, progress=progress
            )
            extra.update(bic={str(k): v for k, v in bic.items()}, k_range=list(k_range), knee=knee)
            logg.info(f"    chose n_clusters={n_clusters} at the knee of the BIC curve of a tied-covariance GMM")
            if knee < WEAK_KNEE:
                warnings.warn(
                    f"n_clusters=None chose {n_clusters} domains, but the BIC curve has no clear knee (the choice lies "
                    f"{knee:.2f} below the chord, under {WEAK_KNEE}): the number of domains is uncertain. Draw the "
                    f"curve with dfm.pl.bic(adata, key={key_added!r}) and pass n_clusters= if you know it.",
                    stacklevel=user_stacklevel(),
                )
        if method == "gmm":
            with _progress_bar(n_init, f"{n_init} GMM restarts", progress) as bar:
                gmm = _gmm(sample, n_clusters, random_state, n_init, tol, bar)
            extra["log_likelihood"] = float(gmm.score(sample))
            labels = gmm.predict(rep)
        else:
            kmeans = KMeans(n_clusters, n_init=n_init, random_state=random_state)
            with _one_thread():
                kmeans.fit(sample)
            labels = kmeans.predict(rep)
    labels = _relabel(labels)[np.argsort(rows)]  # back in the AnnData's order
    n_found = int(labels.max()) + 1
    if method != "leiden" and n_found < n_clusters:  # (Leiden says so itself)
        warnings.warn(
            f"Asked for {n_clusters} domains, the {method} assigned spots to {n_found} only: obsm[{use_rep!r}] may "
            "vary too little to tell more apart (is it the embedding?).",
            stacklevel=user_stacklevel(),
        )
    if refine:
        refined = labels.copy()
        for layout in layouts:
            refined[layout.idx] = refine_labels(labels[layout.idx], layout.graph())
        labels = _relabel(refined)  # numbered by size again
        n_kept = int(labels.max()) + 1
        if n_kept < n_found:
            # left out, not kept as empty categories: scanpy's group-wise tools (rank_genes_groups, dendrogram, ...)
            # fail on a category without spots (audit s46)
            warnings.warn(
                f"Smoothing the labels (refine=True) emptied {n_found - n_kept} of {n_found} domains, which are left "
                f"out ({n_kept} domain{'s' if n_kept > 1 else ''} left): they held too few spots, each surrounded by "
                "other domains. refine=False keeps them.",
                stacklevel=user_stacklevel(),
            )
            n_found = n_kept

    if library_key is not None:
        extra["library_specific"] = library_specific_domains(labels, adata.obs[library_key].to_numpy())
        if extra["library_specific"]:
            found = ", ".join(f"{d} in {lib!r}" for d, lib in extra["library_specific"].items())
            warnings.warn(
                f"{len(extra['library_specific'])} of {n_found} domains lie almost only in one library ({found}: "
                f"at least {LIBRARY_SPECIFIC:.0%} of their spots, the libraries weighted equally). A region present in "
                "one section only gives such a domain; so does a batch effect between libraries (other donors, gene "
                "panels or protocols), which dfmamba_st does not correct. If the sections are of one tissue, look at "
                "the domains with dfm.pl.domains, and cluster each library on its own or correct the batch first.",
                stacklevel=user_stacklevel(),
            )

    adata = adata.copy() if copy else adata
    categories = [str(i) for i in range(n_found)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=categories)
    adata.uns[key_added] = {
        "params": h5ad_safe(
            {
                "n_clusters": n_clusters if n_clusters is not None else n_found,
                "method": method,
                "use_rep": use_rep,
                "n_comps": n_comps,
                "n_init": None if method == "leiden" else n_init,
                "tol": tol if method == "gmm" or "bic" in extra else None,  # whenever a GMM was fitted
                "refine": refine,
                "library_key": library_key,
                "spatial_key": spatial_key,
                "random_state": random_state,
            }
        ),
        **extra,
    }
    logg.info(f"    finished dfm.tl.cluster: {n_found} domains ({time.time() - start:.1f}s)")
    return adata if copy else None


def _smoothing_layouts(adata: AnnData, library_key: str | None, spatial_key: str) -> list:
    """The libraries' layouts whose neighbour graphs smooth the labels; errors say that ``refine=False`` needs none.

    Warns, as the other steps do, about slices pooled without a library key (their labels would be smoothed over
    the other slice's spots at the same positions).
    """
    try:
        layouts = library_layouts(adata, library_key=library_key, spatial_key=spatial_key)
    except (KeyError, ValueError) as err:
        raise type(err)(
            f"{err.args[0]} dfm.tl.cluster reads the spots' positions to smooth the labels (refine=True); "
            "refine=False clusters without them."
        ) from err
    warn_pooled_slices(
        adata,
        identical_positions(layouts),
        library_key,
        caller="dfm.tl.cluster",
        shared="their labels are smoothed over one another's neighbours",
        unnamed="their labels smoothed across slices",
    )
    return layouts


def _extend_labels(sample: np.ndarray, sample_labels: np.ndarray, rep: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Labels of all spots: the sample's own, the rest by a 15-nearest-neighbour vote among the sample."""
    if fit_rows.size == rep.shape[0]:
        return sample_labels
    from sklearn.neighbors import KNeighborsClassifier

    labels = KNeighborsClassifier(15).fit(sample, sample_labels).predict(rep)
    labels[fit_rows] = sample_labels
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive integer labels 0..K-1, numbered by decreasing cluster size (deterministic)."""
    uniq, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[np.lexsort((uniq, -counts))] = np.arange(uniq.size)
    return rank[inverse.ravel()]
