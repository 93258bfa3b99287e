"""Edges of ``pp.serialize``, ``pp.coarsen`` and ``tl.cluster``: slices pooled without a key, positions the label
smoothing cannot use, mistyped keys, spots outside the tissue, library columns of any type, argument types.

Real data only: crops of the bundled DLPFC 151673 slice and of the shared 151673 / 151674 slices.
"""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from _shared import QUICK, crop, shared_path, warned_at
from sklearn.metrics import adjusted_rand_score

import dfmamba_st as dfm
from dfmamba_st._utils import serialized_rows
from dfmamba_st.tl import _cluster


def _with_pca(adata: ad.AnnData, n_comps: int = 10) -> ad.AnnData:
    """``adata`` with ``obsm['X_pca']`` of its log-normalised counts (an embedding to cluster, no training)."""
    normalised = adata.copy()
    sc.pp.normalize_total(normalised)
    sc.pp.log1p(normalised)
    sc.pp.pca(normalised, n_comps=n_comps, random_state=0)
    adata.obsm["X_pca"] = normalised.obsm["X_pca"]
    return adata


@pytest.fixture(scope="module")
def two_slices() -> ad.AnnData:
    """Crops of 151673 and 151674 on the same grid window, joined (``obs['lib']``), with a PCA embedding."""
    slices = {s: crop(ad.read_h5ad(shared_path("dlpfc", f"dlpfc_{s}.h5ad"))) for s in ("151673", "151674")}
    return _with_pca(ad.concat(slices, label="lib", join="inner", index_unique="-"))


@pytest.fixture
def small(bundled) -> ad.AnnData:
    return _with_pca(crop(bundled))


def test_cluster_warns_about_slices_pooled_without_a_key_and_smooths_each_slice_with_one(two_slices):
    pooled = two_slices.copy()
    with pytest.warns(UserWarning, match="same coordinates.*smoothed over one another's.*Several slices") as caught:
        dfm.tl.cluster(pooled, 5, use_rep="X_pca", n_init=2)
    assert warned_at(caught, "same coordinates", __file__)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*same coordinates")
        keyed = dfm.tl.cluster(two_slices, 5, use_rep="X_pca", n_init=2, library_key="lib", copy=True)
        unrefined = dfm.tl.cluster(two_slices, 5, use_rep="X_pca", n_init=2, library_key="lib", refine=False, copy=True)
    # with the key each slice is smoothed on its own graph: the vote of spots in the other slice is gone
    raw = unrefined.obs["dfm_domain"].astype(int).to_numpy()
    by_slice = raw.copy()
    for layout in dfm.pp.library_layouts(two_slices, library_key="lib"):
        by_slice[layout.idx] = dfm.tl.refine_labels(raw[layout.idx], layout.graph())
    assert adjusted_rand_score(keyed.obs["dfm_domain"], by_slice) == 1.0  # the same domains, numbered by size


def test_slices_serialized_one_by_one_and_joined_cluster_alike_whatever_the_row_order(two_slices, monkeypatch):
    """Joined without a key, their curve positions repeat (0, 1, ... in each): the spots' names break the ties."""
    parts = [two_slices[(two_slices.obs["lib"] == s).to_numpy()].copy() for s in ("151673", "151674")]
    for part in parts:
        dfm.pp.serialize(part)
    joined = ad.concat(parts)  # uns dropped: no key recorded
    perm = np.random.default_rng(0).permutation(joined.n_obs)
    runs = [joined.copy(), joined[perm].copy()]
    for adata in runs:
        dfm.tl.cluster(adata, 5, use_rep="X_pca", n_init=2, refine=False)
    np.testing.assert_array_equal(runs[1][joined.obs_names].obs["dfm_domain"], runs[0].obs["dfm_domain"])
    # the order the mixture is fitted in: the same spots in the same order, whatever the rows' order
    fit_order = [adata.obs_names[serialized_rows(adata, "dfm_order", None)] for adata in runs]
    assert list(fit_order[0]) == list(fit_order[1])
    # and where the embedding is centred, projected and fitted on a subset (a large tissue in miniature)
    monkeypatch.setattr(_cluster, "MAX_FIT_SPOTS", joined.n_obs // 3)
    for adata in runs:
        dfm.tl.cluster(adata, 5, use_rep="X_pca", n_comps=5, n_init=2, refine=False, key_added="subset")
    np.testing.assert_array_equal(runs[1][joined.obs_names].obs["subset"], runs[0].obs["subset"])


def test_positions_the_smoothing_cannot_use_stop_cluster_before_the_fit_and_name_refine(small, monkeypatch):
    adata = small.copy()
    del adata.obs["array_row"], adata.obs["array_col"]  # no grid: the coordinates are read
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    adata.obsm["spatial"][3] = np.nan
    fitted = []
    real_gmm = _cluster._gmm
    monkeypatch.setattr(_cluster, "_gmm", lambda *a, **k: fitted.append(1) or real_gmm(*a, **k))
    with pytest.raises(ValueError, match=r"dfm\.tl\.cluster reads the spots' positions .*refine=False clusters"):
        dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=1)
    assert fitted == []
    dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=1, refine=False)
    assert fitted and adata.obs["dfm_domain"].cat.categories.size == 3


def test_cluster_says_when_the_smoothing_empties_a_domain(small):
    tiny = small[:10].copy()
    with pytest.warns(UserWarning, match=r"\(refine=True\) emptied 1 of 2 domains, which are left out") as caught:
        dfm.tl.cluster(tiny, 2, use_rep="X_pca", n_init=2)
    assert warned_at(caught, "Smoothing the labels", __file__) and "(1 domain left)" in str(caught[0].message)
    # left out, not an empty category (audit s46: scanpy's rank_genes_groups and dendrogram fail on one)
    assert tiny.obs["dfm_domain"].cat.categories.tolist() == ["0"]
    dfm.tl.cluster(tiny, 2, use_rep="X_pca", n_init=2, refine=False)
    assert (tiny.obs["dfm_domain"].value_counts() > 0).all()


def test_a_domain_emptied_between_two_others_leaves_them_numbered_by_size(small):
    """Isolated spots of a domain inside another, more of them than a third domain holds: the mixture numbers them
    1, the smoothing gives them to their neighbours' domain, and the third domain, numbered 2, becomes 1."""
    graph = dfm.pp.library_layouts(small)[0].graph().tocsr()
    col = small.obs["array_col"].to_numpy()
    label = np.where(col >= np.quantile(col, 0.9), 2, 0)  # a band of about a tenth of the spots
    for spot in range(small.n_obs):  # spots of domain 0 whose neighbours all stay in domain 0: islands of domain 1
        around = graph.indices[graph.indptr[spot] : graph.indptr[spot + 1]]
        if label[spot] == 0 and around.size >= 6 and np.all(label[around] == 0):
            label[spot] = 1
    sizes = np.bincount(label)
    assert sizes[0] > sizes[1] > sizes[2]
    small.obsm["X_three"] = np.eye(3)[label] * 10 + np.random.default_rng(0).normal(scale=0.1, size=(small.n_obs, 3))
    dfm.tl.cluster(small, 3, use_rep="X_three", n_init=2, refine=False)
    assert adjusted_rand_score(small.obs["dfm_domain"], label) == 1.0
    with pytest.warns(UserWarning, match=r"emptied 1 of 3 domains"):
        dfm.tl.cluster(small, 3, use_rep="X_three", n_init=2)
    assert small.obs["dfm_domain"].cat.categories.tolist() == ["0", "1"]
    assert (small.obs["dfm_domain"].to_numpy()[label == 2] == "1").mean() > 0.9
    assert small.uns["dfm_domain"]["params"]["n_clusters"] == 3  # the record keeps the number asked for


def test_cluster_reads_a_sparse_embedding_and_names_a_tolerance_that_is_no_number(small):
    dense = dfm.tl.cluster(small, 4, use_rep="X_pca", n_init=2, copy=True)
    small.obsm["X_sparse"] = sp.csr_matrix(small.obsm["X_pca"])
    sparse = dfm.tl.cluster(small, 4, use_rep="X_sparse", n_init=2, copy=True)
    np.testing.assert_array_equal(sparse.obs["dfm_domain"], dense.obs["dfm_domain"])
    for tol in (None, "1e-3", True, 0.0):
        with pytest.raises(ValueError, match=f"tol must be a positive number, got {tol!r}"):
            dfm.tl.cluster(small, 4, use_rep="X_pca", tol=tol)


def test_key_added_with_a_slash_is_refused_as_h5ad_could_not_read_it_back(small):
    for call in (lambda: dfm.pp.serialize(small, key_added="a/b"), lambda: dfm.tl.cluster(small, 3, key_added="a/b")):
        with pytest.raises(ValueError, match=r"key_added='a/b' holds '/'"):
            call()


@pytest.mark.parametrize("key", [None, ""])
def test_key_added_must_be_a_name(small, key):
    error = ValueError if key == "" else TypeError
    with pytest.raises(error, match=f"key_added must be a non-empty str .*got {key!r}"):
        dfm.pp.serialize(small, key_added=key)
    with pytest.raises(error, match="key_added must be a non-empty str"):
        dfm.tl.cluster(small, 3, use_rep="X_pca", key_added=key)
    with pytest.raises(error, match="key_added must be a non-empty str"):
        dfm.tl.embed(small, key_added=key, **QUICK)
    assert None not in small.obs and "" not in small.obs and None not in small.uns


def test_coarsen_refuses_a_spatial_key_that_is_not_there(small):
    with pytest.raises(KeyError, match=r"spatial_key='spatail' is not in adata\.obsm; available keys: \['spatial'"):
        dfm.pp.coarsen(small, 2, spatial_key="spatail")


def test_coarsen_says_it_sums_spots_outside_the_tissue(small):
    small.obs["in_tissue"] = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in_tissue")
        dfm.pp.coarsen(small, 2)
    small.obs.iloc[:4, small.obs.columns.get_loc("in_tissue")] = 0
    with pytest.warns(UserWarning, match=r"4 of \d+ spots have obs\['in_tissue'\] == 0.*summed into the bins") as c:
        dfm.pp.coarsen(small, 2)
    assert warned_at(c, "in_tissue", __file__)


@pytest.mark.parametrize("values", [["a", "b"], [7, 9], [True, False]], ids=["text", "int", "bool"])
def test_coarsen_gives_the_library_column_as_a_category_whatever_its_type(two_slices, values):
    adata = two_slices.copy()
    adata.obs["slide"] = np.where(adata.obs["lib"] == "151673", *values)
    coarse = dfm.pp.coarsen(adata, 2, library_key="slide")
    assert isinstance(coarse.obs["slide"].dtype, pd.CategoricalDtype)
    assert sorted(coarse.obs["slide"].cat.categories) == sorted(values)
    per_library = coarse.obs.groupby("slide", observed=True)["n_spots"].sum()
    assert per_library.to_dict() == adata.obs["slide"].value_counts().to_dict()  # bins never mix the slides


def test_a_bin_takes_the_mean_of_its_spots_known_positions(small):
    adata = small.copy()
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    want = dfm.pp.coarsen(adata, 2).obsm["spatial"]
    adata.obsm["spatial"][0] = np.nan  # the grid bins the spots; one spot's coordinates unknown
    coarse = dfm.pp.coarsen(adata, 2)
    got = coarse.obsm["spatial"]
    assert np.isfinite(got).all()
    moved = np.flatnonzero(np.any(got != want, axis=1))
    assert moved.size == 1  # only that spot's bin, now the mean of its other spots
    (layout,) = dfm.pp.library_layouts(adata)
    bins = np.empty_like(layout.cells)
    bins[layout.idx] = layout.cells // 2  # the grid cells coarsen bins, in the AnnData's order
    same_bin = np.all(bins == bins[0], axis=1)
    same_bin[0] = False
    assert same_bin.sum() == coarse.obs["n_spots"].iloc[moved[0]] - 1
    np.testing.assert_allclose(got[moved[0]], adata.obsm["spatial"][same_bin].mean(axis=0))


def test_the_restarts_one_at_a_time_fit_what_scikit_learns_n_init_fits(two_slices):
    """``_gmm`` runs its restarts one by one (for the progress bar): the fit kept is scikit-learn's ``n_init`` fit."""
    from sklearn.mixture import GaussianMixture

    rep = np.asarray(two_slices.obsm["X_pca"], dtype=np.float64)
    for seed in (0, 3):
        ours = _cluster._gmm(rep, 7, seed, 6)
        theirs = GaussianMixture(
            7, covariance_type="tied", n_init=6, reg_covar=_cluster.GMM_REG_COVAR * rep.var(axis=0).mean(),
            tol=_cluster.GMM_TOL,
            max_iter=_cluster.GMM_MAX_ITER, random_state=seed,
        ).fit(rep)  # fmt: skip
        assert ours.lower_bound_ == theirs.lower_bound_ and ours.n_iter_ == theirs.n_iter_
        np.testing.assert_array_equal(ours.means_, theirs.means_)
        np.testing.assert_array_equal(ours.covariances_, theirs.covariances_)
    # the restarts differ (else keeping the best would be moot): the first restart alone is another fit
    assert _cluster._gmm(rep, 7, 3, 1).lower_bound_ != _cluster._gmm(rep, 7, 3, 6).lower_bound_


def test_cluster_shows_a_bar_over_the_gmm_fits_when_they_take_a_while(small, monkeypatch, capsys):
    closed = []

    class Recorded(_cluster.tqdm):
        def close(self):
            if not self.disable:
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(_cluster, "tqdm", Recorded)
    monkeypatch.setattr(_cluster, "PROGRESS_DELAY", 0.0)  # every fit "takes a while"
    adata = small.copy()
    with pytest.warns(UserWarning, match="no clear knee"):
        dfm.tl.cluster(adata, None, use_rep="X_pca", n_init=4, k_range=range(2, 5))
    assert closed == [("dfm.tl.cluster: choosing K", 9, 9), ("dfm.tl.cluster: 4 GMM restarts", 4, 4)]  # 3 K x 3
    assert "dfm.tl.cluster: 4 GMM restarts" in capsys.readouterr().err
    dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=4, progress=False)
    assert capsys.readouterr().err == "" and len(closed) == 2
    monkeypatch.setattr(_cluster, "PROGRESS_DELAY", 600.0)  # work shorter than the delay: no bar drawn
    dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=4)
    assert capsys.readouterr().err == ""


def test_a_seed_numpy_cannot_take_is_refused_before_any_work(small):
    """Audit s46, finding 4: seeds from 2**32 failed inside scikit-learn or NumPy, with their words."""
    adata = small.copy()
    dfm.pp.serialize(adata)
    for call in (
        lambda seed: dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=1, random_state=seed),
        lambda seed: dfm.tl.embed(adata, seed=seed, epochs=1, progress=False),
    ):
        with pytest.raises(
            ValueError, match=r"must be a whole number from 0 to 2\*\*32 - 1 \(4294967295\), got 4294967296"
        ):
            call(2**32)
    dfm.tl.cluster(adata, 3, use_rep="X_pca", n_init=1, random_state=2**32 - 1)  # the largest is taken
    assert adata.uns["dfm_domain"]["params"]["random_state"] == 2**32 - 1


def test_the_domains_do_not_depend_on_the_embeddings_units(small):
    """Audit s46, finding 1: the GMM's regularisation was an absolute variance (1e-4), so an embedding in smaller
    units got other domains (the default embedding divided by 10 lost 0.13 ARI on 151673, divided by 100 gave one
    domain). It is now a share of the data's variance."""
    domains = []
    for factor in (1.0, 1e-3, 1e3):
        adata = small.copy()
        adata.obsm["X_pca"] = np.asarray(adata.obsm["X_pca"], dtype=np.float64) * factor
        dfm.tl.cluster(adata, 5, use_rep="X_pca", n_init=3, random_state=1)
        domains.append(adata.obs["dfm_domain"].to_numpy())
    assert len(set(domains[0])) == 5  # (not one domain everywhere)
    assert (domains[0] == domains[1]).all() and (domains[0] == domains[2]).all()
    with pytest.raises(ValueError, match=r"from 0 to 2\*\*32 - 1"):
        _cluster.choose_n_clusters(np.asarray(small.obsm["X_pca"]), random_state=2**32)
