"""The spatial API on inputs users hand it: keys carried between steps, small libraries, odd expression values,
several embeddings, transfer onto poorly matching genes, and what a call leaves behind in the session."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from _shared import QUICK, crop, shared_path, warned_at

import dfmamba_st as dfm
from dfmamba_st.core import isolated_global_state
from dfmamba_st.pp._serialize import OFF_LATTICE_SHARE
from dfmamba_st.tl._embed import _sample_windows

ARI_LEIDEN_EXPRESSION_ONLY = 0.2  # Leiden on 10 PCs of expression alone, no space: 0.27 measured, random labels ~0


@pytest.fixture(scope="module")
def two_slices():
    slices = {s: crop(ad.read_h5ad(shared_path("dlpfc", f"dlpfc_{s}.h5ad"))) for s in ("151673", "151674")}
    return ad.concat(slices, label="lib", join="inner", index_unique="-")


@pytest.mark.filterwarnings("ignore:.*lie almost only in one library")  # two different crops: expected
def test_embed_and_cluster_use_the_library_key_given_to_serialize(two_slices):
    pooled = two_slices.copy()
    dfm.pp.serialize(pooled, library_key="lib")
    explicit = pooled.copy()
    dfm.tl.embed(pooled, **QUICK)  # no library_key: the one serialize recorded
    dfm.tl.embed(explicit, library_key="lib", **QUICK)
    assert pooled.uns["dfm"]["params"]["library_key"] == "lib"
    np.testing.assert_array_equal(pooled.obsm["X_dfm"], explicit.obsm["X_dfm"])
    dfm.tl.cluster(pooled, 5, n_init=2)
    dfm.tl.cluster(explicit, 5, n_init=2, library_key="lib")
    assert pooled.uns["dfm_domain"]["params"]["library_key"] == "lib"
    assert (pooled.obs["dfm_domain"] == explicit.obs["dfm_domain"]).all()


def test_embed_warns_when_slices_are_pooled_without_a_key(two_slices):
    parts = [two_slices[(two_slices.obs["lib"] == s).to_numpy()].copy() for s in ("151673", "151674")]
    for part in parts:
        dfm.pp.serialize(part)
    pooled = ad.concat(parts, uns_merge="same")  # serialized one by one, then joined: no key recorded anywhere
    assert "dfm_order" in pooled.uns  # the same record in both parts is kept (a plain concat drops it: refused)
    with pytest.warns(UserWarning, match="same coordinates.*Several slices in one AnnData") as caught:
        dfm.tl.embed(pooled, **QUICK)
    assert warned_at(caught, "same coordinates", __file__)  # points at the user's call, behind embed's wrapper
    with pytest.warns(UserWarning, match="same coordinates.*Several slices in one AnnData") as caught:
        dfm.pp.serialize(pooled, copy=True)  # serialize says so too, at its caller
    assert warned_at(caught, "same coordinates", __file__)


def test_one_small_library_does_not_shorten_the_windows_of_the_others():
    big, tiny = np.arange(2000), np.arange(2000, 2002)
    libraries = [(big, np.arange(2000)[None, :], None), (tiny, np.array([[0, 1]]), None)]  # (idx, orders, graph)
    tokens = torch.arange(2002, dtype=torch.float32)[:, None]
    gen = torch.Generator().manual_seed(0)
    lengths = [_sample_windows(tokens, libraries, 512, 4, gen).shape[1] for _ in range(200)]
    # the 2-spot library is drawn first in about 1 step of 1,000 and then sets that step's length; every other
    # step keeps windows of 512 (the shortest library used to set the length of every window: always 2)
    assert sum(length == 512 for length in lengths) >= 190
    assert set(lengths) <= {512, 2}
    # a step led by the small library takes it whole and the other windows at its length from the big one
    solo = [(tiny, np.array([[0, 1]]), None)]
    assert _sample_windows(tokens, solo, 512, 3, gen).shape == (3, 2, 1)


def test_non_integer_values_that_are_not_log_normalised_are_refused(bundled):
    normalised = bundled.copy()
    sc.pp.normalize_total(normalised)  # normalised, not logged: every spot sums to the same total
    dfm.pp.serialize(normalised)
    with pytest.raises(ValueError, match="normalised but not log-transformed"):
        dfm.tl.embed(normalised, **QUICK)
    halved = bundled.copy()
    halved.X = sp.csr_matrix(halved.X * 0.5)  # non-integer, max far above any log1p value
    dfm.pp.serialize(halved)
    with pytest.raises(ValueError, match="neither raw counts nor log-normalised"):
        dfm.tl.embed(halved, **QUICK)
    logged = normalised.copy()
    sc.pp.log1p(logged)
    dfm.tl.embed(logged, **QUICK)  # the proper log-normalised input is still taken (its counts recovered)
    assert logged.uns["dfm"]["params"]["input"] == "recovered counts"


def test_each_embedding_keeps_its_own_record(bundled):
    adata = crop(bundled)
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, **QUICK)
    first = adata.uns["dfm"]["params"]["d_model"]
    dfm.tl.embed(adata, key_added="X_small", **{**QUICK, "d_model": 8})
    assert adata.uns["dfm"]["params"]["d_model"] == first == 16  # untouched by the second run
    assert adata.uns["X_small"]["params"]["d_model"] == 8 and adata.uns["X_small"]["key_added"] == "X_small"
    assert adata.uns["X_small"]["params"]["order_key"] == "dfm_order"


def test_cluster_refines_on_the_coordinates_serialize_was_given(her2st_a1):
    adata = her2st_a1.copy()
    adata.obsm["xy"] = adata.obsm.pop("spatial")
    dfm.pp.serialize(adata, spatial_key="xy", key_added="ord")
    dfm.tl.embed(adata, order_key="ord", **QUICK)
    assert adata.uns["dfm"]["params"]["spatial_key"] == "xy"
    dfm.tl.cluster(adata, 4, n_init=2)  # the refinement graph is built on obsm['xy'], found through the records
    usual = her2st_a1.copy()  # the same coordinates under the default keys
    dfm.pp.serialize(usual)
    dfm.tl.embed(usual, **QUICK)
    dfm.tl.cluster(usual, 4, n_init=2)
    np.testing.assert_array_equal(adata.obsm["X_dfm"], usual.obsm["X_dfm"])
    assert (adata.obs["dfm_domain"].to_numpy() == usual.obs["dfm_domain"].to_numpy()).all()


@pytest.fixture(scope="module")
def her2st_a1():
    return ad.read_h5ad(shared_path("her2st", "her2st_A1.h5ad"))


def test_transfer_says_what_it_ignores_and_when_gene_names_do_not_match(bundled):
    train = crop(bundled)
    dfm.pp.serialize(train)
    model = dfm.tl.embed(train, return_model=True, **QUICK)
    renamed = train.copy()
    renamed.var_names = [f"ENSG{i:011d}" if i % 4 else g for i, g in enumerate(train.var_names)]  # 3 in 4 renamed
    with pytest.warns(UserWarning, match=r"\(\d+%\) are missing.*symbols vs Ensembl IDs") as caught:
        dfm.tl.embed(renamed, model=model, progress=False)
    assert warned_at(caught, "are missing", __file__)  # points at the user's call
    ensembl = train.copy()  # Ensembl IDs as names, the symbols the model knows in a var column
    ensembl.var["symbol"] = ensembl.var_names.astype(str)
    ensembl.var_names = ensembl.var["gene_ids"].astype(str)
    with pytest.warns(UserWarning, match=r"adata\.var\['symbol'\] names 300 of them.*adata\.var_names = "):
        dfm.tl.embed(ensembl, model=model, progress=False)
    ensembl = ensembl[:, ~ensembl.var["symbol"].isin(ensembl.var_names)].copy()  # no model gene left as a name
    n_named = int(ensembl.var["symbol"].isin(model.features.genes).sum())
    with pytest.raises(ValueError, match=rf"None of the model's genes .* adata\.var\['symbol'\] names {n_named} of"):
        dfm.tl.embed(ensembl, model=model, progress=False)
    few = train[:, ~train.var_names.isin(model.features.genes[:10])].copy()  # 10 of 300 missing: no naming hint
    with pytest.warns(UserWarning, match=r"10 of the model's 300 genes \(3%\) are missing") as caught:
        dfm.tl.embed(few, model=model, progress=False)
    assert not [w for w in caught if "genes named" in str(w.message) or "smaller panel" in str(w.message)]
    narrow = train[:, train.var_names.isin(model.features.genes[:100])].copy()  # a smaller panel, same naming
    with pytest.warns(UserWarning, match="adata holds 100 genes .* a smaller panel than the training data's"):
        dfm.tl.embed(narrow, model=model, progress=False)
    with pytest.warns(UserWarning, match=r"ignored: \{'d_model': 8, 'epochs': 50\}") as caught:
        dfm.tl.embed(train, model=model, epochs=50, d_model=8, progress=False)
    assert warned_at(caught, "ignored:", __file__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing given that the model overrides, all genes present: no warning
        dfm.tl.embed(train, model=model, progress=False)


def log_normalised(adata, target_sum=None):
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def with_a_deep_spot(adata):
    """Counts whose first spot is deep: 100 more of each of its genes, so its smallest count is 101 and its counts
    share no factor. Log-normalised, they cannot be taken back to counts (that spot's values over its smallest need a
    multiplier of 101 to be whole, above MAX_SMALLEST_COUNT), as other transforms cannot."""
    out = adata.copy()
    out.X = sp.csr_matrix(out.X, dtype=np.float32)
    first = out.X.data[: out.X.indptr[1]]
    assert first.min() == 1 and (first == 2).any()
    first += 100
    return out


@pytest.mark.parametrize("target_sum", [None, 1e6])
def test_log_normalised_counts_give_the_embedding_of_the_counts(bundled, target_sum):
    """sc.pp.normalize_total + sc.pp.log1p (any target): the counts are recovered, the embedding is the counts' one."""
    counts = crop(bundled)
    dfm.pp.serialize(counts)
    reference = dfm.tl.embed(counts, copy=True, **QUICK)
    logged = log_normalised(counts, target_sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing lost: nothing to warn about
        got = dfm.tl.embed(logged, copy=True, **QUICK)
    np.testing.assert_array_equal(got.obsm["X_dfm"], reference.obsm["X_dfm"])
    assert list(got.uns["dfm"]["genes"]) == list(reference.uns["dfm"]["genes"])
    assert got.uns["dfm"]["params"]["input"] == "recovered counts"
    rounded = logged.copy()
    rounded.X.data = np.round(rounded.X.data, 2)  # as written to a text file: the counts are lost
    with pytest.warns(UserWarning, match="raw counts cannot be recovered .* 'seurat' dispersion") as caught:
        dfm.tl.embed(rounded, **QUICK)
    assert warned_at(caught, "cannot be recovered", __file__)
    assert rounded.uns["dfm"]["params"]["input"] == "log-normalised"


@pytest.mark.parametrize("target_sum", [None, 1e6])
@pytest.mark.filterwarnings("ignore:.*raw counts cannot be recovered:UserWarning")  # the test's input is such values
def test_transfer_between_counts_and_log_normalised_input_gives_the_same_features(bundled, target_sum):
    counts = with_a_deep_spot(crop(bundled))
    dfm.pp.serialize(counts)
    logged = log_normalised(counts, target_sum)
    # a model trained on counts, given log-normalised values (normalised over all genes, to any total)
    on_counts = dfm.tl.embed(counts, return_model=True, copy=True, **QUICK)[1]
    expected, _ = on_counts.features.transform(counts)
    with pytest.warns(UserWarning, match="trained on raw counts; adata holds log-normalised values"):
        got, _ = on_counts.features.transform(logged)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # a model trained on log-normalised values, given the counts they came from
    on_logs = dfm.tl.embed(logged, return_model=True, copy=True, **QUICK)[1]
    expected, _ = on_logs.features.transform(logged)
    with pytest.warns(UserWarning, match="trained on log-normalised; adata holds counts"):
        got, _ = on_logs.features.transform(counts)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # the record names the input given, not the model's
    with pytest.warns(UserWarning, match="trained on raw counts"):
        dfm.tl.embed(logged, model=on_counts, progress=False)
    assert logged.uns["dfm"]["params"]["input"] == "log-normalised"


@pytest.mark.filterwarnings("ignore:.*raw counts cannot be recovered:UserWarning")  # the test's input is such values
def test_a_model_file_keeps_the_total_its_log_normalised_input_had(bundled, tmp_path):
    adata = log_normalised(with_a_deep_spot(crop(bundled)), 1e6)
    dfm.pp.serialize(adata)
    model = dfm.tl.embed(adata, return_model=True, **QUICK)
    assert model.features.log_total == pytest.approx(1e6, rel=1e-3)
    path = dfm.tl.save_model(model, tmp_path / "m")
    assert dfm.tl.load_model(path).features.log_total == model.features.log_total


def test_a_saved_model_applies_the_readout_it_was_trained_with_unless_told_otherwise(top, tmp_path):
    dfm.pp.serialize(top)
    model = dfm.tl.embed(top, readout="model", readout_hops=0, return_model=True, **QUICK)
    path = dfm.tl.save_model(model, tmp_path / "state_only")
    again = dfm.tl.embed(top, model=path, copy=True, progress=False)
    np.testing.assert_array_equal(again.obsm["X_dfm"], top.obsm["X_dfm"])  # the DF-Mamba state, no ring average
    assert (again.uns["dfm"]["params"]["readout"], again.uns["dfm"]["params"]["readout_hops"]) == ("model", 0)
    told = dfm.tl.embed(top, model=path, readout="concat", copy=True, progress=False)  # the call's choice wins
    assert told.obsm["X_dfm"].shape[1] == model.config.n_features + model.config.d_model
    assert told.uns["dfm"]["params"]["readout_hops"] == 0
    for key in ("readout", "readout_hops"):  # a file written before the readout was stored: the defaults
        del model.config.extra[key]
    old = dfm.tl.embed(top, model=model, copy=True, progress=False)
    assert (old.uns["dfm"]["params"]["readout"], old.uns["dfm"]["params"]["readout_hops"]) == ("concat", 1)


def test_embed_with_a_library_key_reads_each_library_on_its_own(top):
    # a library's sequences and neighbours never hold another library's spots: a trained model gives a library the
    # same embedding whether or not another library shares its AnnData and its coordinates
    other = top.copy()
    other.X = top.X[np.random.default_rng(0).permutation(top.n_obs)]  # other expression at the same positions
    both = ad.concat({"a": top, "b": other}, label="lib", index_unique="-")
    dfm.pp.serialize(top)
    model = dfm.tl.embed(top, return_model=True, **QUICK)
    dfm.tl.embed(top, model=model, readout="model", progress=False)
    dfm.pp.serialize(both, library_key="lib")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "same coordinates" warning: the libraries are apart
        dfm.tl.embed(both, model=model, readout="model", progress=False)
    in_a = (both.obs["lib"] == "a").to_numpy()
    np.testing.assert_allclose(both.obsm["X_dfm"][in_a], top.obsm["X_dfm"], atol=1e-5)


def test_the_seed_draws_the_training_masks(top, monkeypatch):
    from dfmamba_st.tl._model import SpatialDFMamba

    dfm.pp.serialize(top)
    seen: dict[int, list] = {}
    original = SpatialDFMamba.masked_loss

    def spy(self, tokens, mask):
        seen.setdefault(current, []).append(mask.clone())
        return original(self, tokens, mask)

    monkeypatch.setattr(SpatialDFMamba, "masked_loss", spy)
    for current in (3, 4, 3):
        dfm.tl.embed(top, seed=current, copy=True, **QUICK)
    assert len(seen[3]) == 2 * len(seen[4])  # seed 3 ran twice
    half = len(seen[4])
    assert all(torch.equal(a, b) for a, b in zip(seen[3][:half], seen[3][half:]))  # the same seed, the same masks
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))


def test_embed_takes_its_features_from_the_layer_it_is_given(top):
    dfm.pp.serialize(top)
    logged = top.copy()
    logged.layers["counts"] = top.X.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    reference = dfm.tl.embed(top, seed=1, copy=True, **QUICK)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # X (log-normalised) is not read at all: nothing to convert
        got = dfm.tl.embed(logged, layer="counts", seed=1, copy=True, **QUICK)
    assert got.uns["dfm"]["params"]["layer"] == "counts"
    np.testing.assert_array_equal(got.obsm["X_dfm"], reference.obsm["X_dfm"])


def test_extra_curves_are_read_next_to_the_serialized_one(top):
    dfm.pp.serialize(top)
    default = dfm.tl.embed(top, copy=True, **QUICK)
    one, model = dfm.tl.embed(top, extra_curves=(), copy=True, return_model=True, **QUICK)
    assert list(default.uns["dfm"]["params"]["curves"]) == ["hilbert", "hilbert_t"]
    assert list(one.uns["dfm"]["params"]["curves"]) == ["hilbert"] and model.config.curves == ("hilbert",)
    three = dfm.tl.embed(top, extra_curves=("hilbert_t", "zorder"), copy=True, **QUICK)
    assert list(three.uns["dfm"]["params"]["curves"]) == ["hilbert", "hilbert_t", "zorder"]
    assert not np.allclose(default.obsm["X_dfm"], one.obsm["X_dfm"])


def test_a_serialized_curve_also_among_extra_curves_is_read_once_with_a_warning(top):
    dfm.pp.serialize(top, curve="hilbert_t")
    with pytest.warns(
        UserWarning, match=r"along 'hilbert_t', which extra_curves names too: .* 1 curve \(hilbert_t\), not 2"
    ) as caught:
        one, model = dfm.tl.embed(top, copy=True, return_model=True, **QUICK)
    assert warned_at(caught, "extra_curves names too", __file__) and "extra_curves=('hilbert',)" in str(
        caught[0].message
    )
    assert list(one.uns["dfm"]["params"]["curves"]) == ["hilbert_t"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # two curves as suggested; a trained model reads its own curves
        two = dfm.tl.embed(top, extra_curves=("hilbert",), copy=True, **QUICK)
        dfm.tl.embed(top, model=model, copy=True)
    assert list(two.uns["dfm"]["params"]["curves"]) == ["hilbert_t", "hilbert"]
    with pytest.warns(UserWarning, match=r"read along 2 curves \(hilbert_t, hilbert\), not 3\.") as caught:
        dfm.tl.embed(top, extra_curves=("hilbert_t", "hilbert"), copy=True, **QUICK)
    assert "second curve" not in str(caught[0].message)  # two are read: no advice to add one


def test_genes_missing_from_a_new_slice_are_set_to_their_training_mean(top):
    from dfmamba_st.tl._features import FeatureTransform

    tf = FeatureTransform.fit(top, layer=None, n_top_genes=300, n_pcs=None, seed=0)
    dropped = tf.genes[:40]
    fewer = top[:, [g for g in top.var_names if g not in set(dropped)]].copy()
    features, missing = tf.transform(fewer)
    assert missing == dropped
    assert (tf.mean[:40] > 0).all()  # expressed genes: a zero count would not standardise to 0
    assert np.all(features[:, :40] == 0.0)


def test_genes_present_keep_their_training_scale_when_others_are_missing(top, tmp_path):
    """Spots are normalised over the model's genes: without a correction, the present genes rose with the share of
    the counts the missing ones held (+0.12 z on average with 60 of 300 genes missing, 95 % of them upward)."""
    from dfmamba_st.tl._features import FeatureTransform

    tf = FeatureTransform.fit(top, layer=None, n_top_genes=300, n_pcs=None, seed=0)
    full, _ = tf.transform(top)
    dropped = set(np.random.default_rng(0).choice(tf.genes, 60, replace=False))
    present = np.array([g not in dropped for g in tf.genes])
    assert tf.share[~present].sum() > 0.1  # the dropped genes held a real share of the counts
    fewer = top[:, [g for g in top.var_names if g not in dropped]].copy()
    expressed = np.asarray(top[:, tf.genes].X.toarray() > 0)[:, present]
    for transform in (tf, FeatureTransform.from_state(tf.config(), tf.state())):  # as read back from a model file
        part, missing = transform.transform(fewer)
        assert len(missing) == 60
        shift = (part - full)[:, present][expressed]
        assert abs(shift.mean()) < 0.02 and 0.3 < (shift > 0).mean() < 0.7, (shift.mean(), (shift > 0).mean())
    # a model file from before the share was kept: read as before (no correction)
    old = FeatureTransform.from_state(tf.config(), {k: v for k, v in tf.state().items() if k != "share"})
    assert old.share is None
    assert (old.transform(fewer)[0] - full)[:, present][expressed].mean() > 0.05


def test_masked_spots_do_not_see_their_own_tokens():
    torch.manual_seed(0)
    model = dfm.tl.SpatialDFMamba(dfm.tl.SpatialConfig(n_features=6, d_model=8, depth=2)).eval()
    tokens = torch.randn(2, 32, 12)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, 5] = mask[:, 20] = True
    changed = tokens.clone()
    changed[mask] = torch.randn(int(mask.sum()), 12) * 10
    with torch.no_grad():
        out, _ = model(tokens, mask)
        out_changed, _ = model(changed, mask)
        unmasked, _ = model(changed)
    torch.testing.assert_close(out, out_changed)  # what hides under the mask cannot reach the output
    assert not torch.allclose(out, unmasked)


def test_a_library_key_with_missing_values_is_refused(top):
    top.obs["lib"] = pd.Categorical(["a"] * (top.n_obs - 3) + [np.nan] * 3)
    with pytest.raises(ValueError, match=r"obs\['lib'\] has missing values"):
        dfm.pp.serialize(top, library_key="lib")


def test_embed_puts_the_callers_random_state_and_torch_settings_back(bundled):
    adata = crop(bundled)
    dfm.pp.serialize(adata)
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 - the global state is what is checked
    torch_state = torch.random.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    dfm.tl.embed(adata, seed=7, **QUICK)
    assert (np.random.get_state()[1] == numpy_state).all()  # noqa: NPY002
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_a_preset_gene_count_above_the_panel_is_not_a_warning_but_a_chosen_one_is(bundled):
    adata = crop(bundled)
    dfm.pp.serialize(adata)
    few = adata[:, :200].copy()  # the panel has fewer genes than the preset's 3,000
    options = {k: v for k, v in QUICK.items() if k != "n_top_genes"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dfm.tl.embed(few, **options)
    with pytest.warns(UserWarning, match="n_top_genes=300 but the data has 200 genes") as caught:
        dfm.tl.embed(few, **QUICK)
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()  # points at the user's call


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # scikit-learn's own note on the flat input
@pytest.mark.filterwarnings("ignore:Smoothing the labels .* emptied:UserWarning")  # a flat input
def test_cluster_checks_its_arguments(bundled):
    adata = crop(bundled)
    adata.obsm["X_rep"] = np.asarray(adata.X[:, :5].toarray())
    with pytest.raises(ValueError, match=r"whole number .* got '7'"):
        dfm.tl.cluster(adata, "7", use_rep="X_rep")
    with pytest.raises(ValueError, match="got True"):
        dfm.tl.cluster(adata, True, use_rep="X_rep")
    with pytest.raises(ValueError, match="at least 2 spots"):
        dfm.tl.cluster(adata[:1].copy(), 1, use_rep="X_rep")
    adata.obsm["X_flat"] = np.zeros((adata.n_obs, 3))
    adata.obsm["X_flat"][0] = 1e-3  # one spot apart from the rest: 2 domains at most
    with pytest.warns(UserWarning, match=r"Asked for 5 domains, the kmeans assigned spots to 2 only") as caught:
        dfm.tl.cluster(adata, 5, method="kmeans", use_rep="X_flat", n_init=1)
    assert warned_at(caught, "Asked for 5 domains", __file__, once=True)


@pytest.mark.filterwarnings("ignore:Smoothing the labels .* emptied:UserWarning")  # a flat input
def test_cluster_takes_a_seed_or_none_never_a_generator_the_record_could_not_store(bundled, tmp_path):
    adata = crop(bundled)
    adata.obsm["X_rep"] = np.asarray(adata.X[:, :5].toarray(), dtype=float)
    for bad in (np.random.RandomState(0), np.random.default_rng(0), -1, 2.5):
        with pytest.raises((TypeError, ValueError), match="random_state"):
            dfm.tl.cluster(adata, 3, use_rep="X_rep", random_state=bad, n_init=1)
    assert "dfm_domain" not in adata.obs
    dfm.tl.cluster(adata, 3, use_rep="X_rep", random_state=np.int64(3), n_init=1, key_added="seeded")
    # (unrefined: a fresh seed's domains may lose one to the label smoothing, which is left out of the categories)
    seeds = []
    with isolated_global_state():  # (the global seed set here is put back after)
        for key in ("fresh", "fresher"):  # a fresh seed each call, which NumPy's global seed does not set
            np.random.seed(0)  # noqa: NPY002
            dfm.tl.cluster(adata, 3, use_rep="X_rep", random_state=None, n_init=1, key_added=key, refine=False)
            seeds.append(adata.uns[key]["params"]["random_state"])
    assert adata.obs["fresh"].cat.categories.size == 3 and seeds[0] != seeds[1]
    drawn = seeds[0]  # the seed drawn for None is recorded: the call repeats
    dfm.tl.cluster(adata, 3, use_rep="X_rep", random_state=drawn, n_init=1, key_added="again", refine=False)
    assert isinstance(drawn, int) and (adata.obs["again"] == adata.obs["fresh"]).all()
    adata.write_h5ad(tmp_path / "clustered.h5ad")  # every record h5ad-safe
    assert ad.read_h5ad(tmp_path / "clustered.h5ad").uns["seeded"]["params"]["random_state"] == 3


def test_leiden_clusters_three_slices_of_over_10000_spots():
    """scanpy's approximate neighbours (pynndescent) failed there with scanpy 1.11 and scipy 1.17."""
    slices = {s: dfm.datasets.dlpfc(s, path=shared_path("dlpfc")) for s in ("151673", "151674", "151510")}
    adata = ad.concat(slices, label="library", join="inner", index_unique="-")  # the 500 genes of 151510
    assert adata.n_obs > 10_000
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10, random_state=0)
    dfm.tl.cluster(adata, 7, method="leiden", use_rep="X_pca", library_key="library", refine=False)
    assert adata.obs["dfm_domain"].cat.categories.size == 7
    assert dfm.metrics.evaluate(adata, "layer").loc["all", "ari"] > ARI_LEIDEN_EXPRESSION_ONLY


@pytest.mark.parametrize("tool", ["embed", "cluster"])
def test_key_added_dfm_is_refused_because_it_would_replace_the_embeddings_record(top, tool):
    dfm.pp.serialize(top)
    dfm.tl.embed(top, **QUICK)
    record = top.uns["dfm"]
    call = (
        (lambda: dfm.tl.embed(top, **QUICK, key_added="dfm"))
        if tool == "embed"
        else (lambda: dfm.tl.cluster(top, 3, key_added="dfm"))
    )
    with pytest.raises(ValueError, match=rf"key_added='dfm' would write dfm\.tl\.{tool}'s record over uns\['dfm'\]"):
        call()
    assert top.uns["dfm"] is record and "dfm" not in top.obsm and "dfm" not in top.obs


def test_key_added_never_overwrites_what_another_tool_or_the_user_stored(top):
    """Truth labels, coordinates and images live in the same obs/obsm/uns; only a tool's own output is replaced."""
    adata = top.copy()
    adata.uns["spatial"] = {"lib": {"images": {"hires": np.zeros((2, 2, 3))}}}  # where sc.read_visium keeps images
    adata.obs["truth"] = "L1"
    dfm.pp.serialize(adata, key_added="order")
    dfm.pp.serialize(adata, curve="zorder", key_added="order")  # a re-run replaces its own order
    assert adata.uns["order"]["params"]["curve"] == "zorder"
    with pytest.raises(ValueError, match=r"dfm\.pp\.serialize would overwrite obs\['truth'\]"):
        dfm.pp.serialize(adata, key_added="truth")
    with pytest.raises(ValueError, match=r"overwrite uns\['spatial'\], obsm\['spatial'\]"):
        dfm.tl.embed(adata, **QUICK, order_key="order", key_added="spatial")
    for _ in range(2):  # the second call is a re-run
        dfm.tl.embed(adata, **QUICK, order_key="order", key_added="X_b")
    with pytest.raises(ValueError, match=r"overwrite obs\['truth'\].*delete obs\['truth'\] first"):
        dfm.tl.cluster(adata, 3, n_init=1, use_rep="X_b", key_added="truth")
    with pytest.raises(ValueError, match=r"overwrite uns\['order'\], obs\['order'\]"):
        dfm.tl.cluster(adata, 3, n_init=1, use_rep="X_b", key_added="order")
    for k in (3, 4):  # the second call is a re-run
        dfm.tl.cluster(adata, k, n_init=1, use_rep="X_b", key_added="domains")
    assert adata.obs["domains"].nunique() == 4
    assert (adata.obs["truth"] == "L1").all() and adata.uns["spatial"]["lib"]["images"]["hires"].shape == (2, 2, 3)
    assert adata.obs["order"].is_unique and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    del adata.obs["domains"]  # its record alone still marks the name as tl.cluster's own
    dfm.tl.cluster(adata, 3, n_init=1, use_rep="X_b", key_added="domains")


def test_the_order_of_the_spots_in_the_anndata_does_not_change_the_domains(top):
    """Slices joined in another order, or obs sorted, give the same domains (the seed fixed)."""
    perm = np.random.default_rng(0).permutation(top.n_obs)
    runs = [top.copy(), top[perm].copy()]
    for adata in runs:
        dfm.pp.serialize(adata)
        dfm.tl.embed(adata, **QUICK)
        dfm.tl.cluster(adata, 7, n_init=3)
    first, shuffled = runs[0], runs[1][top.obs_names]
    np.testing.assert_array_equal(shuffled.obs["dfm_order"], first.obs["dfm_order"])
    # the same up to float sums taken in another order (e.g. the PCA of the genes), which can move a spot or two
    np.testing.assert_allclose(shuffled.obsm["X_dfm"], first.obsm["X_dfm"], atol=0.01)
    assert (shuffled.obs["dfm_domain"] == first.obs["dfm_domain"]).mean() > 0.99
    again = first[perm].copy()
    dfm.tl.cluster(again, 7, n_init=3)  # the same embedding, rows in another order
    np.testing.assert_array_equal(again[top.obs_names].obs["dfm_domain"], first.obs["dfm_domain"])
    # without pp.serialize's order (an embedding of another tool, an AnnData never serialized) the spots' names order
    # the fit: rows in the AnnData's order gave other domains (HER2+ C1: ARI 0.258 against 0.066, the same embedding)
    bare = [first.copy(), again.copy()]
    for adata in bare:
        del adata.obs["dfm_order"], adata.uns["dfm_order"]
        dfm.tl.cluster(adata, 7, n_init=3)
    np.testing.assert_array_equal(bare[1][top.obs_names].obs["dfm_domain"], bare[0].obs["dfm_domain"])


@pytest.mark.filterwarnings("ignore:Observation names are not unique")  # anndata's own, on every copy
def test_repeated_spot_names_give_the_same_order_embedding_and_domains(top):
    """Spots are matched by position, not by name: two slices joined without `index_unique` repeat barcodes."""
    runs = [top.copy(), top.copy()]
    names = runs[1].obs_names.to_numpy().copy()  # not a view: the index of `top` is shared by its copies
    names[1::2] = names[0::2][: names[1::2].size]  # every second spot takes its neighbour's name
    runs[1].obs_names = names
    assert not runs[1].obs_names.is_unique
    for adata in runs:
        dfm.pp.serialize(adata)
        dfm.tl.embed(adata, **QUICK)
        dfm.tl.cluster(adata, 5, n_init=3)
    first, repeated = runs
    np.testing.assert_array_equal(repeated.obs["dfm_order"].to_numpy(), first.obs["dfm_order"].to_numpy())
    np.testing.assert_array_equal(repeated.obsm["X_dfm"], first.obsm["X_dfm"])
    np.testing.assert_array_equal(repeated.obs["dfm_domain"].to_numpy(), first.obs["dfm_domain"].to_numpy())
    table = dfm.metrics.evaluate(repeated, "layer")
    assert table.loc["all", "ari"] == dfm.metrics.evaluate(first, "layer").loc["all", "ari"]


def test_the_features_fitted_on_a_subset_of_large_tissue_do_not_depend_on_the_order_of_the_spots(top, monkeypatch):
    """Above MAX_FIT_SPOTS the standardisation and PCA are fitted on a subset: drawn along the curve, not by row."""
    from dfmamba_st.tl import _features

    monkeypatch.setattr(_features, "MAX_FIT_SPOTS", top.n_obs // 3)  # large tissue, in miniature
    perm = np.random.default_rng(1).permutation(top.n_obs)
    runs = [top.copy(), top[perm].copy()]
    models = []
    for adata in runs:
        dfm.pp.serialize(adata)
        models.append(dfm.tl.embed(adata, **{**QUICK, "epochs": 0}, return_model=True))
    first, shuffled = (m.features for m in models)
    np.testing.assert_allclose(shuffled.mean, first.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled.loadings, first.loadings, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs[1][top.obs_names].obsm["X_dfm"], runs[0].obsm["X_dfm"], atol=1e-4)
    fitted = [_features.FeatureTransform.fit(a, layer=None, n_top_genes=300, n_pcs=10, seed=0) for a in runs]
    np.testing.assert_allclose(fitted[1].mean, fitted[0].mean, rtol=1e-5, atol=1e-6)  # the same spots drawn
    for adata in runs:  # never serialized: the spots' names order the draw
        del adata.obs["dfm_order"]
    fitted = [_features.FeatureTransform.fit(a, layer=None, n_top_genes=300, n_pcs=10, seed=0) for a in runs]
    np.testing.assert_allclose(fitted[1].mean, fitted[0].mean, rtol=1e-5, atol=1e-6)


def test_spots_outside_the_tissue_are_named_in_a_warning(top, recwarn):
    """sc.read_visium of the raw matrix keeps spots with in_tissue == 0; they would be analysed as tissue."""
    top.obs["in_tissue"] = 1
    dfm.pp.serialize(top)  # all in the tissue: no warning
    assert not [w for w in recwarn if "in_tissue" in str(w.message)]
    top.obs.iloc[:5, top.obs.columns.get_loc("in_tissue")] = 0
    told = rf"5 of {top.n_obs} spots have obs\['in_tissue'\] == 0"
    with pytest.warns(UserWarning, match=told) as caught:
        dfm.pp.serialize(top)
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()  # points at the user's call
    top.obs["in_tissue"] = top.obs["in_tissue"].astype(str).astype("category")  # a positions file read as text
    with pytest.warns(UserWarning, match=told):
        dfm.pp.serialize(top)


def test_embed_needs_two_spots(top):
    one = top[:1].copy()
    dfm.pp.serialize(one)
    with pytest.raises(ValueError, match=r"dfm\.tl\.embed needs at least 2 spots, got 1"):
        dfm.tl.embed(one, **QUICK)


def test_a_handful_of_spots_in_a_library_is_not_a_library_specific_domain():
    # two 3,000-spot libraries sharing 5 domains, and a 2-spot fragment whose two spots form a sixth: that domain is
    # 100 % of the fragment's spots and absent elsewhere, which says nothing with two spots
    labels = np.array([str(i % 5) for i in range(6000)] + ["9", "9"])
    libraries = np.array(["a"] * 3000 + ["b"] * 3000 + ["fragment"] * 2)
    assert dfm.tl.library_specific_domains(labels, libraries) == {}
    labels[:600] = "5"  # a domain of library a only is still found
    assert dfm.tl.library_specific_domains(labels, libraries) == {"5": "a"}


@pytest.mark.parametrize("shift", [0, 1], ids=["even grid", "odd grid"])
def test_serialize_reports_a_few_spots_off_the_hexagonal_grid(bundled, shift):
    adata = crop(bundled)
    # shift 1: columns counted from 1, so every on-grid spot has an odd row + col
    adata.obs["array_col"] = adata.obs["array_col"].to_numpy() + shift
    adata.obs.iloc[0, adata.obs.columns.get_loc("array_col")] += 1  # one spot off the lattice
    with pytest.warns(UserWarning, match="1 of .* spots break the Visium hexagonal grid") as caught:
        dfm.pp.serialize(adata)
    assert warned_at(caught, "hexagonal grid", __file__)  # points at the user's call
    assert adata.uns["dfm_order"]["params"]["grid"] == "grid"


def test_off_grid_spots_are_reported_up_to_their_share_and_more_are_a_square_grid(bundled, recwarn):
    """OFF_LATTICE_SHARE is the most that is reported ("at most this share"); beyond it the grid is taken as square."""
    adata = bundled[:500].copy()
    most = int(OFF_LATTICE_SHARE * adata.n_obs)  # 5 of 500
    column = adata.obs.columns.get_loc("array_col")
    adata.obs.iloc[:most, column] += 1
    with pytest.warns(UserWarning, match=f"{most} of 500 spots break the Visium hexagonal grid"):
        dfm.pp.serialize(adata)
    adata.obs.iloc[most, column] += 1
    dfm.pp.serialize(adata)
    assert not [w for w in recwarn if "hexagonal grid" in str(w.message)]  # (pytest.warns kept the first call's)
    assert adata.uns["dfm_order"]["params"]["grid"] == "grid"


def test_a_recorded_library_key_no_longer_in_obs_is_not_used(top):
    top.obs["slide"] = "s1"
    dfm.pp.serialize(top, library_key="slide")
    del top.obs["slide"]
    dfm.tl.embed(top, **QUICK)
    assert top.uns["dfm"]["params"]["library_key"] == "None"


@pytest.mark.filterwarnings("ignore:.*lie almost only in one library")
def test_cluster_takes_the_library_key_of_the_embedding_before_that_of_the_serialization(top):
    top.obs["slide"] = "s1"
    top.obs["half"] = np.where(top.obs["array_row"].to_numpy() < 10, "upper", "lower")
    dfm.pp.serialize(top, library_key="slide")
    dfm.tl.embed(top, library_key="half", **QUICK)
    dfm.tl.cluster(top, 3, n_init=1)
    assert top.uns["dfm_domain"]["params"]["library_key"] == "half"


def test_embed_without_the_default_order_names_the_orders_serialize_wrote(top):
    with pytest.raises(KeyError, match=r"run dfm.pp.serialize\(adata\) before dfm.tl.embed\.\W*$"):
        dfm.tl.embed(top, **QUICK)
    dfm.pp.serialize(top, key_added="ord2")
    top.obs["other"] = 0  # a column with no serialize record is not offered
    with pytest.raises(KeyError, match=r"or pass order_key= one of \['ord2'\] \(written by dfm.pp.serialize\)"):
        dfm.tl.embed(top, **QUICK)
    dfm.tl.embed(top, order_key="ord2", **QUICK)
    assert "X_dfm" in top.obsm


def test_evaluate_scores_space_on_the_coordinates_the_domains_were_made_on(top):
    """tl.cluster records the coordinates the spots were serialized on; evaluate's spatial scores use them by
    default (obsm['spatial'] may be another frame, or stale), and obsm['spatial'] for a labelling without a record."""
    top.obsm["xy"] = top.obsm["spatial"] * 2.0 + 100.0
    top.obsm["spatial"] = top.obsm["spatial"][np.random.default_rng(0).permutation(top.n_obs)]  # other spots'
    dfm.pp.serialize(top, spatial_key="xy")
    dfm.tl.embed(top, **QUICK)
    dfm.tl.cluster(top, 5, n_init=2)
    assert top.uns["dfm_domain"]["params"]["spatial_key"] == "xy"
    default = dfm.metrics.evaluate(top, "layer")
    stale = dfm.metrics.evaluate(top, "layer", spatial_key="spatial")
    assert default.equals(dfm.metrics.evaluate(top, "layer", spatial_key="xy"))
    assert default["chaos"].iloc[0] < stale["chaos"].iloc[0]
    top.obs["copied"] = top.obs["dfm_domain"]  # the same labels with no tl.cluster record
    assert dfm.metrics.evaluate(top, "layer", pred_key="copied").equals(stale)


def test_coarsen_takes_the_coordinates_serialize_recorded_and_serialize_the_key_coarsen_recorded(top):
    own = top.copy()
    own.obsm["xy"] = own.obsm.pop("spatial")
    del own.obs["array_row"], own.obs["array_col"]
    dfm.pp.serialize(own, spatial_key="xy")
    coarse = dfm.pp.coarsen(own, 2)  # no obsm['spatial']: the recorded key, as the other steps take it
    assert coarse.uns["dfm_coarsen"]["params"]["spatial_key"] == "xy" and "xy" in coarse.obsm
    dfm.pp.serialize(coarse)
    assert coarse.uns["dfm_order"]["params"]["spatial_key"] == "xy"  # where the plots and metrics find the bins

    halves = top.copy()
    halves.obs["lib"] = pd.Categorical(np.where(halves.obs["array_col"] < 30, "L", "R"))
    dfm.pp.serialize(halves, library_key="lib")
    coarse = dfm.pp.coarsen(halves, 2)  # the library key serialize recorded
    assert coarse.uns["dfm_coarsen"]["params"]["library_key"] == "lib"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # each library its own sequence: no "same coordinates"
        dfm.pp.serialize(coarse)
    assert coarse.uns["dfm_order"]["params"]["library_key"] == "lib"


def test_grid_columns_that_are_not_whole_numbers_are_said_to_be_ignored(top):
    top.obs["array_row"] = top.obs["array_row"] + 0.5
    with pytest.warns(UserWarning, match=r"array_col'\] are not whole numbers.*ordered on obsm\['spatial'\]"):
        dfm.pp.serialize(top)
    assert top.uns["dfm_order"]["params"]["grid"] == "quantized"


def test_scaled_expression_is_refused_with_where_the_usable_data_are(top):
    sc.pp.normalize_total(top)
    sc.pp.log1p(top)
    top.raw = top
    sc.pp.scale(top)
    dfm.pp.serialize(top)
    with pytest.raises(ValueError, match=r"negative values .* adata\.raw\.to_adata\(\)"):
        dfm.tl.embed(top, **QUICK)
    top.layers["counts"] = top.X.copy()  # a layer as unusable, named all the same: the user picks
    with pytest.raises(ValueError, match=r"layer= one of \['counts'\]; or adata\.raw"):
        dfm.pp.coarsen(top, 2)
