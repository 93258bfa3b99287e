"""What ``tl.embed`` computes, checked against its definitions written out: the gene ranking, the standardisation and
principal axes, the spatial graph, the tokens and the readout, the training masks, the record. Real data: crops of the
bundled DLPFC 151673 slice."""

import copy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from _shared import QUICK, crop
from sklearn.decomposition import PCA

import dfmamba_st as dfm
from dfmamba_st.tl import _embed, _features, _model
from dfmamba_st.tl._features import FeatureTransform, expression_matrix, gene_ranks, spatial_graph


@pytest.fixture(scope="module")
def trained(bundled):
    adata = crop(bundled, rows=(0, 20), cols=(0, 60))
    dfm.pp.serialize(adata)
    model = dfm.tl.embed(adata, return_model=True, **QUICK)
    return adata, model


def _fit(adata, **options):
    return FeatureTransform.fit(adata, **{"layer": None, "n_top_genes": 300, "n_pcs": None, "seed": 0, **options})


#: (array_row, array_col) offsets on the Visium grid: the six touching spots, and the six of the next ring (√3 spacings)
TOUCHING = [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)]
SQRT3_RING = [(-2, 0), (2, 0), (-1, -3), (-1, 3), (1, -3), (1, 3)]


def _centred_unit_variance(block):
    block = block - block.mean(axis=0)
    return block / np.sqrt((block**2).sum(axis=1).mean())


# --- features -----------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*raw counts cannot be recovered:UserWarning")  # the test's input is such values
def test_log_normalised_input_is_ranked_by_seurat_dispersions(top):
    sc.pp.normalize_total(top)
    sc.pp.log1p(top)
    top.X.data = np.round(top.X.data, 2)  # the counts cannot be recovered: used as log-normalised values
    X, is_counts, _ = expression_matrix(top, None)
    assert not is_counts
    ranks = gene_ranks(X, top.var_names, is_counts)
    scanpy = sc.pp.highly_variable_genes(top, flavor="seurat", n_top_genes=300, inplace=False)
    expected = set(top.var_names[scanpy["highly_variable"].to_numpy()])
    assert len(expected & set(top.var_names[ranks.to_numpy() < 300])) >= 298


def test_genes_of_equal_score_are_ranked_by_name_whatever_their_order(top):
    X, is_counts, _ = expression_matrix(top, None)
    twin = 5  # the counts of gene 5 again, under a name that sorts first, at the end
    X = sp.hstack([X, X[:, twin]], format="csr")
    names = pd.Index([*top.var_names, "0-twin"])
    ranks = gene_ranks(X, names, is_counts)
    assert ranks["0-twin"] + 1 == ranks[names[twin]]


def test_scores_equal_in_float32_tie_and_are_then_ranked_by_name(monkeypatch):
    """Scores a last bit apart in float64 (as on another CPU) are one score: the names decide, on every machine."""
    genes = pd.Index(["b", "a", "c"])
    scores = pd.Series([1.0 + 1e-12, 1.0, 0.5], index=genes)
    monkeypatch.setattr(_features, "_variance_scores", lambda X, var_names: scores)
    ranks = gene_ranks(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), genes, True)
    assert ranks.to_dict() == {"b": 1, "a": 0, "c": 2}


@pytest.mark.parametrize("n_genes", [20, 50])
def test_counts_of_a_small_panel_are_recovered_up_to_each_spots_common_factor(bundled, n_genes):
    """On a small panel few spots have a gene counted once; their counts over their smallest are then fractions
    (counts 2 and 3: 1 and 1.5), made whole by the smallest multiplier. Only a factor all counts of a spot share
    (a single gene, or 2 and 4) is lost: every spot comes back as its counts over their greatest common divisor."""
    genes = np.random.default_rng(0).choice(bundled.n_vars, n_genes, replace=False)
    panel = bundled[:, genes].copy()
    panel = panel[np.asarray(panel.X.sum(axis=1)).ravel() > 0].copy()
    truth = sp.csr_matrix(panel.X).toarray().astype(np.int64)
    sc.pp.normalize_total(panel)
    sc.pp.log1p(panel)
    got = _features.recovered_counts(sp.csr_matrix(panel.X))
    assert got is not None  # refused before: a spot without a gene counted once gave fractions
    common = np.gcd.reduce(truth, axis=1)[:, None]
    np.testing.assert_array_equal(got.toarray(), truth // common)
    assert (common == 1).mean() > 0.8  # most spots exactly
    toy = ad.AnnData(sp.csr_matrix(np.array([[2, 3, 0], [0, 2, 0], [0, 5, 15]], dtype=np.float32)))
    sc.pp.normalize_total(toy)
    sc.pp.log1p(toy)
    assert _features.recovered_counts(toy.X).toarray().tolist() == [[2, 3, 0], [0, 1, 0], [0, 1, 3]]


@pytest.mark.parametrize(
    "kind",
    [
        "counts",
        "counts with stored zeros",
        "log-normalised counts",
        "rounded log values",
        "rounded log values, unsorted indices",
        "rounded log values, duplicate entries",
    ],
)
@pytest.mark.filterwarnings("ignore:.*raw counts cannot be recovered:UserWarning")
def test_embed_and_coarsen_leave_the_callers_expression_matrix_as_it_was(top, kind):
    """expression_matrix shares the arrays of a float32 CSR matrix (no copy of the whole matrix): no step may change
    them in place."""
    X = sp.csr_matrix(top.X, dtype=np.float32)
    if kind != "counts":
        X.data[X.indptr[:-1][np.diff(X.indptr) > 1] + 1] = 0.0  # a stored zero in every spot with two values or more
    top.X = X
    if kind.startswith(("log-normalised counts", "rounded log values")):
        sc.pp.normalize_total(top)
        sc.pp.log1p(top)
        top.X = sp.csr_matrix(top.X, dtype=np.float32)
    if kind.startswith("rounded log values"):
        top.X.data = np.round(top.X.data, 2)  # counts that cannot be recovered
    if kind.endswith("unsorted indices"):  # each row's entries reversed: scipy sorts such a matrix in place
        X = top.X
        for begin, end in zip(X.indptr[:-1], X.indptr[1:]):
            X.indices[begin:end], X.data[begin:end] = X.indices[begin:end][::-1].copy(), X.data[begin:end][::-1].copy()
        X.has_sorted_indices = False
    if kind.endswith("duplicate entries"):  # every value split in two entries at its place: summed in place by scipy
        X = top.X
        rows = np.tile(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr)), 2)
        order = np.argsort(rows, kind="stable")  # a row's entries, then the same entries again
        halves = np.tile(X.data / 2, 2)[order].astype(np.float32)
        indptr = np.r_[0, np.cumsum(2 * np.diff(X.indptr))]
        top.X = sp.csr_matrix((halves, np.tile(X.indices, 2)[order], indptr), shape=X.shape)  # kept as given
        assert not top.X.has_canonical_format
    before = top.X.toarray()
    arrays = [a.copy() for a in (top.X.data, top.X.indices, top.X.indptr)]
    dfm.pp.serialize(top)
    dfm.tl.embed(top, **QUICK)
    if not kind.startswith("rounded log values"):  # coarsen sums counts: log values that are no counts are refused
        dfm.pp.coarsen(top, 2)
    for was, now in zip(arrays, (top.X.data, top.X.indices, top.X.indptr)):
        np.testing.assert_array_equal(now, was)
    np.testing.assert_array_equal(top.X.toarray(), before)


def test_reading_log_normalised_values_with_stored_zeros_leaves_the_callers_matrix_as_it_was(bundled):
    """Review s43, finding 8: the recovery dropped stored zeros from the index arrays it shared with adata.X."""
    adata = bundled[:300, :200].copy()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.data[X.indptr[:-1][np.diff(X.indptr) > 1] + 1] = 0.0  # a stored zero in every spot with two values or more
    adata.X = X
    before, nnz = X.toarray(), X.nnz
    counts, is_counts, _ = _features.expression_matrix(adata, None)
    assert is_counts and counts is not None
    assert adata.X.nnz == nnz and np.array_equal(adata.X.toarray(), before)


def test_values_that_are_not_log_normalised_counts_are_not_made_into_counts(bundled):
    """log2 of normalised counts on tiny panels (5 genes, 200 spots, ten draws): taken for counts only where the
    values carry nothing more than counts over their common factor (spots whose values are all equal), never as
    counts made up by the multiplier search (counts 2 and 1 came back as 36 and 17 with an absolute tolerance)."""
    rng = np.random.default_rng(1)
    X = sp.csr_matrix(bundled.X, dtype=np.float32)
    for _ in range(10):
        genes = rng.choice(X.shape[1], 5, replace=False)
        panel = X[rng.choice(X.shape[0], 200, replace=False)][:, genes].tocsr()
        panel = panel[np.asarray(panel.sum(axis=1)).ravel() > 0]
        truth = panel.toarray().astype(np.int64)
        logged = ad.AnnData(panel.copy())
        sc.pp.normalize_total(logged)
        sc.pp.log1p(logged)
        got = _features.recovered_counts(sp.csr_matrix(logged.X / np.log(2), dtype=np.float32))
        if got is not None:
            np.testing.assert_array_equal(got.toarray(), truth // np.gcd.reduce(truth, axis=1)[:, None])


def test_counts_of_too_few_spots_for_seurat_v3_are_ranked_by_the_seurat_dispersion_of_their_log_values(bundled):
    """scikit-misc's loess (seurat_v3) fails on these 251 spots; tl.embed goes on with scanpy's other flavour."""
    small = crop(bundled, rows=(0, 5), cols=(0, 200))
    dfm.pp.serialize(small)
    with pytest.warns(UserWarning, match="seurat_v3 .* failed on these 251 spots") as caught:
        dfm.tl.embed(small, **QUICK)
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()  # points at the user's call
    logged = small.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    scanpy = sc.pp.highly_variable_genes(logged, flavor="seurat", n_top_genes=300, inplace=False)
    expected = set(small.var_names[scanpy["highly_variable"].to_numpy()])
    assert len(expected & set(small.uns["dfm"]["genes"])) >= 298


def test_too_few_varying_genes_for_a_loess_fit_are_ranked_without_trying_it(top):
    """scikit-misc's loess crashes the process on 3 points or fewer: with 3 varying genes it is not called."""
    two = top[:2]
    X, _, _ = expression_matrix(two, None)
    dense = X.toarray()
    varying = np.flatnonzero(dense[0] != dense[1])[:3]
    constant = np.flatnonzero((dense[0] == 0) & (dense[1] == 0))[:9]
    genes = two.var_names[np.sort(np.concatenate([varying, constant]))]
    X, is_counts, _ = expression_matrix(two[:, genes], None)
    with pytest.warns(UserWarning, match=r"\(only 3 genes vary\)"):
        ranks = gene_ranks(X, genes, is_counts)
    logged = two[:, genes].copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    pd.testing.assert_series_equal(ranks, gene_ranks(sp.csr_matrix(logged.X, dtype=np.float32), genes, False))


def test_a_direct_fit_warns_at_its_caller_as_tl_embed_does(top):
    """The warnings of the feature transform name the first frame outside the package, however deep they start."""
    with pytest.warns(UserWarning, match=r"n_top_genes=5000 but the data has 3000 genes") as caught:
        FeatureTransform.fit(top, layer=None, n_top_genes=5000, n_pcs=None, seed=0)  # called here, not by a helper
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()
    dfm.pp.serialize(top)
    with pytest.warns(UserWarning, match=r"n_top_genes=5000 but the data has 3000 genes") as caught:
        dfm.tl.embed(top, **{**QUICK, "n_top_genes": 5000})
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()


def test_the_fit_subset_is_drawn_with_the_seed(top, monkeypatch):
    monkeypatch.setattr(_features, "MAX_FIT_SPOTS", 200)
    fits = [_fit(top, seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(fits[0].mean, fits[1].mean)
    assert not np.allclose(fits[0].mean, fits[2].mean)


def test_standardised_genes_are_clipped_at_ten(top):
    z, _ = _fit(top).transform(top)
    assert np.abs(z).max() == pytest.approx(10.0) and (np.abs(z) > 9.999).sum() > 10


def test_a_gene_that_does_not_vary_in_training_stays_zero_on_another_slice(bundled, top):
    """The training crop never counted gene ``j`` (standardised, 0 on every training spot: the model learnt nothing
    about it); on a crop that counts it, the standardised gene is 0 too, not its deviation from the training value."""
    other = crop(bundled, rows=(20, 40), cols=(0, 60))
    j = int(np.argmax(np.asarray(other.X.sum(axis=0)).ravel()))  # the gene most counted in the other crop
    X = top.X.toarray()
    X[:, j] = 0
    top.X = sp.csr_matrix(X)
    fitted = _fit(top, n_top_genes=top.n_vars)  # every gene, the unvarying one too
    assert fitted.genes[j] == top.var_names[j]
    trained, _ = fitted.transform(top)
    new, _ = fitted.transform(other)
    assert not trained[:, j].any() and not new[:, j].any()
    # so are the genes the crop never counted by itself; the others are standardised as before
    counted = np.asarray(top.X.sum(axis=0)).ravel() > 0
    assert counted.sum() < top.n_vars - 1 and not new[:, ~counted].any() and new[:, counted].any(axis=0).mean() > 0.9
    logged = sc.pp.normalize_total(other, target_sum=1e4, copy=True)
    sc.pp.log1p(logged)
    logged = logged.X.toarray()[:, counted]
    expected = np.clip((logged - fitted.mean[counted]) / fitted.scale[counted], -10, 10)
    np.testing.assert_allclose(new[:, counted], expected, rtol=1e-4, atol=1e-4)


def test_principal_axes_are_those_of_the_standardised_clipped_genes(top):
    z, _ = _fit(top).transform(top)
    axes = PCA(10, svd_solver="full").fit(z).components_
    cosines = np.linalg.svd(axes @ _fit(top, n_pcs=10).loadings, compute_uv=False)
    assert cosines.min() > 0.999


def test_a_tissue_of_fewer_spots_than_components_gets_as_many_as_its_spots_allow(top):
    few = top[:12].copy()
    # every gene kept (a ranking on 12 spots would fall back from seurat_v3 with a warning)
    assert _fit(few, n_pcs=30, n_top_genes=few.n_vars).loadings.shape[1] == 11  # n_spots - 1: centred data span no more


def test_the_spatial_graph_holds_each_spot_and_its_nearest_spots_both_ways(top):
    (layout,) = dfm.pp.library_layouts(top)
    graph = layout.graph()
    np.testing.assert_allclose(np.asarray(graph.sum(axis=1)).ravel(), 1.0, rtol=1e-5)
    assert np.all(graph.diagonal() > 0)  # the spot itself
    linked = (graph > 0).astype(np.int8)
    assert (linked != linked.T).nnz == 0  # symmetric
    assert np.diff(linked.indptr).min() >= 7  # itself and at least 6 neighbours


def test_an_inner_visium_spot_is_linked_to_its_six_touching_spots_whatever_the_order_of_the_spots(top):
    """The Visium grid is hexagonal: touching spots are two array_col apart in a row, one apart in the next row."""
    (layout,) = dfm.pp.library_layouts(top)
    linked = (layout.graph() > 0).tocsr()
    rc = top.obs[["array_row", "array_col"]].to_numpy()
    occupied = set(map(tuple, rc))
    complete = {(r, c) for r, c in occupied if all((r + dr, c + dc) in occupied for dr, dc in TOUCHING)}
    # the next rings (√3 and 2 spot distances) complete too: a spot at the edge links to its whole second ring
    ring2 = [*SQRT3_RING, (0, -4), (0, 4), (-2, -2), (-2, 2), (2, -2), (2, 2)]
    inner = [i for i, (r, c) in enumerate(rc) if all((r + dr, c + dc) in complete for dr, dc in TOUCHING + ring2)]
    assert len(inner) > 150  # of 492
    for i in inner:
        found = {tuple(rc[j] - rc[i]) for j in linked.indices[linked.indptr[i] : linked.indptr[i + 1]] if j != i}
        assert found == set(TOUCHING), (i, found)
    perm = np.random.default_rng(0).permutation(top.n_obs)  # (6 nearest cells of the old square grid: ties)
    (shuffled,) = dfm.pp.library_layouts(top[perm].copy())
    back = np.argsort(perm)
    assert (shuffled.graph()[back][:, back] != layout.graph()).nnz == 0


def test_visium_spots_are_placed_on_a_regular_hexagonal_lattice(top):
    """Touching spots (two array_col apart in a row, one apart in the next row) are all one spacing apart, the next
    ring (two rows apart; one row and three columns apart) √3 spacings: what makes an edge spot's neighbours right."""
    (layout,) = dfm.pp.library_layouts(top)
    at = {tuple(rc): i for i, rc in enumerate(top.obs[["array_row", "array_col"]].to_numpy())}

    def distances(offsets):
        pairs = [(i, at[(r + dr, c + dc)]) for (r, c), i in at.items() for dr, dc in offsets if (r + dr, c + dc) in at]
        first, second = np.array(pairs).T
        return np.linalg.norm(layout.points[first] - layout.points[second], axis=1)

    touching = distances(TOUCHING)
    assert touching.size > 1000
    np.testing.assert_allclose(touching, touching[0], rtol=1e-9)
    np.testing.assert_allclose(distances(SQRT3_RING), np.sqrt(3) * touching[0], rtol=1e-9)


@pytest.mark.parametrize("n_neighbors", [2, 6])
def test_the_spatial_graph_is_every_spot_as_near_as_the_kth_nearest_even_with_many_ties(n_neighbors):
    """Against all pairwise distances: a lattice (ties at every ring), spots stacked 20 deep (20 ties at distance 0),
    scattered spots; the k-th nearest counted among distinct positions; symmetrised and row-normalised."""
    rng = np.random.default_rng(0)
    lattice = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    points = np.vstack([lattice, np.repeat([[30.0, 30.0]], 20, axis=0), rng.uniform(20, 40, (60, 2))])
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    positions = np.unique(points, axis=0)
    to_positions = np.linalg.norm(points[:, None] - positions[None], axis=-1)
    kth = np.sort(to_positions, axis=1)[:, n_neighbors]  # column 0 is the spot's own position
    linked = (dist <= kth[:, None] * (1 + 1e-6)).astype(float)
    linked = np.sign(linked + linked.T)
    expected = linked / linked.sum(axis=1, keepdims=True)
    graph = spatial_graph(points, n_neighbors=n_neighbors)
    np.testing.assert_allclose(graph.toarray(), expected, rtol=1e-6)
    stacked = graph[120].indices
    assert set(range(120, 140)) < set(stacked)  # all 20 at its position, and spots of the nearest other positions
    assert len(set(stacked) - set(range(120, 140))) >= n_neighbors
    perm = rng.permutation(len(points))
    back = np.argsort(perm)
    assert (spatial_graph(points[perm], n_neighbors=n_neighbors)[back][:, back] != graph).nnz == 0


def test_the_spatial_graph_refuses_more_spots_at_one_position_than_it_links(monkeypatch):
    from dfmamba_st.tl import _features

    points = np.vstack([np.random.default_rng(0).uniform(0, 50, (100, 2)), np.zeros((30, 2))])
    assert spatial_graph(points)[100:].nnz >= 30 * 30  # 30 at (0, 0): all linked
    monkeypatch.setattr(_features, "MAX_AT_ONE_POSITION", 29)
    with pytest.raises(ValueError, match=r"30 spots share one position \(0, 0\).*library_key="):
        spatial_graph(points)


@pytest.mark.filterwarnings("ignore:.* spots have the same coordinates:UserWarning")  # the test stacks spots on purpose
def test_embed_refuses_crowded_positions_before_it_reads_the_expression(top, monkeypatch):
    from dfmamba_st.tl import _embed

    del top.obs["array_row"], top.obs["array_col"]
    top.obsm["spatial"] = np.asarray(top.obsm["spatial"], dtype=float)
    top.obsm["spatial"][:40] = 0.0  # 40 spots at one position: coordinates missing, filled with zeros
    with pytest.warns(UserWarning, match="same coordinates"):
        dfm.pp.serialize(top)
    monkeypatch.setattr(_features, "MAX_AT_ONE_POSITION", 39)
    monkeypatch.setattr(_embed, "expression_matrix", lambda *a, **k: pytest.fail("the expression was read first"))
    with pytest.raises(ValueError, match="40 spots share one position"):
        dfm.tl.embed(top, **QUICK)


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")  # scanpy's note on the emptied spot
def test_normalised_data_with_an_empty_spot_is_still_told_to_take_the_log(top):
    X = top.X.tolil()
    X[0, :] = 0
    top.X = X.tocsr()
    top.X.eliminate_zeros()
    sc.pp.normalize_total(top)
    with pytest.raises(ValueError, match="normalised but not log-transformed"):
        expression_matrix(top, None)


@pytest.mark.parametrize("target", [1.0, 1e6])
def test_normalised_data_are_told_to_take_the_log_whatever_the_total(top, target):
    """Totals equal to within float32 rounding, relative to their size: at 10^6 per spot their sd is ~0.08."""
    sc.pp.normalize_total(top, target_sum=target)
    with pytest.raises(ValueError, match="normalised but not log-transformed"):
        expression_matrix(top, None)


@pytest.mark.filterwarnings("ignore:.*raw counts cannot be recovered:UserWarning")  # the test's input is such values
def test_the_log_total_is_the_median_spot_total(top):
    sc.pp.normalize_total(top, target_sum=1e4)
    sc.pp.log1p(top)
    top.X.data = np.round(top.X.data, 3)  # the counts cannot be recovered: a model of log-normalised values
    subset = top[:, :1500].copy()  # normalised over all genes, then cut to some: the totals vary by spot
    totals = np.asarray(subset.X.expm1().sum(axis=1)).ravel()
    assert abs(np.mean(totals) - np.median(totals)) > 1e-3 * np.median(totals)  # mean and median differ
    assert _fit(subset).log_total == pytest.approx(np.median(totals), rel=1e-5)


# --- tokens and readout -------------------------------------------------------------------------------------------


def test_concat_readout_is_the_two_ring_neighbourhood_features_next_to_the_centred_state(trained):
    adata, model = trained
    emb, n = adata.obsm["X_dfm"], model.config.n_features
    features, _ = model.features.transform(adata)
    (layout,) = dfm.pp.library_layouts(adata)
    graph = layout.graph()
    # the neighbourhood half of a token: the features averaged over two rings (hops=2), centred, unit total variance
    np.testing.assert_allclose(emb[:, :n], _centred_unit_variance(graph @ (graph @ features)), atol=1e-4)
    state = emb[:, n:]
    np.testing.assert_allclose(state.mean(axis=0), 0.0, atol=1e-5)  # the state block is centred too
    assert np.sqrt((state**2).sum(axis=1).mean()) == pytest.approx(1.0, rel=1e-4)


def test_model_readout_is_the_mean_over_the_curves_averaged_over_readout_hops_rings(trained):
    adata, model = trained
    got = {
        hops: dfm.tl.embed(adata, model=model, readout="model", readout_hops=hops, copy=True, progress=False).obsm[
            "X_dfm"
        ]
        for hops in (0, 1, 2)
    }
    (layout,) = dfm.pp.library_layouts(adata)
    graph = layout.graph()
    features, _ = model.features.transform(adata)
    tokens = np.hstack([features, graph @ (graph @ features)])
    # the tokens are divided by their root mean square over the training spots (these), kept with the model
    assert model.config.extra["token_scale"] == pytest.approx(float(np.sqrt(np.mean(tokens**2))), rel=1e-4)
    tokens = tokens / model.config.extra["token_scale"]
    model.eval()
    per_curve = []
    with torch.no_grad():
        for curve in model.config.curves:
            order = layout.order(curve)
            out, _ = model(torch.from_numpy(tokens[order].astype(np.float32))[None])
            state = np.empty((adata.n_obs, model.config.d_model), dtype=np.float32)
            state[order] = out[0].numpy()
            per_curve.append(state)
    mean = np.mean(per_curve, axis=0)
    np.testing.assert_allclose(got[0], mean, atol=1e-4)
    np.testing.assert_allclose(got[1], graph @ mean, atol=1e-4)
    np.testing.assert_allclose(got[2], graph @ (graph @ mean), atol=1e-4)


def test_transfer_reads_the_tokens_and_curves_the_model_was_trained_with(top):
    dfm.pp.serialize(top)
    first, model = dfm.tl.embed(top, hops=1, extra_curves=(), readout="model", copy=True, return_model=True, **QUICK)
    again = dfm.tl.embed(top, model=model, readout="model", copy=True, progress=False)
    params = again.uns["dfm"]["params"]
    assert params["hops"] == 1 and list(params["curves"]) == ["hilbert"]
    np.testing.assert_allclose(again.obsm["X_dfm"], first.obsm["X_dfm"], atol=1e-5)


# --- training and record ------------------------------------------------------------------------------------------


def test_each_epoch_draws_new_training_masks(top, monkeypatch):
    dfm.pp.serialize(top)
    seen = []
    original = _model.SpatialDFMamba.masked_loss

    def spy(self, tokens, mask):
        seen.append(mask.clone())
        return original(self, tokens, mask)

    monkeypatch.setattr(_model.SpatialDFMamba, "masked_loss", spy)
    dfm.tl.embed(top, copy=True, **{**QUICK, "epochs": 2})
    assert len(seen) == 20  # the CPU preset's 10 steps per epoch
    assert not any(torch.equal(a, b) for a, b in zip(seen[:10], seen[10:]))


def test_the_training_loss_is_the_error_at_the_masked_spots_alone(trained):
    """The reconstruction term is the squared error of the head's token at each window's masked spots (mean over a
    window's masked spots, then over windows), next to DF-Mamba's auxiliary loss; with no spot masked, every spot."""
    _, model = trained
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 40, model.embed_in.in_features, generator=gen)
    mask = torch.rand(3, 40, generator=gen) < torch.tensor([[0.1], [0.3], [0.6]])  # windows with few and many masked

    def spot_errors(m):  # the squared error of every spot's reconstructed token, and the auxiliary record
        out, aux = model(tokens, m)
        return (model.head(out) - tokens).pow(2).mean(-1), aux

    with torch.no_grad():
        loss, parts = model.masked_loss(tokens, mask)
        err, aux = spot_errors(mask)
        expected = torch.stack([err[w][mask[w]].mean() for w in range(3)]).mean()
        assert parts["masked_mse"] == pytest.approx(float(expected), rel=1e-5)
        assert float(loss) == pytest.approx(float(expected + aux.loss), rel=1e-5)
        assert abs(float(expected) - float(err.mean())) > 1e-3  # the visible spots' error is left out
        none = torch.zeros_like(mask)
        everywhere = spot_errors(none)[0].mean()
        assert model.masked_loss(tokens, none)[1]["masked_mse"] == pytest.approx(float(everywhere), rel=1e-5)


def test_masked_spots_enter_dfmamba_as_the_learned_mask_token_and_the_others_as_their_tokens(trained):
    model = copy.deepcopy(trained[1])
    with torch.no_grad():
        model.mask_token.copy_(torch.linspace(-1.0, 1.0, model.mask_token.numel()))
    seen = []
    model.dfmamba.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    tokens = torch.randn(2, 40, model.embed_in.in_features, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, ::4] = True
    with torch.no_grad():
        model(tokens, mask)
        assert torch.equal(seen[0][mask], model.mask_token.expand(int(mask.sum()), -1))
        torch.testing.assert_close(seen[0][~mask], model.embed_in(tokens)[~mask])


def test_the_moving_average_spans_ema_fraction_of_the_training_steps(top, monkeypatch):
    """Decay 1 - 1 / (ema_fraction x steps); no average when that is under 2 steps. QUICK: 1 epoch of 10 steps."""
    decays = []
    real_fit = _embed.fit
    monkeypatch.setattr(_embed, "fit", lambda *args, **kw: decays.append(kw["ema_decay"]) or real_fit(*args, **kw))
    dfm.pp.serialize(top)
    for fraction in (0.5, 0.1, 1.0):  # (0, 1]: all of the steps is allowed
        dfm.tl.embed(top, ema_fraction=fraction, **QUICK)
    assert top.uns["dfm"]["params"]["steps_per_epoch"] == 10
    assert decays == [pytest.approx(1 - 1 / 5), None, pytest.approx(1 - 1 / 10)]


def test_a_model_given_in_training_mode_is_applied_and_left_in_evaluation_mode(trained):
    adata, model = trained
    reference = dfm.tl.embed(adata, model=model, progress=False, copy=True).obsm["X_dfm"]
    model.train()
    applied = dfm.tl.embed(adata, model=model, progress=False, copy=True).obsm["X_dfm"]
    assert not any(module.training for module in model.modules())  # as documented for model=
    np.testing.assert_array_equal(applied, reference)


def test_the_record_names_the_number_of_principal_components(trained):
    adata, model = trained
    params = adata.uns["dfm"]["params"]
    assert params["n_pcs"] == model.features.loadings.shape[1] == 10
    assert adata.obsm["X_dfm"].shape[1] == params["n_pcs"] + params["d_model"]
