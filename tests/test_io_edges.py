"""Edges of the file and input handling: model files, ``pp.coarsen`` inputs and records, ``datasets`` loaders.

Real data only: crops of the bundled DLPFC 151673 slice, and the shared her2st files where present. No network: the
download path runs pooch for real with ``requests`` replaced by a function that fails as an offline machine does.
"""

import copy
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import requests
import scanpy as sc
import scipy.sparse as sp
import torch
from _shared import QUICK, shared_path, warned_at

import dfmamba_st as dfm
from dfmamba_st.tl._model import model_fingerprint


@pytest.fixture(scope="module")
def strip(bundled) -> ad.AnnData:
    """Rows 0–15 of the bundled slice."""
    return bundled[(bundled.obs["array_row"] < 16).to_numpy()].copy()


@pytest.fixture
def crop(strip) -> ad.AnnData:
    return strip.copy()


@pytest.fixture(scope="module")
def trained(strip):
    adata = strip.copy()
    dfm.pp.serialize(adata)
    model = dfm.tl.embed(adata, **QUICK, return_model=True, device="cpu")
    return adata, model


# --- model files ------------------------------------------------------------------------------------------------------


def test_a_model_loads_under_the_name_it_was_saved_with(trained, tmp_path, monkeypatch):
    adata, model = trained
    monkeypatch.chdir(tmp_path)
    written = dfm.tl.save_model(model, "mymodel")
    assert written == Path("mymodel.safetensors") and written.is_file()
    loaded = dfm.tl.load_model("mymodel")
    assert loaded.features.genes == model.features.genes
    # tl.embed(model=<path>) goes through load_model: the same name works there too
    again = adata.copy()
    dfm.tl.embed(again, model="mymodel", progress=False, device="cpu")
    np.testing.assert_allclose(again.obsm["X_dfm"], adata.obsm["X_dfm"], atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"No model file at other nor at other\.safetensors"):
        dfm.tl.load_model("other")


def test_tilde_is_expanded_when_saving_and_loading(trained, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    written = dfm.tl.save_model(trained[1], "~/proj/m")
    assert written == home / "proj" / "m.safetensors" and written.is_file()
    assert not (work / "~").exists()  # no literal "~" folder in the working directory
    for name in ("~/proj/m.safetensors", "~/proj/m", Path("~/proj/m")):
        assert dfm.tl.load_model(name).config == trained[1].config


def test_another_suffix_gets_safetensors_appended_and_a_file_of_the_given_name_is_read_first(trained, tmp_path):
    assert dfm.tl.save_model(trained[1], tmp_path / "run.v2") == tmp_path / "run.v2.safetensors"
    named = dfm.tl.save_model(trained[1], tmp_path / "m").rename(tmp_path / "m")  # a file "m", no suffix
    other = copy.deepcopy(trained[1])
    with torch.no_grad():
        other.mask_token += 1.0
    dfm.tl.save_model(other, tmp_path / "m")  # and "m.safetensors", another model
    assert torch.equal(dfm.tl.load_model(named).mask_token, trained[1].mask_token)
    assert torch.equal(dfm.tl.load_model(tmp_path / "m.safetensors").mask_token, other.mask_token)


def test_save_model_refuses_an_existing_folder(trained, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(f"{folder} is a folder")):
        dfm.tl.save_model(trained[1], folder)
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())  # nothing written, no sibling file


def test_load_model_of_a_folder_names_the_folder_and_its_model_files(trained, tmp_path):
    dfm.tl.save_model(trained[1], tmp_path / "m")
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a folder") + r".*m\.safetensors"):
        dfm.tl.load_model(tmp_path)


def test_a_model_file_keeps_every_setting_and_loads_ready_to_embed(crop, tmp_path):
    dfm.pp.serialize(crop)
    model = dfm.tl.embed(crop, hops=1, extra_curves=("zorder",), bidirectional=True, return_model=True, **QUICK)
    loaded = dfm.tl.load_model(dfm.tl.save_model(model, tmp_path / "m"))
    assert loaded.config == model.config and not loaded.training
    tf, back = model.features, loaded.features
    assert (back.genes, back.log_normalize, back.log_total) == (tf.genes, tf.log_normalize, tf.log_total)
    for name in ("mean", "scale", "loadings"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tf, name))
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_a_model_file_keeps_the_models_precision_and_embeds_in_it(trained, crop, tmp_path, dtype):
    model = copy.deepcopy(trained[1]).to(dtype)
    loaded = dfm.tl.load_model(dfm.tl.save_model(model, tmp_path / "m"))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    dfm.pp.serialize(crop)
    dfm.tl.embed(crop, model=trained[1], key_added="X_f32")
    dfm.tl.embed(crop, model=loaded, key_added="X_loaded")  # tokens in the model's precision
    assert crop.obsm["X_loaded"].dtype == np.float32
    tolerance = 1e-4 if dtype == torch.float64 else 0.1  # bfloat16 keeps 8 bits of mantissa
    np.testing.assert_allclose(
        crop.obsm["X_loaded"], crop.obsm["X_f32"], atol=tolerance * np.abs(crop.obsm["X_f32"]).max()
    )


def test_genes_named_by_numbers_are_recorded_as_text_and_survive_a_file_round_trip(crop, tmp_path):
    """Integer var_names (anndata warns but keeps them): the record must be writable, and the model must find its
    genes again in the same data read back from the file, where anndata has made the names text."""
    crop.var_names = pd.Index(np.arange(crop.n_vars))
    dfm.pp.serialize(crop)
    model = dfm.tl.embed(crop, **QUICK, return_model=True, device="cpu")
    assert all(isinstance(g, str) for g in crop.uns["dfm"]["genes"]) and model.features.genes == list(
        crop.uns["dfm"]["genes"]
    )
    crop.write_h5ad(tmp_path / "numbered.h5ad")
    back = ad.read_h5ad(tmp_path / "numbered.h5ad")
    assert back.uns["dfm"]["genes"].tolist() == model.features.genes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gene reported missing
        dfm.tl.embed(back, model=model, progress=False, device="cpu")
    np.testing.assert_allclose(back.obsm["X_dfm"], crop.obsm["X_dfm"], atol=1e-5)


def test_a_model_object_is_moved_to_the_device_it_is_applied_on(trained, monkeypatch):
    adata, model = trained
    moved = []
    to = type(model).to

    def spy(self, *args, **kwargs):
        moved.append(args)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "to", spy)
    dfm.tl.embed(adata.copy(), model=model, device="cpu", progress=False)
    assert moved == [(torch.device("cpu"),)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: applies a CPU model on the GPU and back")
def test_a_model_trained_on_one_device_embeds_on_another(trained):
    adata, model = trained
    on_gpu = dfm.tl.embed(adata, model=model, device="cuda", copy=True, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    back = dfm.tl.embed(adata, model=model, device="cpu", copy=True, progress=False)
    np.testing.assert_allclose(on_gpu.obsm["X_dfm"], adata.obsm["X_dfm"], atol=1e-4)
    np.testing.assert_allclose(back.obsm["X_dfm"], adata.obsm["X_dfm"], atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_load_model_on_an_absent_gpu_says_so_like_embed(trained, tmp_path):
    path = dfm.tl.save_model(trained[1], tmp_path / "m")
    with pytest.raises(ValueError, match=r"device='cuda' was requested but torch sees no CUDA GPU.*device='cpu'"):
        dfm.tl.load_model(path, device="cuda")
    assert next(dfm.tl.load_model(path, device="auto").parameters()).device.type == "cpu"


def test_the_record_of_a_transfer_names_the_model_and_no_training_settings(trained, tmp_path):
    adata, model = trained
    file = dfm.tl.save_model(model, tmp_path / "m73")
    again = adata.copy()
    dfm.tl.embed(again, model=tmp_path / "m73")  # the name given to save_model: the file read is recorded
    params = again.uns["dfm"]["params"]
    assert params["preset"] == "model" and params["model_file"] == str(file.resolve())
    assert params["model_fingerprint"] == adata.uns["dfm"]["params"]["model_fingerprint"]  # the model trained there
    assert len(params["model_fingerprint"]) == 64
    # nothing drawn, nothing trained ("None": the record is written as write_h5ad stores it)
    assert params["seed"] == "None" and params["mask_ratio"] == "None"
    assert adata.uns["dfm"]["params"]["model_file"] == "None" and adata.uns["dfm"]["params"]["seed"] != "None"
    dfm.tl.embed(again, model=model, key_added="X_object")  # a model object: no file, the same fingerprint
    assert again.uns["X_object"]["params"]["model_file"] == "None"
    assert again.uns["X_object"]["params"]["model_fingerprint"] == params["model_fingerprint"]
    other = dfm.tl.embed(adata.copy(), **{**QUICK, "d_model": 8}, return_model=True, copy=True)[0]
    assert other.uns["dfm"]["params"]["model_fingerprint"] != params["model_fingerprint"]
    rescaled = copy.deepcopy(model)  # the same weights, another token scale: another embedding, another fingerprint
    rescaled.config.extra["token_scale"] *= 3
    assert model_fingerprint(rescaled) != model_fingerprint(model)


def test_model_arguments_of_another_type_are_refused_clearly(trained, tmp_path):
    adata, _ = trained
    for wrong in (3, {"weights": 1}):
        with pytest.raises(TypeError, match=r"model= takes a trained model .* got (int|dict)"):
            dfm.tl.embed(adata.copy(), model=wrong)
    with pytest.raises(TypeError, match=r"save_model saves a model of dfm\.tl\.embed .* got str"):
        dfm.tl.save_model("hello", tmp_path / "m")


# --- pp.coarsen -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["log-normalised", "rounded", "normalised"])
def test_coarsen_refuses_what_is_not_counts_and_sums_a_counts_layer(crop, kind):
    crop.layers["counts"] = crop.X.copy()
    sc.pp.normalize_total(crop)
    if kind != "normalised":
        sc.pp.log1p(crop)
    if kind == "log-normalised":  # log-normalised counts: summed as the counts they are taken back to
        np.testing.assert_array_equal(
            dfm.pp.coarsen(crop, 2).X.toarray(), dfm.pp.coarsen(crop, 2, layer="counts").X.toarray()
        )
        return
    if kind == "rounded":
        crop.X.data = np.round(crop.X.data, 2)  # the counts cannot be recovered
    with pytest.raises(ValueError, match=r"adata\.X holds non-integer values.*layer='counts'"):
        dfm.pp.coarsen(crop, 2)
    coarse = dfm.pp.coarsen(crop, 2, layer="counts")
    assert coarse.X.sum() == pytest.approx(crop.layers["counts"].sum(), rel=1e-6)
    assert "log1p" not in coarse.uns  # X of the result holds counts, not log values
    assert coarse.layers.keys() == set() and np.array_equal(coarse.X.data, np.round(coarse.X.data))


def test_coarsen_warns_about_slices_pooled_without_a_key(crop):
    """Two slices joined by anndata.concat share grid cells: without library_key their counts go into one bin."""
    pooled = ad.concat({"a": crop, "b": crop}, label="library", index_unique="-")
    with pytest.warns(UserWarning, match=r"same coordinates .* summed into the same bins.*to dfm\.pp\.coarsen") as w:
        mixed = dfm.pp.coarsen(pooled, 2)
    assert warned_at(w, "summed into the same bins", __file__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        apart = dfm.pp.coarsen(pooled, 2, library_key="library")
    assert apart.n_obs == 2 * mixed.n_obs == 2 * dfm.pp.coarsen(crop, 2).n_obs


def test_coarsen_of_log_normalised_counts_names_the_spots_whose_counts_may_be_low(crop):
    panel = crop[:, :20].copy()  # 20 genes: some spots express one or two of them only
    panel = panel[np.asarray(panel.X.sum(axis=1)).ravel() > 0].copy()
    few = int((np.diff(panel.X.tocsr().indptr) <= 2).sum())
    assert few > 0
    sc.pp.normalize_total(panel)
    sc.pp.log1p(panel)
    with pytest.warns(UserWarning, match=f"up to a factor per spot .* {few} spots express at most 2 genes.*'counts'"):
        dfm.pp.coarsen(panel, 2)
    # a toy of four spots without a single-gene one: counts sharing a factor (2 and 4; 3 and 6) were summed low silently
    toy = ad.AnnData(
        sp.csr_matrix(np.array([[2, 4, 0], [1, 2, 1], [3, 0, 6], [1, 1, 1]], dtype=np.float32)),
        obs=pd.DataFrame({"array_row": [0, 0, 1, 1], "array_col": [0, 2, 1, 3]}, index=list("abcd")),
    )
    sc.pp.normalize_total(toy)
    sc.pp.log1p(toy)
    with pytest.warns(UserWarning, match="2 spots express at most 2 genes"):
        dfm.pp.coarsen(toy, 4)
    full = crop.copy()  # every gene: no spot with two genes or fewer, the counts exact, nothing to warn about
    sc.pp.normalize_total(full)
    sc.pp.log1p(full)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dfm.pp.coarsen(full, 2)


def test_coarsen_carries_text_and_boolean_labels_and_says_what_it_replaces(crop, info_log):
    text = crop.obs["layer"].astype(object).to_numpy()
    text[::5] = np.nan  # labels read from a CSV: text, NaN where a spot has none
    crop.obs["text"] = text
    assert crop.obs["text"].dtype == object
    crop.obs["in_layer3"] = (crop.obs["layer"] == "Layer3").to_numpy()
    crop.obs["n_spots"] = 7  # the user's own column of that name
    crop.obs["score"] = 0.5
    coarse = dfm.pp.coarsen(crop, 2)
    agree = (coarse.obs["text"].astype(str) == coarse.obs["layer"].astype(str)).mean()
    assert agree > 0.9 and isinstance(coarse.obs["text"].dtype, pd.CategoricalDtype)  # the majority of the labels
    assert isinstance(coarse.obs["in_layer3"].dtype, pd.CategoricalDtype)
    assert ((coarse.obs["in_layer3"] == True) == (coarse.obs["layer"] == "Layer3")).all()  # noqa: E712
    assert coarse.obs["n_spots"].sum() == crop.n_obs and "score" not in coarse.obs
    assert "numeric obs columns ['score']" in info_log.getvalue()
    assert "obs['n_spots'] (replaced by the number of spots per bin)" in info_log.getvalue()


def test_coarsen_names_the_available_layers_for_a_missing_one(crop):
    crop.layers["raw"] = crop.X.copy()
    with pytest.raises(KeyError, match=r"layer='counts' is not in adata\.layers; available layers: \['raw'\]"):
        dfm.pp.coarsen(crop, 2, layer="counts")


@pytest.mark.parametrize(
    ("factor", "error", "message"),
    [
        (1, ValueError, r"factor=1 would give back the slice itself"),
        (True, TypeError, r"whole number >= 2.*got True"),
        (0, ValueError, r">= 2.*got 0"),
        (2.5, ValueError, r"whole number >= 2.*got 2\.5"),
        ("2", TypeError, r"whole number >= 2.*got '2'"),
    ],
)
def test_coarsen_factor_must_be_a_whole_number_of_at_least_two(crop, factor, error, message):
    with pytest.raises(error, match=message):
        dfm.pp.coarsen(crop, factor)


@pytest.mark.parametrize("factor", [2, 4])
def test_coarse_bins_are_drawn_as_wide_as_they_are(crop, factor):
    fine = crop.uns["spatial"]["151673"]["scalefactors"]["spot_diameter_fullres"]
    coarse = dfm.pp.coarsen(crop, factor)
    assert coarse.uns["spatial"]["151673"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(factor * fine)
    assert crop.uns["spatial"]["151673"]["scalefactors"]["spot_diameter_fullres"] == fine  # the input untouched
    assert (
        coarse.uns["spatial"]["151673"]["images"]["lowres"].shape
        == crop.uns["spatial"]["151673"]["images"]["lowres"].shape
    )


def test_coarsen_deep_copies_uns_without_the_records_of_the_fine_spots(trained, info_log):
    adata = trained[0].copy()
    dfm.tl.cluster(adata, n_clusters=3)
    adata.obs["depth_um"] = adata.obs["array_row"] * 100.0  # a numeric column: not a label, dropped
    assert {"dfm", "dfm_order", "dfm_domain"} <= set(adata.uns)
    coarse = dfm.pp.coarsen(adata, 2)
    assert not {"dfm", "dfm_order", "dfm_domain"} & set(coarse.uns)
    assert coarse.uns["dfm_coarsen"]["params"]["factor"] == 2
    assert coarse.uns["source"] == adata.uns["source"]
    # the tissue image and scale factors are kept, as copies
    lib, fine = coarse.uns["spatial"]["151673"], adata.uns["spatial"]["151673"]
    np.testing.assert_array_equal(lib["images"]["lowres"], fine["images"]["lowres"])
    lib["images"]["lowres"][:] = 0
    lib["scalefactors"]["tissue_lowres_scalef"] = -1.0
    assert fine["images"]["lowres"].any() and fine["scalefactors"]["tissue_lowres_scalef"] > 0
    # label columns are kept as majority labels; numeric ones are dropped, and the info message says which
    assert {"layer", "sample_id"} <= set(coarse.obs) and "depth_um" not in coarse.obs
    log = info_log.getvalue()
    assert "depth_um" in log and "dfm_order" in log and "'dfm'" in log
    # the stale serialization is gone, so embedding the bins asks for serialize instead of reusing the fine order
    with pytest.raises(KeyError, match=r"run dfm\.pp\.serialize"):
        dfm.tl.embed(coarse, model=trained[1], progress=False, device="cpu")


# --- datasets ---------------------------------------------------------------------------------------------------------


def test_dlpfc_warns_when_the_file_holds_another_sample(tmp_path):
    file = tmp_path / "dlpfc_151674.h5ad"
    dfm.datasets.dlpfc_151673_hvg().write_h5ad(file)  # sample 151673 under the name of another
    with pytest.warns(
        UserWarning, match=r"holds DLPFC sample 151673 \(from obs\['sample_id'\]\), not .*'151674'"
    ) as caught:
        adata = dfm.datasets.dlpfc("151674", path=tmp_path)
    assert warned_at(caught, "holds DLPFC sample", __file__)  # points at the user's call
    assert adata.n_obs == 3639
    with pytest.warns(UserWarning, match=r"not the requested DLPFC sample '151674'") as caught:
        dfm.datasets.dlpfc(151674, path=file)
    assert warned_at(caught, "holds DLPFC sample", __file__)


def test_dlpfc_reads_the_right_sample_without_a_warning(tmp_path, recwarn):
    file = tmp_path / "dlpfc_151673.h5ad"
    dfm.datasets.dlpfc_151673_hvg().write_h5ad(file)
    dfm.datasets.dlpfc(151673, path=file)
    dfm.datasets.dlpfc("151673", path=tmp_path)
    assert not [w for w in recwarn if "holds DLPFC sample" in str(w.message)]


def test_her2st_warns_when_the_file_holds_another_section():
    b1 = shared_path("her2st", "her2st_B1.h5ad")
    with pytest.warns(UserWarning, match=r"holds her2st section B1 \(from uns\['source'\]\), not .*'A1'") as caught:
        dfm.datasets.her2st("A1", path=b1)
    assert warned_at(caught, "holds her2st section", __file__)  # points at the user's call


def test_a_wrong_id_in_a_folder_lists_the_files_and_the_valid_ids(tmp_path):
    (tmp_path / "dlpfc").mkdir()
    dfm.datasets.dlpfc_151673_hvg().write_h5ad(tmp_path / "dlpfc" / "dlpfc_151673.h5ad")
    with pytest.raises(FileNotFoundError, match=r"No dlpfc_999\.h5ad") as err:
        dfm.datasets.dlpfc("999", path=tmp_path)
    assert "dlpfc/dlpfc_151673.h5ad" in str(err.value)
    assert all(sid in str(err.value) for sid in dfm.datasets.DLPFC_SAMPLES)
    with pytest.raises(FileNotFoundError, match=r"no her2st_\*\.h5ad file there.*'A1', 'B1'"):
        dfm.datasets.her2st("Z9", path=tmp_path)


def test_a_path_to_a_file_that_is_not_h5ad_is_named_in_a_clear_error(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# not an h5ad file\n")
    for load in (dfm.datasets.dlpfc, dfm.datasets.her2st):
        with pytest.raises(ValueError, match=re.escape(f"{notes} is not a readable .h5ad file")):
            load(path=notes)


def _offline(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host of {url} (offline)")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests, "head", no_network)


@pytest.mark.parametrize(("load", "arg"), [(dfm.datasets.dlpfc, "151673"), (dfm.datasets.her2st, "A1")])
def test_an_offline_download_says_how_to_load_locally_and_leaves_no_empty_cache(monkeypatch, tmp_path, load, arg):
    _offline(monkeypatch)
    cache = tmp_path / "cache" / "dfm"
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(cache))
    with pytest.raises(OSError, match=r"Could not download .*ConnectionError.*path=.*\$DFMAMBA_ST_DATA") as err:
        load(arg)
    assert isinstance(err.value.__cause__, requests.exceptions.ConnectionError)
    assert list(tmp_path.iterdir()) == []  # the cache folders pooch made for the failed download are gone


def test_a_cached_file_that_fails_its_checksum_offline_is_named_as_such(monkeypatch, tmp_path):
    _offline(monkeypatch)
    (tmp_path / "her2st").mkdir()
    (tmp_path / "her2st" / "A1.tsv.gz").write_bytes(b"<html>an error page saved as the counts</html>")
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path))
    with pytest.raises(OSError, match=r"A1\.tsv\.gz does not match its checksum .* Replace it with the original"):
        dfm.datasets.her2st("A1")


def test_a_count_matrix_that_is_no_10x_file_is_named_with_what_to_do(tmp_path):
    broken = tmp_path / "151673_filtered_feature_bc_matrix.h5"
    broken.write_bytes(b"<html>an error page saved as the matrix</html>")
    with pytest.raises(ValueError, match=r"151673_filtered_feature_bc_matrix\.h5 is not a readable 10x .*delete it"):
        dfm.datasets.read_dlpfc_raw(broken, tmp_path / "positions.txt", tmp_path / "layers.tsv", sample_id="151673")


def test_a_cache_folder_that_cannot_be_made_is_named_as_such_not_as_a_network_failure(monkeypatch, tmp_path):
    """Audit s46, B6: $DFMAMBA_ST_DATA naming a file was reported as a failed download, pointing at the network."""
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path / "a_file"))
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("no download should be tried"))
    with pytest.raises(OSError, match=r"cache folder .*a_file/her2st cannot be created .*set \$DFMAMBA_ST_DATA"):
        dfm.datasets.her2st("A1")


def test_a_cached_file_without_a_checksum_is_not_hashed_again(monkeypatch, tmp_path):
    """Audit s46, B7: a cached file without a published checksum was read whole and logged as downloaded on every
    call."""
    from dfmamba_st import datasets

    _offline(monkeypatch)
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "matrix.h5").write_bytes(b"cached")
    hashed = []
    monkeypatch.setattr(datasets, "_sha256", lambda path: hashed.append(path) or "0" * 64)
    files = {"matrix.h5": ("https://example.org/matrix.h5", None)}
    assert datasets._download(files, "sub", offline_hint="-") == {"matrix.h5": tmp_path / "sub" / "matrix.h5"}
    assert hashed == []


def test_an_hdf5_file_that_is_no_anndata_is_named_with_what_to_read_it_with(tmp_path):
    """Audit s46, B1: a Space Ranger matrix given as path= failed with anndata's TypeError."""
    import h5py

    matrix = tmp_path / "151673_filtered_feature_bc_matrix.h5"
    with h5py.File(matrix, "w") as f:
        f.create_group("matrix").create_dataset("data", data=np.arange(3))
    with pytest.raises(ValueError, match=r"is not a readable \.h5ad file .*Space Ranger matrix .*read_dlpfc_raw"):
        dfm.datasets.dlpfc("151673", path=matrix)
    with pytest.raises(ValueError, match=r"path= is empty"):
        dfm.datasets.dlpfc("151673", path="")


def test_an_offline_download_keeps_an_existing_cache_folder(monkeypatch, tmp_path):
    _offline(monkeypatch)
    (tmp_path / "her2st").mkdir()
    (tmp_path / "her2st" / "keep.txt").write_text("a file of the user")
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path))
    with pytest.raises(OSError, match=r"her2st\('A1', path="):
        dfm.datasets.her2st("A1")
    assert (tmp_path / "her2st" / "keep.txt").is_file()
