"""Clustering and spatial-coherence scores: agreement with scikit-learn, label handling, CHAOS and PAS."""

import warnings
from contextlib import nullcontext
from math import sqrt

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _shared import shared_path, warned_at
from sklearn import metrics as skm

from dfmamba_st import metrics


def _read(name: str) -> ad.AnnData:
    return ad.read_h5ad(shared_path("dlpfc", name))


@pytest.fixture(scope="module")
def dlpfc_151673() -> ad.AnnData:
    adata = _read("dlpfc_151673.h5ad")
    # a perturbed labelling: 25% of the annotated spots get a random layer
    rng = np.random.default_rng(0)
    pred = adata.obs["layer"].astype(str).to_numpy().copy()
    flip = rng.random(adata.n_obs) < 0.25
    pred[flip] = rng.choice(adata.obs["layer"].cat.categories.to_numpy(), flip.sum())
    adata.obs["pred"] = pd.Categorical(pred)
    return adata


# ---------------------------------------------------------------------------------------------------------------
# evaluate on real labels
# ---------------------------------------------------------------------------------------------------------------
def test_scores_equal_scikit_learn_on_annotated_spots_of_151673(dlpfc_151673):
    adata = dlpfc_151673
    table = metrics.evaluate(adata, "layer", "pred")
    annotated = adata.obs["layer"].notna().to_numpy()
    truth = adata.obs["layer"].astype(str).to_numpy()[annotated]
    pred = adata.obs["pred"].astype(str).to_numpy()[annotated]
    row = table.loc["all"]
    assert row["ari"] == pytest.approx(skm.adjusted_rand_score(truth, pred), abs=1e-12)
    assert row["nmi"] == pytest.approx(skm.normalized_mutual_info_score(truth, pred), abs=1e-12)
    assert row["homogeneity"] == pytest.approx(skm.homogeneity_score(truth, pred), abs=1e-12)
    assert row["completeness"] == pytest.approx(skm.completeness_score(truth, pred), abs=1e-12)
    assert 0.3 < row["ari"] < 0.9  # the perturbation really changed the labelling
    assert list(table.columns) == list(metrics.COLUMNS)


def test_unannotated_spots_are_not_scored(dlpfc_151673):
    adata = dlpfc_151673
    table = metrics.evaluate(adata, "layer", "pred")
    assert table.loc["all", "n_spots"] == 3611  # 3,639 spots, 28 without a layer
    assert table["n_spots"].dtype.kind == "i"


def test_text_labels_read_as_missing_are_counted_in_the_log(dlpfc_151673, info_log):
    """A real label spelled "NA" is dropped like NaN (documented); the log says how many spots that took."""
    adata = dlpfc_151673.copy()
    adata.obs["layer"] = adata.obs["layer"].cat.rename_categories({"WM": "NA"})
    table = metrics.evaluate(adata, "layer", "pred")
    n_wm = int((dlpfc_151673.obs["layer"] == "WM").sum())
    assert table.loc["all", "n_spots"] == 3611 - n_wm
    assert f"{n_wm} spots of obs['layer'] labelled ['NA'] are taken as unannotated" in info_log.getvalue()


# pandas 3 always copies on write (its arrays come back read-only); pandas 2 has it as an option
COPY_ON_WRITE = [None] if int(pd.__version__.split(".")[0]) >= 3 else [False, True]


@pytest.mark.parametrize("copy_on_write", COPY_ON_WRITE)
def test_empty_and_ignored_truth_labels_are_dropped_case_insensitively(dlpfc_151673, copy_on_write):
    adata = dlpfc_151673.copy()
    truth = adata.obs["layer"].astype(object).to_numpy().copy()
    annotated = np.flatnonzero(pd.notna(truth))
    truth[annotated[:10]] = ""
    truth[annotated[10:30]] = "Undetermined"
    adata.obs["truth"] = truth
    mode = nullcontext() if copy_on_write is None else pd.option_context("mode.copy_on_write", copy_on_write)
    with mode:  # under copy-on-write the mask of missing labels once came back read-only (found on a GPU machine)
        assert metrics.evaluate(adata, "truth", "pred").loc["all", "n_spots"] == 3611 - 30
        kept = metrics.evaluate(adata, "truth", "pred", ignore=())
    assert kept.loc["all", "n_spots"] == 3611 - 10
    # the labels to ignore are compared in any case and without surrounding spaces too, as the labels are
    shouted = metrics.evaluate(adata, "truth", "pred", ignore=" UNDETERMINED ")
    assert shouted.loc["all", "n_spots"] == 3611 - 30


def test_ignore_takes_one_label_or_none_and_string_nans_count_as_missing(dlpfc_151673):
    adata = dlpfc_151673.copy()
    truth = adata.obs["layer"].astype(str).to_numpy().copy()  # astype(str) turns the 28 unlabelled spots into "nan"
    annotated = np.flatnonzero(adata.obs["layer"].notna().to_numpy())
    truth[annotated[:20]] = "undetermined"
    truth[annotated[20:23]] = "NA"  # an R export
    adata.obs["truth"] = truth
    # a single string is one label, not a set of characters; "nan" / "NA" are missing whatever `ignore` says
    assert metrics.evaluate(adata, "truth", "pred", ignore="undetermined").loc["all", "n_spots"] == 3611 - 23
    assert metrics.evaluate(adata, "truth", "pred", ignore=None).loc["all", "n_spots"] == 3611 - 3
    reference = metrics.evaluate(adata, "layer", "pred")
    adata.obs["truth"] = adata.obs["layer"].astype(str)
    assert metrics.evaluate(adata, "truth", "pred").loc["all", "ari"] == reference.loc["all", "ari"]


def test_ignore_compares_numbers_by_value_on_a_numeric_annotation(dlpfc_151673):
    """Layers exported as numbers (a float column, NaN where unannotated): ``7`` is the label ``7.0``."""
    adata = dlpfc_151673.copy()
    codes = {name: i + 1 for i, name in enumerate(adata.obs["layer"].cat.categories)}  # ..., WM -> 7
    adata.obs["number"] = adata.obs["layer"].map(codes).astype(float)
    white_matter = int((adata.obs["layer"] == "WM").sum())
    assert codes["WM"] == 7 and white_matter > 100
    for ignore in (7, [7], (7.0,), "7.0"):
        assert metrics.evaluate(adata, "number", "pred", ignore=ignore).loc["all", "n_spots"] == 3611 - white_matter
    assert metrics.evaluate(adata, "number", "pred", ignore=[8]).loc["all", "n_spots"] == 3611


def test_unscored_spots_need_no_coordinates_and_an_empty_truth_warns(dlpfc_151673):
    adata = dlpfc_151673.copy()
    unlabelled = np.flatnonzero(adata.obs["layer"].isna().to_numpy())
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=float).copy()
    adata.obsm["spatial"][unlabelled[:3]] = np.nan  # spots outside the annotation, e.g. off the tissue
    table = metrics.evaluate(adata, "layer", "pred")
    assert table.loc["all", "n_spots"] == 3611 and np.isfinite(table.loc["all", "chaos"])
    labelled = adata.copy()
    labelled.obsm["spatial"][np.flatnonzero(labelled.obs["layer"].notna().to_numpy())[:2]] = np.inf
    with pytest.raises(ValueError, match=r"obsm\['spatial'\] has NaN or inf coordinates for 2 scored spots"):
        metrics.evaluate(labelled, "layer", "pred")
    adata.obs["none"] = pd.Categorical([np.nan] * adata.n_obs, categories=["Layer1"])
    with pytest.warns(UserWarning, match="No spot has a truth label") as caught:
        assert metrics.evaluate(adata, "none", "pred").loc["all", "n_spots"] == 0
    assert warned_at(caught, "truth label", __file__, once=True)


def test_spots_without_prediction_are_dropped_with_a_warning(dlpfc_151673):
    adata = dlpfc_151673.copy()
    pred = adata.obs["pred"].astype(object).to_numpy().copy()
    pred[np.flatnonzero(adata.obs["layer"].notna().to_numpy())[:5]] = np.nan
    adata.obs["pred"] = pred
    with pytest.warns(UserWarning, match="5 annotated spots have no prediction") as caught:
        table = metrics.evaluate(adata, "layer", "pred")
    assert warned_at(caught, "no prediction", __file__, once=True)
    assert table.loc["all", "n_spots"] == 3611 - 5


def test_spatial_scores_never_pair_spots_of_two_slices_on_shared_coordinates(dlpfc_151673):
    """Two slices in one AnnData on the same coordinates (as after anndata.concat): CHAOS and PAS of the pooled row
    are the spot-weighted means of each slice's own, with the library key given or recorded by tl.cluster."""
    one = dlpfc_151673[:, :5].copy()
    other = one[:1200].copy()  # slices of unequal size: a plain mean of the two would differ from the weighted one
    other.obs["pred"] = other.obs["layer"]  # a perfect labelling of the second slice, a perturbed one of the first
    both = ad.concat({"a": one, "b": other}, label="library", index_unique="-")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a key, shared coordinates are expected: no warning
        table = metrics.evaluate(both, "layer", "pred", library_key="library")
    per_slice = table.drop(index="all")
    weights = per_slice["n_spots"] / per_slice["n_spots"].sum()
    assert weights.min() < 0.3
    # no key anywhere (anndata.concat drops the recorded one): coordinates pooled, and said so
    with pytest.warns(UserWarning, match=r"as another spot; CHAOS .* Pass library_key=.* to evaluate\."):
        naive = metrics.evaluate(both, "layer", "pred").loc["all"]
    both.uns["pred"] = {"params": {"library_key": "library"}}  # what tl.cluster records
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded = metrics.evaluate(both, "layer", "pred")
    pd.testing.assert_frame_equal(recorded, table)  # the recorded key is taken as if given
    pooled = recorded.loc["all"]
    for score in ("chaos", "pas"):
        assert pooled[score] == pytest.approx((per_slice[score] * weights).sum(), rel=1e-12)
        # pooled coordinates pair each spot with its twin of the other slice: another (wrong) value
        assert naive[score] != pytest.approx(pooled[score], rel=1e-3)
    assert pooled["ari"] == naive["ari"]  # the label scores are over all spots either way


def test_evaluate_scores_pas_with_the_k_it_is_given(dlpfc_151673):
    keep = dlpfc_151673.obs["layer"].notna().to_numpy()
    xy = dlpfc_151673.obsm["spatial"][keep]
    pred = dlpfc_151673.obs["pred"].astype(str).to_numpy()[keep]
    for k in (4, 20):
        got = metrics.evaluate(dlpfc_151673, "layer", "pred", k=k).loc["all", "pas"]
        assert got == pytest.approx(metrics.pas(pred, xy, k=k), rel=1e-12)
    assert metrics.pas(pred, xy, k=4) != pytest.approx(metrics.pas(pred, xy, k=20))


def test_evaluate_leaves_adata_unchanged(dlpfc_151673):
    adata = dlpfc_151673
    before = adata.obs.copy()
    metrics.evaluate(adata, "layer", "pred")
    pd.testing.assert_frame_equal(adata.obs, before)


def test_missing_keys_give_clear_errors(dlpfc_151673):
    with pytest.raises(KeyError, match=r"no column 'nope'.* Run dfm\.tl\.cluster"):  # the predictions: say how
        metrics.evaluate(dlpfc_151673, "layer", "nope")
    with pytest.raises(KeyError, match="no column 'nope'") as missing_truth:  # the annotation: no such advice
        metrics.evaluate(dlpfc_151673, "nope", "pred")
    assert "tl.cluster" not in str(missing_truth.value)
    with pytest.raises(KeyError, match="obsm"):
        metrics.evaluate(dlpfc_151673, "layer", "pred", spatial_key="X_nope")
    with pytest.raises(KeyError, match="library_key='lib' is not a column"):
        metrics.evaluate(dlpfc_151673, "layer", "pred", library_key="lib")


@pytest.mark.parametrize("k", [0, 2.5])
def test_pas_neighbours_must_be_a_whole_number(dlpfc_151673, k):
    with pytest.raises(ValueError, match=rf"`k` must be a whole number >= 1, got {k}\."):
        metrics.evaluate(dlpfc_151673, "layer", "pred", k=k)


def test_a_library_column_with_missing_values_is_refused_as_by_the_other_tools(dlpfc_151673):
    """Spots without a library would be in no row: refused, as pp.serialize, tl.embed and tl.cluster refuse them."""
    adata = dlpfc_151673.copy()
    adata.obs["lib"] = np.where(np.arange(adata.n_obs) < 50, None, "a")
    with pytest.raises(ValueError, match=r"obs\['lib'\] has missing values"):
        metrics.evaluate(adata, "layer", "pred", library_key="lib")


def test_multiple_libraries_give_one_row_each_equal_to_scoring_each_alone(dlpfc_151673):
    other = _read("dlpfc_151674.h5ad")
    other.obs["pred"] = other.obs["layer"]
    first = dlpfc_151673.copy()
    genes = first.var_names.intersection(other.var_names)
    both = ad.concat([first[:, genes], other[:, genes]], index_unique="-")
    both.obs["sample_id"] = both.obs["sample_id"].astype("category")
    table = metrics.evaluate(both, "layer", "pred", library_key="sample_id")
    assert table.index.name == "sample_id"
    assert list(table.index) == ["all", "151673", "151674"]
    alone = metrics.evaluate(first, "layer", "pred").loc["all"]
    pd.testing.assert_series_equal(table.loc["151673"], alone, check_names=False)
    assert table.loc["151674", "n_spots"] == 3635
    assert table.loc["151674", "ari"] == pytest.approx(1.0)
    assert table.loc["all", "n_spots"] == table.loc["151673", "n_spots"] + 3635
    truth, pred = (both.obs[key].astype(str).to_numpy() for key in ("layer", "pred"))
    scored = both.obs["layer"].notna().to_numpy()
    assert table.loc["all", "ari"] == pytest.approx(skm.adjusted_rand_score(truth[scored], pred[scored]), rel=1e-12)


def test_a_library_category_without_spots_gets_no_row(dlpfc_151673):
    adata = dlpfc_151673.copy()
    adata.obs["lib"] = pd.Categorical(np.where(np.arange(adata.n_obs) < 1000, "a", "b"), categories=["a", "b", "c"])
    table = metrics.evaluate(adata, "layer", "pred", library_key="lib")
    assert list(table.index) == ["all", "a", "b"] and table.notna().all().all()


def test_a_library_named_like_the_pooled_row_is_refused(dlpfc_151673):
    adata = dlpfc_151673.copy()
    adata.obs["lib"] = np.where(np.arange(adata.n_obs) < 1000, "all", "b")
    with pytest.raises(ValueError, match="names a library 'all', the name of the row pooled"):
        metrics.evaluate(adata, "layer", "pred", library_key="lib")


# ---------------------------------------------------------------------------------------------------------------
# CHAOS and PAS
# ---------------------------------------------------------------------------------------------------------------
def test_manual_layers_are_far_more_coherent_than_a_permutation_of_them(dlpfc_151673):
    adata = dlpfc_151673
    keep = adata.obs["layer"].notna().to_numpy()
    layers = adata.obs["layer"].astype(str).to_numpy()[keep]
    xy = adata.obsm["spatial"][keep]
    shuffled = np.random.default_rng(1).permutation(layers)
    chaos_layers, chaos_random = metrics.chaos(layers, xy), metrics.chaos(shuffled, xy)
    pas_layers, pas_random = metrics.pas(layers, xy), metrics.pas(shuffled, xy)
    # measured: CHAOS 0.060 vs 0.086, PAS 0.014 vs 0.95
    assert chaos_layers < 0.8 * chaos_random
    assert pas_layers < 0.05
    assert pas_random > 0.8


TWO_ROWS = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]], dtype=float)


def test_chaos_matches_hand_computation_on_two_rows_of_three_spots():
    # standardised with the sample sd: x has sd sqrt(0.8), y has sd sqrt(0.3)
    # rows as clusters: every spot's nearest same-cluster spot is 1 / sqrt(0.8) = sqrt(5) / 2 away
    assert metrics.chaos(list("aaabbb"), TWO_ROWS) == pytest.approx(sqrt(5) / 2, rel=1e-12)
    # columns as clusters: 1 / sqrt(0.3) = sqrt(10 / 3)
    assert metrics.chaos(list("abcabc"), TWO_ROWS) == pytest.approx(sqrt(10 / 3), rel=1e-12)
    # a singleton cluster adds nothing but counts in the denominator: (3 + 2) * sqrt(5) / 2 / 6
    assert metrics.chaos(list("aaabbc"), TWO_ROWS) == pytest.approx(5 * sqrt(5) / 12, rel=1e-12)


def test_pas_abnormal_means_at_least_6_of_10_neighbours_differ():
    # 11 spots, k = 10: each spot's neighbours are all the others.
    xy = np.c_[np.arange(11.0), np.zeros(11)]
    # 6 'a', 5 'b': an 'a' sees 5 different (not abnormal), a 'b' sees 6 (abnormal) -> 5 / 11
    assert metrics.pas(list("abbbbbaaaaa"), xy) == pytest.approx(5 / 11)
    # 7 'a', 4 'b': a 'b' sees 7 different -> 4 / 11
    assert metrics.pas(list("abbbbaaaaaa"), xy) == pytest.approx(4 / 11)


def test_pas_warns_when_there_are_not_k_other_spots(bundled):
    xy = np.c_[np.arange(11.0), np.zeros(11)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k = 10 on 11 spots: exactly the definition, no warning
        metrics.pas(list("abbbbbaaaaa"), xy)
    with pytest.warns(UserWarning, match=r"PAS with k=11 neighbours on 11 spots: each spot is compared with all 10"):
        assert metrics.pas(list("abbbbbaaaaa"), xy, k=11) == pytest.approx(5 / 11)  # all others, as before
    small = bundled[:8].copy()  # evaluate scores each library with pas: the warning reaches its caller
    small.obs["dfm_domain"] = small.obs["layer"]
    with pytest.warns(UserWarning, match="PAS with k=10 neighbours on 8 spots") as record:
        metrics.evaluate(small, "layer")
    assert any(r.filename == __file__ for r in record)


def test_pas_counts_a_lone_spot_in_a_grid():
    xy = np.array([(i, j) for i in range(5) for j in range(5)], dtype=float)
    labels = np.array(["a"] * 25)
    labels[12] = "b"
    assert metrics.pas(labels, xy, k=4) == pytest.approx(1 / 25)
    assert metrics.pas(np.array(["a"] * 25), xy) == 0.0
    with pytest.raises(TypeError):  # options are keyword-only
        metrics.pas(labels, xy, 4)


def test_pas_breaks_distance_ties_by_spot_order_like_the_reference():
    # spot 0 at the centre of a square: its 4 nearest (k=2 of them used) are all at distance 1
    xy = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=float)
    # the reference takes the first two by spot order: spots 1 and 2, both 'b' -> spot 0 abnormal
    assert metrics.pas(list("abbaa"), xy, k=2) * 5 == pytest.approx(
        1 + sum(_brute_force_abnormal(list("abbaa"), xy, 2, i) for i in range(1, 5))
    )


def _brute_force_abnormal(labels, xy, k, i):
    d = np.linalg.norm(xy - xy[i], axis=1)
    d[i] = np.inf
    ind = np.argsort(d, kind="stable")[:k]
    return int(sum(labels[j] != labels[i] for j in ind) > k / 2)


def _brute_force_pas(labels, xy, k):
    labels = np.asarray(labels)
    return sum(_brute_force_abnormal(labels, xy, k, i) for i in range(len(labels))) / len(labels)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_pas_where_spots_share_positions_equals_the_reference(dlpfc_151673, k):
    """Three spots at every position (slices pooled without a library key): a spot never counts as its own neighbour,
    its twins at distance 0 do, ties broken by spot order."""
    grid = dlpfc_151673.obs[["array_row", "array_col"]].to_numpy(float)[:120]
    xy = np.vstack([grid, grid, grid])
    labels = np.random.default_rng(k).choice(list("abc"), len(xy))
    assert metrics.pas(labels, xy, k=k) == _brute_force_pas(labels, xy, k)


def test_pas_ties_beyond_the_queried_candidates_equal_the_reference():
    """30 spots stacked on the centre of a lattice: the 10th nearest distance ties far past the candidates that the
    tree is asked for first, so those rows are redone exactly."""
    lattice = np.array([(i, j) for i in range(-6, 7) for j in range(-6, 7)], dtype=float)
    xy = np.vstack([lattice, np.zeros((30, 2))])
    for seed in range(4):  # which tied spots the tree returns first varies: several labellings, so one differs
        labels = np.random.default_rng(seed).choice(list("ab"), len(xy))
        assert metrics.pas(labels, xy, k=10) == _brute_force_pas(labels, xy, 10)


def test_evaluate_compares_labels_by_value(dlpfc_151673):
    adata = dlpfc_151673[:400].copy()
    codes = adata.obs["layer"].cat.codes.to_numpy()  # -1: no layer
    mixed = [float(c) if i % 2 else int(c) for i, c in enumerate(codes)]  # 1 and 1.0 side by side
    adata.obs["truth"] = pd.Series(mixed, dtype=object).values
    # the same labels with the other type at every spot
    adata.obs["pred"] = pd.Series([int(v) if i % 2 else float(v) for i, v in enumerate(mixed)], dtype=object).values
    table = metrics.evaluate(adata, "truth", "pred", ignore=-1)
    assert table.loc["all", "ari"] == 1.0  # as for scikit-learn: 1 and 1.0 are one domain, in truth and prediction


def test_evaluate_scores_x_and_y_and_warns_when_further_columns_vary(dlpfc_151673):
    adata = dlpfc_151673[:400].copy()
    adata.obs["pred"] = adata.obs["layer"]
    scored = adata.obs["layer"].notna().to_numpy()
    xy = adata.obsm["spatial"][:, :2]
    adata.obsm["xyz"] = np.c_[xy, np.arange(adata.n_obs) % 2]  # two sections stacked along z
    with pytest.warns(UserWarning, match=r"3 columns; only the first two \(x, y\) are used"):
        table = metrics.evaluate(adata, "layer", "pred", spatial_key="xyz")
    pred = adata.obs["pred"].to_numpy()[scored]
    assert table.loc["all", "chaos"] == pytest.approx(metrics.chaos(pred, xy[scored]), rel=1e-12)
    adata.obsm["xy_text"] = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "slide": "s1"}, index=adata.obs_names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant third column, even text, is no reason to warn
        assert metrics.evaluate(adata, "layer", "pred", spatial_key="xy_text").equals(
            metrics.evaluate(adata, "layer", "pred")
        )


def test_chaos_and_pas_reject_missing_labels_and_mismatched_lengths():
    with pytest.raises(ValueError, match="missing"):
        metrics.chaos(["a", None, "b"], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="must match"):
        metrics.pas(["a", "b"], np.zeros((3, 2)))
