"""Large-tissue paths on the bundled real slice (DLPFC 151673): tiled inference, bounded fits, cells without a grid,
data-parallel training with torch.distributed (gloo, 2 CPU processes)."""

import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest
import torch
from _shared import model_tokens
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsClassifier

import dfmamba_st as dfm
from dfmamba_st.core import curves
from dfmamba_st.tl import _cluster, _embed, _features

SMALL = dict(n_top_genes=300, d_model=16, epochs=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def trained():
    adata = dfm.datasets.dlpfc_151673_hvg()
    dfm.pp.serialize(adata)
    model = dfm.tl.embed(adata, epochs=3, progress=False, device="cpu", return_model=True)
    return adata, model


@pytest.mark.parametrize(
    ("n", "tile", "align", "min_length"),
    [
        (10, 64, 8, 1),
        (64, 64, 8, 32),
        (1000, 64, 8, 1),
        (1000, 64, 8, 64),
        (3639, 512, 8, 32),
        (65, 16, 16, 32),
        (321, 32, 8, 32),
        (100, 16, 8, 40),  # tiles shorter than min_length: the first one's context reaches forward
    ],
)
def test_tiles_partition_the_sequence_on_aligned_boundaries(n, tile, align, min_length):
    tiles = _embed._tiles(n, tile, align, min_length)
    kept = np.concatenate([np.arange(keep_begin, keep_end) for _, _, keep_begin, keep_end in tiles])
    assert np.array_equal(kept, np.arange(n))
    overlap = max(align, tile // 8 // align * align)
    for begin, end, keep_begin, keep_end in tiles:
        assert 0 <= begin <= keep_begin < keep_end <= end <= n
        assert begin % align == 0 and keep_begin % align == 0
        # long enough to reach the deepest level (the last tile's context reaches further back when it is short)
        assert end - begin >= min(n, min_length)
        assert end - begin <= max(tile + 2 * overlap, min_length + align)
        # context on both sides unless cut at an end
        assert keep_begin - begin >= (min(keep_begin, overlap) if n > tile else 0)
        assert end - keep_end >= min(n - keep_end, overlap)


def test_tiled_inference_matches_the_whole_sequence(trained, monkeypatch):
    """3,639 spots in tiles of 256 with 32 spots of context: 14 seams per curve, and the error stays small (measured:
    0.0035 relative, gates 0.0006 apart), well below that of the same tiles without their context (0.011, 0.008)."""
    adata, model = trained
    token_t, libraries = model_tokens(adata, model)
    cpu = torch.device("cpu")
    whole, whole_gates = _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=8192)
    tiled, tiled_gates = _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=256)
    error = np.linalg.norm(tiled - whole) / np.linalg.norm(whole)
    assert error < 0.007
    assert np.nanmax(np.abs(tiled_gates - whole_gates)) < 0.004
    assert np.isfinite(tiled).all() and not np.isnan(tiled_gates).any()
    tiles = _embed._tiles
    monkeypatch.setattr(_embed, "_tiles", lambda *a: [(kb, ke, kb, ke) for _, _, kb, ke in tiles(*a)])
    bare, _ = _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=256)
    assert error < 0.5 * np.linalg.norm(bare - whole) / np.linalg.norm(whole)


def test_tiled_inference_shows_a_progress_bar_over_its_batches(trained, monkeypatch, capsys):
    adata, model = trained
    token_t, libraries = model_tokens(adata, model)
    cpu = torch.device("cpu")
    _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=8192, progress=True)
    assert "reading the tissue" not in capsys.readouterr().err  # the whole tissue in one batch: no bar
    tiled, _ = _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=256, progress=True)
    assert "dfm.tl.embed: reading the tissue" in capsys.readouterr().err  # tiles of three lengths: three batches
    monkeypatch.setattr(_embed, "INFER_BUDGET", 1)  # a tile per batch
    one_by_one, _ = _embed._infer(model, token_t, libraries, adata.n_obs, cpu, tile_size=256, progress=False)
    assert "reading the tissue" not in capsys.readouterr().err
    np.testing.assert_allclose(one_by_one, tiled, atol=1e-5)  # batching changes nothing


def test_embed_tile_size_keeps_the_domains(trained):
    adata, model = trained
    tiled = adata.copy()
    dfm.tl.embed(tiled, model=model, tile_size=512, progress=False)
    assert tiled.uns["dfm"]["params"]["tile_size"] == 512
    # one mixture (tl.cluster's, fitted on the untiled embedding) labels both embeddings. Two separate fits would
    # measure the GMM, not the tiling: on this embedding it has two optima 0.03 apart in mean log-likelihood
    # (partitions 0.91 apart in ARI), and an embedding 0.002 away can tip a fit from one to the other
    whole = adata.obsm["X_dfm"]
    pca = PCA(20, random_state=0).fit(whole - whole.mean(axis=0))
    gmm = _cluster._gmm(pca.transform(whole - whole.mean(axis=0)), 7, 0)
    labels = [gmm.predict(pca.transform(emb - whole.mean(axis=0))) for emb in (whole, tiled.obsm["X_dfm"])]
    assert adjusted_rand_score(*labels) > 0.98
    with pytest.raises(ValueError, match="multiple of 2"):
        dfm.tl.embed(adata.copy(), model=model, tile_size=100, progress=False)
    depth = model.config.depth
    least = model.config.min_len * 2 ** (depth - 1)
    with pytest.raises(ValueError, match=rf"at least min_len \* 2\*\*\(depth - 1\) = {least} \(a shorter tile"):
        dfm.tl.embed(adata.copy(), model=model, tile_size=least - 2**depth, progress=False)  # left NaN gates
    shortest = adata.copy()
    dfm.tl.embed(shortest, model=model, tile_size=least, progress=False)
    assert np.isfinite(shortest.obsm["X_dfm_gates"]).all()
    again = adata.copy()
    dfm.tl.embed(again, model=model, tile_size=float(least), progress=False)  # whole floats: as every size
    np.testing.assert_array_equal(again.obsm["X_dfm"], shortest.obsm["X_dfm"])


def test_the_last_tile_reaches_the_deepest_level_too(bundled):
    """321 spots in tiles of 32 (the shortest allowed at depth 3) on one curve: the last tile, 1 spot kept, once had
    9 positions of context and no gate at depths 1 and 2."""
    adata = bundled[:321].copy()
    dfm.pp.serialize(adata)
    options = dict(epochs=1, d_model=8, depth=3, n_top_genes=100, n_pcs=10, extra_curves=(), progress=False)
    model = dfm.tl.embed(adata, **options, return_model=True)  # one tile: the whole sequence
    assert adata.uns["dfm"]["params"]["curves"] == ["hilbert"]
    dfm.tl.embed(adata, model=model, tile_size=32, key_added="X_tiled")
    assert np.isfinite(adata.obsm["X_dfm_gates"]).all() and np.isfinite(adata.obsm["X_tiled_gates"]).all()


def test_features_are_computed_in_chunks_and_fitted_on_a_subset(monkeypatch, trained):
    adata, model = trained
    whole, _ = model.features.transform(adata)
    monkeypatch.setattr(_features, "CHUNK_SPOTS", 500)
    chunked, _ = model.features.transform(adata)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    # standardisation/PCA fitted on 1,500 random spots: the leading principal axes match those of all 3,639
    # (measured cosines of the principal angles 0.99, 0.98, 0.91, 0.84, 0.82: later axes are noisier)
    monkeypatch.setattr(_features, "MAX_FIT_SPOTS", 1500)
    sub = _features.FeatureTransform.fit(adata, layer=None, n_top_genes=3000, n_pcs=10, seed=0)
    monkeypatch.setattr(_features, "MAX_FIT_SPOTS", 50_000)
    full = _features.FeatureTransform.fit(adata, layer=None, n_top_genes=3000, n_pcs=10, seed=0)
    cosines = np.linalg.svd(full.loadings.T @ sub.loadings, compute_uv=False)
    assert cosines[:3].min() > 0.9 and cosines[:5].min() > 0.7


def test_cluster_fits_on_a_subset_and_predicts_every_spot(monkeypatch, trained):
    adata, _ = trained
    ref = adata.copy()
    dfm.tl.cluster(ref, 7)
    monkeypatch.setattr(_cluster, "MAX_FIT_SPOTS", 1200)
    sub = adata.copy()
    dfm.tl.cluster(sub, 7)
    assert sub.obs["dfm_domain"].notna().all() and sub.obs["dfm_domain"].cat.categories.size == 7
    # a third of the spots gives domains that agree with those fitted on all of them and match the layers well above
    # expression alone (PCA -> GMM scores 0.37 on this slice). The fits land in different local optima of the GMM, so
    # the two scores differ either way (subset minus full fit measured from -0.12 to +0.13 over subset sizes).
    assert adjusted_rand_score(ref.obs["dfm_domain"], sub.obs["dfm_domain"]) > 0.5
    assert dfm.metrics.evaluate(sub, "layer")["ari"].iloc[0] > 0.42
    # Leiden on the subset, the rest labelled by nearest neighbours: real domains, well above chance
    dfm.tl.cluster(sub, 7, method="leiden", key_added="leiden")
    assert sub.obs["leiden"].notna().all()
    assert dfm.metrics.evaluate(sub, "layer", pred_key="leiden")["ari"].iloc[0] > 0.3


def test_spots_of_the_fitted_subset_keep_their_own_labels_and_the_rest_take_their_neighbours():
    rng = np.random.default_rng(0)
    rep = rng.normal(size=(300, 3))
    fit_rows = np.sort(rng.choice(300, 100, replace=False))
    own = rng.integers(0, 4, 100)  # random labels: a spot's neighbours in the sample often vote for another
    labels = _cluster._extend_labels(rep[fit_rows], own, rep, fit_rows)
    np.testing.assert_array_equal(labels[fit_rows], own)
    rest = np.setdiff1d(np.arange(300), fit_rows)
    vote = KNeighborsClassifier(15).fit(rep[fit_rows], own).predict(rep[rest])
    np.testing.assert_array_equal(labels[rest], vote)


@pytest.mark.filterwarnings("ignore:.* spots have the same coordinates:UserWarning")  # the test stacks spots on purpose
def test_cluster_holds_no_reordered_copy_of_the_embedding(trained):
    # tl.cluster fits in curve order; it reordered a copy of the whole embedding first, an N x d array held through
    # the fit (+0.42 GB on a million spots). Python-traced peak of the call over the embedding's size: 5.06 then, 4.08
    # now
    import tracemalloc

    adata, _ = trained
    cells = _as_cells(adata, per_spot=12)  # 43,668 cells (below MAX_FIT_SPOTS: every cell in the fit)
    rows = np.repeat(np.arange(adata.n_obs), 12)
    noise = np.random.default_rng(0).normal(scale=0.1, size=(rows.size, adata.obsm["X_dfm"].shape[1]))
    cells.obsm["X_dfm"] = (adata.obsm["X_dfm"][rows] + noise).astype(np.float32)
    dfm.pp.serialize(cells)
    tracemalloc.start()
    try:
        dfm.tl.cluster(cells, 7, n_init=1, refine=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ratio = peak / cells.obsm["X_dfm"].nbytes
    assert ratio < 4.5, ratio


def _as_cells(adata, per_spot=3, seed=0):
    """Single-cell-like data from the real slice: several points per spot, no grid, some on identical positions."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(adata.n_obs), per_spot)
    obs = adata.obs.iloc[rows].drop(columns=["array_row", "array_col"])
    obs.index = [f"cell{i}" for i in range(rows.size)]
    spatial = adata.obsm["spatial"][rows] + rng.normal(scale=20.0, size=(rows.size, 2))
    cells = ad.AnnData(adata.X[rows], obs=obs, var=adata.var, obsm={"spatial": spatial})
    cells.obsm["spatial"][1] = cells.obsm["spatial"][0]  # one exact tie
    return cells


def test_cells_without_a_grid_are_all_kept_in_a_deterministic_order(trained):
    adata, _ = trained
    cells = _as_cells(adata[:800])
    with pytest.warns(UserWarning, match="1 spots have the same coordinates"):
        dfm.pp.serialize(cells)
    params = cells.uns["dfm_order"]["params"]
    assert params["grid"] == "quantized" and params["n_spots_sharing_a_cell"] > 100
    assert np.array_equal(np.sort(cells.obs["dfm_order"]), np.arange(cells.n_obs))
    sequence = cells.obs_names[np.argsort(cells.obs["dfm_order"].to_numpy())]
    # the order follows the coordinates, not the rows of the AnnData (cells 0 and 1 tie exactly: input order)
    shuffled = cells[np.r_[0, 1, np.random.default_rng(1).permutation(np.arange(2, cells.n_obs))]].copy()
    with pytest.warns(UserWarning):
        dfm.pp.serialize(shuffled)
    assert np.array_equal(shuffled.obs_names[np.argsort(shuffled.obs["dfm_order"].to_numpy())], sequence)
    # consecutive cells along the curve are spatial neighbours: median step ≈ one cell
    xy = cells.obsm["spatial"][np.argsort(cells.obs["dfm_order"].to_numpy())]
    step = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    cell = np.sqrt(np.prod(np.ptp(xy, axis=0)) / cells.n_obs)
    assert np.median(step) < 1.5 * cell


def test_cells_sharing_a_quantised_cell_follow_the_curve_on_a_finer_grid(trained):
    (layout,) = dfm.pp.library_layouts(_as_cells(trained[0][:600]))
    sub = np.floor((layout.points - layout.cells) * 16).clip(0, 15)
    for curve in ("hilbert", "hilbert_t"):
        order = layout.order(curve)
        fine = curves.curve_index(sub[:, 0], sub[:, 1], curve)[order]
        shared = np.all(layout.cells[order][1:] == layout.cells[order][:-1], axis=1)
        assert shared.sum() > 100
        assert np.all(np.diff(fine)[shared] >= 0)


WORKER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch
    import torch.distributed as dist

    import dfmamba_st as dfm

    torch.set_num_threads(1)
    distributed = sys.argv[2] == "ddp"
    if distributed:
        dist.init_process_group("gloo")
    adata = dfm.datasets.dlpfc_151673_hvg()
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, **{SMALL!r}, tile_size=1024)
    rank = dist.get_rank() if distributed else 0
    np.save(f"{{sys.argv[1]}}_{{rank}}.npy", adata.obsm["X_dfm"])
    np.save(f"{{sys.argv[1]}}_{{rank}}_loss.npy", adata.uns["dfm"]["history"]["train_loss"])
    assert adata.uns["dfm"]["params"]["world_size"] == (2 if distributed else 1)
    if distributed:
        dist.barrier()  # every rank done before any tears its connections down
        dist.destroy_process_group()
    """
)


def test_data_parallel_training_with_gloo_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(SMALL=SMALL))
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for cmd in (
        [*env_cmd, str(script), str(tmp_path / "ddp"), "ddp"],
        [sys.executable, str(script), str(tmp_path / "one"), "one"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1, single = (np.load(tmp_path / f"{name}.npy") for name in ("ddp_0", "ddp_1", "one_0"))
    np.testing.assert_array_equal(rank0, rank1)  # every rank ends with the same embedding
    assert np.linalg.norm(rank0 - single) / np.linalg.norm(single) < 1e-2
    np.testing.assert_allclose(np.load(tmp_path / "ddp_0_loss.npy"), np.load(tmp_path / "one_0_loss.npy"), rtol=1e-3)


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_windows_must_share_out_over_the_ranks(monkeypatch):
    adata = dfm.datasets.dlpfc_151673_hvg()[:300].copy()
    dfm.pp.serialize(adata)
    monkeypatch.setattr(_embed, "distributed_context", lambda: (0, 3))
    with pytest.raises(ValueError, match="cannot be shared out over 3 ranks"):
        dfm.tl.embed(adata, **SMALL)


def test_each_rank_trains_on_its_share_of_every_steps_windows(monkeypatch):
    """Of the 4 windows and masks of a step, rank r of 2 takes windows r and r + 2 (every rank draws them all)."""
    adata = dfm.datasets.dlpfc_151673_hvg()[:300].copy()
    dfm.pp.serialize(adata)
    first_batch = {}

    class Drawn(Exception):
        pass

    def first_batch_of(model, loss_fn, batches, **options):  # stands in for fit: no process group is needed
        first_batch[_embed.distributed_context()] = next(iter(batches(0)))
        raise Drawn

    monkeypatch.setattr(_embed, "fit", first_batch_of)
    for context in ((0, 1), (0, 2), (1, 2)):  # one process, then ranks 0 and 1 of 2
        monkeypatch.setattr(_embed, "distributed_context", lambda context=context: context)
        with pytest.raises(Drawn):
            dfm.tl.embed(adata, **SMALL)
    (windows, masks), *shares = first_batch.values()  # in that order
    assert windows.shape[0] == 4
    for rank, (rank_windows, rank_masks) in enumerate(shares):
        assert torch.equal(rank_windows, windows[rank::2]) and torch.equal(rank_masks, masks[rank::2])


def test_each_library_is_quantised_in_its_own_frame(trained):
    adata, _ = trained
    one = _as_cells(adata[:400], seed=1)
    two = one.copy()
    two.obsm["spatial"] = two.obsm["spatial"] * 7.0 + 1e6  # the same cells on another slide: other origin, units
    both = ad.concat({"a": one, "b": two}, label="slide", index_unique="-")
    first, second = dfm.pp.library_layouts(both, library_key="slide")
    assert np.mean(np.all(first.cells == second.cells, axis=1)) > 0.99  # same grid whatever the frame
    with pytest.warns(UserWarning, match="same coordinates"):
        dfm.pp.serialize(both, library_key="slide")
    order = {name: both.obs.loc[both.obs["slide"] == name, "dfm_order"].to_numpy() for name in ("a", "b")}
    assert np.array_equal(np.sort(order["a"]), np.arange(one.n_obs))
    assert np.mean(order["a"] == order["b"]) > 0.95
