"""Data sets: local files, the bundled slice, and the download path with the network layer replaced (no network)."""

import gzip
import hashlib
import importlib
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pooch
import pytest
from _shared import DATA as SHARED
from _shared import shared_path as _shared
from scipy import sparse

from dfmamba_st import datasets

LOWRES = SHARED / "dlpfc" / "lowres_images"


@pytest.fixture(scope="module")
def shared_151673() -> ad.AnnData:
    return ad.read_h5ad(_shared("dlpfc", "dlpfc_151673.h5ad"))


@pytest.fixture(scope="module")
def shared_a1() -> ad.AnnData:
    return ad.read_h5ad(_shared("her2st", "her2st_A1.h5ad"))


def _is_integer(X) -> bool:
    data = X.data if sparse.issparse(X) else np.asarray(X)
    return bool(np.array_equal(data, np.round(data)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["root", "subfolder", "file"])
def test_dlpfc_reads_the_shared_file_from_a_folder_or_a_file(where):
    root = _shared()
    path = {"root": root, "subfolder": root / "dlpfc", "file": root / "dlpfc" / "dlpfc_151673.h5ad"}[where]
    adata = datasets.dlpfc(151673, path=path)
    assert adata.shape == (3639, 7319)
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    assert adata.X.dtype == np.float32 and _is_integer(adata.X)
    assert list(adata.obs["layer"].cat.categories) == list(datasets.DLPFC_LAYERS)
    assert adata.obs["layer"].notna().sum() == 3611
    assert {"array_row", "array_col"} <= set(adata.obs)
    assert adata.obsm["spatial"].shape == (3639, 2)
    assert adata.uns["spatial"]["151673"]["images"]["lowres"].shape == (600, 600, 3)


def test_dlpfc_finds_a_suffixed_shared_file_by_sample_id():
    adata = datasets.dlpfc("151510", path=_shared())
    assert adata.shape == (4634, 500)  # dlpfc_151510_500genes_drsc.h5ad


def test_several_suffixed_files_of_one_sample_are_refused_not_one_picked(tmp_path):
    for name in ("dlpfc_151673_a.h5ad", "dlpfc_151673_b.h5ad"):
        (tmp_path / name).touch()
    with pytest.raises(ValueError, match=r"Several files match dlpfc_151673_\*\.h5ad"):
        datasets.dlpfc("151673", path=tmp_path)


def test_her2st_reads_the_shared_file_case_insensitively():
    adata = datasets.her2st("a1", path=_shared())
    assert adata.shape == (346, 15045)
    assert adata.obs["label"].value_counts()["undetermined"] == 5
    assert adata.obsm["spatial"].shape == (346, 2)
    assert _is_integer(adata.X)


def test_a_missing_local_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="dlpfc_151999"):
        datasets.dlpfc("151999", path=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# bundled slice
# ---------------------------------------------------------------------------------------------------------------
def test_bundled_slice_has_the_documented_layout_and_raw_counts():
    adata = datasets.dlpfc_151673_hvg()
    assert adata.shape == (3639, 3000)
    assert sparse.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert _is_integer(adata.X) and adata.X.min() >= 0 and adata.X.sum() > 1e6
    assert list(adata.obs["layer"].cat.categories) == list(datasets.DLPFC_LAYERS)
    assert adata.obs["layer"].notna().sum() == 3611
    assert {"array_row", "array_col", "sample_id"} <= set(adata.obs)
    assert {"gene_ids", "highly_variable_rank"} <= set(adata.var)
    assert adata.obsm["spatial"].shape == (3639, 2)
    lib = adata.uns["spatial"]["151673"]
    assert lib["images"]["lowres"].shape == (600, 600, 3) and lib["images"]["lowres"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    assert "Maynard" in adata.uns["source"] and "seurat_v3" in adata.uns["source"]


def test_bundled_slice_is_small_and_each_call_returns_a_new_object():
    path = Path(datasets.__file__).parent / "data" / "dlpfc_151673_hvg.h5ad"
    assert path.stat().st_size < 5_000_000
    first, second = datasets.dlpfc_151673_hvg(), datasets.dlpfc_151673_hvg()
    first.obs["layer"] = "x"
    assert second.obs["layer"].iloc[0] != "x"


def test_bundled_slice_is_the_shared_slice_cut_to_tl_embeds_genes(shared_151673):
    from dfmamba_st.tl._features import FeatureTransform, expression_matrix, top_genes

    bundled = datasets.dlpfc_151673_hvg()
    X, _, _ = expression_matrix(shared_151673, None)
    assert list(bundled.var_names) == top_genes(X, shared_151673.var_names, 3000, True)
    assert list(bundled.obs_names) == list(shared_151673.obs_names)
    assert (bundled.X != shared_151673[:, bundled.var_names].X).nnz == 0
    np.testing.assert_array_equal(bundled.obsm["spatial"], shared_151673.obsm["spatial"])
    # so tl.embed's features (and with them its embedding) are those of the full slice
    options = dict(layer=None, n_top_genes=3000, n_pcs=10, seed=0)
    on_full, on_bundled = FeatureTransform.fit(shared_151673, **options), FeatureTransform.fit(bundled, **options)
    assert on_full.genes == on_bundled.genes
    np.testing.assert_array_equal(on_full.transform(shared_151673)[0], on_bundled.transform(bundled)[0])


# ---------------------------------------------------------------------------------------------------------------
# download path, network replaced by local files
# ---------------------------------------------------------------------------------------------------------------
def _write_10x_h5(path: Path, adata: ad.AnnData) -> None:
    """Space Ranger v3 HDF5 layout (cells × genes CSR is genes × cells CSC)."""
    X = sparse.csr_matrix(adata.X)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(adata.obs_names, dtype="S"))
        m.create_dataset("data", data=X.data.astype(np.int32))
        m.create_dataset("indices", data=X.indices.astype(np.int64))
        m.create_dataset("indptr", data=X.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([X.shape[1], X.shape[0]], dtype=np.int32))
        g = m.create_group("features")
        g.create_dataset("id", data=np.array(adata.var["gene_ids"], dtype="S"))
        g.create_dataset("name", data=np.array(adata.var_names, dtype="S"))
        g.create_dataset("feature_type", data=np.array(["Gene Expression"] * X.shape[1], dtype="S"))
        g.create_dataset("genome", data=np.array(["GRCh38"] * X.shape[1], dtype="S"))
        g.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


@pytest.fixture
def dlpfc_raw_files(tmp_path, shared_151673) -> dict[str, Path]:
    """Raw files of 151673 in the public formats, made from the shared data.

    The count matrix (a gene subset) and positions are rewritten from the shared file; scale factors and the
    low-resolution image are the real public files (byte-identical to the HumanPilot ones).
    """
    a = shared_151673
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {"h5": raw / "151673_filtered_feature_bc_matrix.h5"}
    _write_10x_h5(files["h5"], a)
    # tissue_positions_list.txt: barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres
    pos = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": a.obs["array_row"],
            "array_col": a.obs["array_col"],
            "pxl_row": a.obsm["spatial"][:, 1].astype(int),
            "pxl_col": a.obsm["spatial"][:, 0].astype(int),
        },
        index=a.obs_names,
    )
    off_tissue = pd.DataFrame([[0, 0, 0, 10, 10]], index=["ZZZZ-1"], columns=pos.columns)
    files["positions"] = raw / "151673_tissue_positions_list.txt"
    # the spots in another order than the matrix's: the reader must match them by barcode
    pd.concat([off_tissue, pos.sample(frac=1, random_state=0)]).to_csv(files["positions"], header=False)
    # barcode_level_layer_map.tsv: barcode, sample, L1..L6/WM; no header; other samples' rows present too
    annotated = a.obs["layer"].dropna().astype(str)
    layer_map = pd.DataFrame(
        {"sample": "151673", "layer": annotated.str.replace("Layer", "L").to_numpy()}, index=annotated.index
    )
    decoy = pd.DataFrame({"sample": "151674", "layer": "WM"}, index=a.obs_names[:50])
    files["layers"] = raw / "barcode_level_layer_map.tsv"
    pd.concat([decoy, layer_map]).to_csv(files["layers"], sep="\t", header=False)
    for name in ("scalefactors_json.json", "tissue_lowres_image.png"):
        src = LOWRES / f"151673_{name}"
        if not src.is_file():
            pytest.skip(f"shared file {src} is not available")
        files[name] = raw / f"151673_{name}"
        shutil.copy(src, files[name])
    return files


def test_registry_hashes_match_the_real_public_files_in_the_shared_data():
    # the shared scale factors and images came from another mirror (DMGCN) of the same 10x outputs
    for sid in ("151510", "151673", "151674"):
        for name in ("scalefactors_json.json", "tissue_lowres_image.png"):
            url, known = datasets.dlpfc_urls(sid)[f"{sid}_{name}"]
            assert known == f"sha256:{_sha256(_shared('dlpfc', 'lowres_images', f'{sid}_{name}'))}"
            assert url.endswith(f"/10X/{sid}/{name}") and datasets._HUMANPILOT_COMMIT in url


def test_read_dlpfc_raw_rebuilds_the_shared_layout(dlpfc_raw_files, shared_151673):
    f = dlpfc_raw_files
    adata = datasets.read_dlpfc_raw(
        f["h5"],
        f["positions"],
        f["layers"],
        sample_id=151673,
        scalefactors=f["scalefactors_json.json"],
        lowres_image=f["tissue_lowres_image.png"],
    )
    _assert_same_as_shared(adata, shared_151673)
    # the reader's own per-spot totals are over the genes it read (the shared file's are over the whole transcriptome)
    np.testing.assert_array_equal(adata.obs["sum_umi_all_genes"], np.asarray(adata.X.sum(axis=1)).ravel().round())
    np.testing.assert_array_equal(adata.obs["sum_gene_all_genes"], np.diff(adata.X.indptr))


def test_read_dlpfc_raw_makes_repeated_gene_symbols_unique(dlpfc_raw_files, shared_151673, tmp_path):
    part = shared_151673[:, :50].copy()
    names = part.var_names.to_numpy().copy()
    names[1] = names[0]  # 10x references repeat some symbols
    part.var_names = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own note on the repeated name
        _write_10x_h5(tmp_path / "dup.h5", part)
        f = dlpfc_raw_files
        adata = datasets.read_dlpfc_raw(tmp_path / "dup.h5", f["positions"], f["layers"], sample_id="151673")
    assert adata.var_names.is_unique and adata.var_names[1] == f"{names[0]}-1"
    assert list(adata.var["gene_ids"]) == list(part.var["gene_ids"])


def _assert_same_as_shared(adata: ad.AnnData, shared: ad.AnnData) -> None:
    assert list(adata.obs_names) == list(shared.obs_names)
    assert list(adata.var_names) == list(shared.var_names)
    assert list(adata.var["gene_ids"]) == list(shared.var["gene_ids"])
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert (adata.X != shared.X).nnz == 0
    pd.testing.assert_series_equal(adata.obs["layer"], shared.obs["layer"])
    for key in ("array_row", "array_col", "in_tissue", "sample_id", "subject"):
        assert (adata.obs[key] == shared.obs[key]).all(), key
    np.testing.assert_array_equal(adata.obsm["spatial"], shared.obsm["spatial"])
    lib, ref = adata.uns["spatial"]["151673"], shared.uns["spatial"]["151673"]
    np.testing.assert_array_equal(lib["images"]["lowres"], ref["images"]["lowres"])
    assert lib["scalefactors"] == ref["scalefactors"]


def test_read_dlpfc_raw_refuses_positions_of_another_sample(dlpfc_raw_files, tmp_path):
    wrong = tmp_path / "wrong_positions.txt"
    wrong.write_text("AAAA-1,1,0,0,1,1\n")
    with pytest.raises(ValueError, match=r"are not in wrong_positions\.txt"):
        datasets.read_dlpfc_raw(dlpfc_raw_files["h5"], wrong, dlpfc_raw_files["layers"], sample_id="151673")


def _fake_retrieve(calls: list, local: dict[str, Path]):
    def retrieve(url, known_hash, fname=None, path=None, **kwargs):
        calls.append({"url": url, "known_hash": known_hash, "fname": fname, "path": Path(path)})
        return str(local[fname])

    return retrieve


def test_dlpfc_download_fetches_the_public_urls_with_their_hashes(
    dlpfc_raw_files, shared_151673, monkeypatch, tmp_path, info_log
):
    f = dlpfc_raw_files
    local = {
        "151673_filtered_feature_bc_matrix.h5": f["h5"],
        "151673_tissue_positions_list.txt": f["positions"],
        "151673_scalefactors_json.json": f["scalefactors_json.json"],
        "151673_tissue_lowres_image.png": f["tissue_lowres_image.png"],
        "barcode_level_layer_map.tsv": f["layers"],
    }
    calls: list = []
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(calls, local))
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path / "cache"))
    adata = datasets.dlpfc(151673)

    by_name = {c["fname"]: c for c in calls}
    assert set(by_name) == set(local)
    assert all(c["path"] == tmp_path / "cache" / "dlpfc" for c in calls)
    h5 = by_name["151673_filtered_feature_bc_matrix.h5"]
    assert h5["url"] == "https://spatial-dlpfc.s3.us-east-2.amazonaws.com/h5/151673_filtered_feature_bc_matrix.h5"
    assert h5["known_hash"] is None  # no checksum is published for the 10x matrices
    base = "https://raw.githubusercontent.com/LieberInstitute/HumanPilot/044446d6bd8fc154aa74f7be62ec67effb1ec376"
    assert by_name["151673_tissue_positions_list.txt"]["url"] == f"{base}/10X/151673/tissue_positions_list.txt"
    assert by_name["barcode_level_layer_map.tsv"]["url"] == f"{base}/10X/barcode_level_layer_map.tsv"
    for name in ("151673_tissue_positions_list.txt", "barcode_level_layer_map.tsv", "151673_tissue_lowres_image.png"):
        assert by_name[name]["known_hash"].startswith("sha256:") and len(by_name[name]["known_hash"]) == 71
    _assert_same_as_shared(adata, shared_151673)
    assert "spatial-dlpfc.s3.us-east-2.amazonaws.com" in adata.uns["source"]
    # the matrix has no published checksum: its sha256 is logged, so the download can be pinned afterwards
    sha = hashlib.sha256(Path(f["h5"]).read_bytes()).hexdigest()
    assert f"151673_filtered_feature_bc_matrix.h5 has no published checksum; sha256 of the downloaded file: {sha}" in (
        info_log.getvalue()
    )


def test_her2st_download_fetches_the_pinned_github_files_and_assembles_them(shared_a1, monkeypatch, tmp_path):
    a = shared_a1[:, :1500].copy()  # a gene subset keeps the test fast
    raw = tmp_path / "raw"
    raw.mkdir()
    counts = pd.DataFrame(a.X.toarray().astype(int), index=a.obs_names, columns=a.var_names)
    extra = pd.DataFrame(np.ones((1, a.n_vars), dtype=int), index=["99x99"], columns=a.var_names)  # unlabelled
    with gzip.open(raw / "A1.tsv.gz", "wt", compresslevel=1) as fh:
        pd.concat([counts, extra]).to_csv(fh, sep="\t")
    rng = np.random.default_rng(0)
    labels = pd.DataFrame(
        {
            "x": a.obs["array_x"] + rng.uniform(-0.3, 0.3, a.n_obs),  # labelled positions are off-grid
            "y": a.obs["array_y"] + rng.uniform(-0.3, 0.3, a.n_obs),
            "pixel_x": a.obsm["spatial"][:, 0],
            "pixel_y": a.obsm["spatial"][:, 1],
            "label": a.obs["label"].astype(str),
        }
    )
    labels.index = [f"{int(px)}x{int(py)}" for px, py in a.obsm["spatial"]]
    labels.index.name = "Row.names"
    # the labelled spots in another order than the counts': the reader must match them by position
    labels.sample(frac=1, random_state=0).to_csv(raw / "A1_labeled_coordinates.tsv", sep="\t")
    sel = pd.DataFrame({"x": a.obs["array_x"], "y": a.obs["array_y"], "selected": 1})
    sel.to_csv(raw / "A1_selection.tsv", sep="\t", index=False)

    calls: list = []
    local = {p.name: p for p in raw.iterdir()}
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(calls, local))
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path / "cache"))
    adata = datasets.her2st("A1")

    base = "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec"
    got = {c["fname"]: (c["url"], c["known_hash"]) for c in calls}
    assert got["A1.tsv.gz"] == (
        f"{base}/data/ST-cnts/A1.tsv.gz",
        "sha256:d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
    )
    assert got["A1_labeled_coordinates.tsv"][0] == f"{base}/data/ST-pat/lbl/A1_labeled_coordinates.tsv"
    assert got["A1_selection.tsv"][0] == f"{base}/data/ST-spotfiles/A1_selection.tsv"
    assert all(h.startswith("sha256:") for _, h in got.values())
    assert list(adata.obs_names) == list(a.obs_names)  # the unlabelled spot is dropped
    assert (adata.X != a.X).nnz == 0 and adata.X.dtype == np.float32
    assert (adata.obs["label"].astype(str) == a.obs["label"].astype(str)).all()
    assert (adata.obs[["array_x", "array_y"]].to_numpy() == a.obs[["array_x", "array_y"]].to_numpy()).all()
    assert adata.obs["in_selection_file"].all()
    np.testing.assert_allclose(adata.obsm["spatial"], a.obsm["spatial"])


def test_a_download_with_the_wrong_checksum_is_a_checksum_error_not_a_network_error(monkeypatch, tmp_path):
    import requests

    class Response:  # pooch really downloads these bytes, hashes them and rejects them
        status_code = 200

        def __init__(self):
            self.headers: dict = {}

        def raise_for_status(self):
            pass

        def iter_content(self, chunk_size=1024):
            yield b"not the file that was published"

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def close(self):
            pass

    monkeypatch.setattr(requests, "get", lambda *args, **kwargs: Response())
    monkeypatch.setattr(requests, "head", lambda *args, **kwargs: Response())
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="hash"):
        datasets.her2st("A1")


def test_a_local_file_without_the_annotation_or_coordinates_is_refused(shared_151673, shared_a1, tmp_path):
    adata = shared_151673[:50].copy()
    del adata.obs["layer"]
    adata.write_h5ad(tmp_path / "dlpfc_151673.h5ad")
    with pytest.raises(ValueError, match=r"lacks obs\['layer'\]"):
        datasets.dlpfc("151673", path=tmp_path)
    section = shared_a1.copy()
    del section.obsm["spatial"]
    section.write_h5ad(tmp_path / "her2st_A1.h5ad")
    with pytest.raises(ValueError, match=r"lacks obsm\['spatial'\]"):
        datasets.her2st("A1", path=tmp_path)


def test_unknown_sample_or_section_fails_before_any_download(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pooch.retrieve must not be called")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    with pytest.raises(ValueError, match="151673"):
        datasets.dlpfc("999999")
    with pytest.raises(ValueError, match="A1"):
        datasets.her2st("Z9")


def test_importing_the_module_downloads_nothing(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pooch.retrieve must not be called at import")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    importlib.reload(datasets)


def test_cache_folder_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DFMAMBA_ST_DATA", str(tmp_path))
    assert datasets.data_dir() == tmp_path
    monkeypatch.setenv("DFMAMBA_ST_DATA", "cache")  # relative: from the working folder of the call, kept absolute
    monkeypatch.chdir(tmp_path)
    assert datasets.data_dir() == tmp_path / "cache"
    monkeypatch.delenv("DFMAMBA_ST_DATA")
    assert datasets.data_dir() == Path(pooch.os_cache("dfmamba_st")).absolute()


def test_every_annotated_dlpfc_sample_and_her2st_section_has_urls_and_hashes():
    for sid in datasets.DLPFC_SAMPLES:
        files = datasets.dlpfc_urls(sid)
        assert len(files) == 5
        assert sum(h is None for _, h in files.values()) == 1  # only the 10x matrix lacks a checksum
    for sec in datasets.HER2ST_SECTIONS:
        assert all(h and len(h) == 71 for _, h in datasets.her2st_urls(sec).values())
