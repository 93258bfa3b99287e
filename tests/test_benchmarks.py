"""The benchmark scripts' own plumbing (DLPFC domains, several slices, GMM restarts, curve adjacency, tiling seams,
threads, pathology at scale, large tissues): which seeds and settings reach which step, what is timed, which score
lands in which column, and how each table is built.

The expensive parts (training, ``tl.embed``, subprocesses, busy-loop processes) are replaced by recorders, so each test
takes about a second; the real runs are the scripts themselves (``benchmarks/``).
"""

import argparse
import inspect
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from _shared import BENCHMARKS, DATA, QUICK, crop
from sklearn.metrics import adjusted_rand_score, completeness_score, normalized_mutual_info_score

import dfmamba_st as dfm

needs_data = pytest.mark.skipif(not (DATA / "dlpfc").exists(), reason="needs ../shared/data (real DLPFC slices)")


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _InProcessPool:
    """ProcessPoolExecutor stand-in: runs the job here, at submit."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args, **kwargs):
        return _Done(fn(*args, **kwargs))


def _layer_labels(adata, merge=()):
    """Predicted labels from the truth: missing truth → "x"; layers in ``merge`` become one label."""
    lab = adata.obs["truth"].astype(object).where(adata.obs["truth"].notna(), "x").astype(str)
    lab = lab.where(~lab.isin(list(merge)), "merged")
    return pd.Categorical(lab.to_numpy())


def _fake_cluster(record, merge=()):
    def cluster(adata, n_clusters=None, **kwargs):
        ordered = "dfm_order" in adata.obs  # serialized first: the GMM fits in curve order
        record.append(
            {
                "n_clusters": n_clusters,
                "n_obs": adata.n_obs,
                "X_base": adata.obsm.get("X_base"),
                "ordered": ordered,
                **kwargs,
            }
        )
        key = kwargs.get("key_added", "dfm_domain")
        adata.obs[key] = _layer_labels(adata, merge)
        _record_as_cluster(adata, key, n_clusters, kwargs.get("library_key"))

    return cluster


def _record_as_cluster(adata, key: str, n_clusters, library_key) -> None:
    """The record tl.cluster writes: the library key given, or else the one pp.serialize recorded."""
    serialized = adata.uns.get("dfm_order", {}).get("params", {})
    params = {"use_rep": "X_dfm", "method": "gmm", "n_clusters": n_clusters}
    adata.uns[key] = {"params": {**params, "library_key": library_key or serialized.get("library_key")}}


def _fake_rep(record):
    """``baseline_rep`` stand-in: records (kind, seed, library_key), returns zeros."""

    def rep(adata, kind, seed, library_key=None):
        record.append((kind, seed, library_key))
        return np.zeros((adata.n_obs, 3))

    return rep


def _stand_in_baseline_rep(monkeypatch, ms, record) -> None:
    """Replace ``baseline_rep`` where the baseline clustering of ``st_multislice`` (``cluster_baseline``) calls it."""
    monkeypatch.setattr(sys.modules[ms.cluster_baseline.__module__], "baseline_rep", _fake_rep(record))


def _slowed(fn, seconds=0.5):
    """``fn`` that first sleeps ``seconds``: a step the timer must leave out."""

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def _fake_embed(record):
    def embed(adata, **kwargs):
        record.append({"n_obs": adata.n_obs, **kwargs})
        adata.uns["dfm"] = {"missing_genes": ["g1", "g2"] if kwargs.get("model") is not None else []}
        return "MODEL" if kwargs.get("return_model") else None

    return embed


# --- benchmarks/st_dlpfc.py: _scores, _job --------------------------------------------------------------------------


def test_benchmark_scores_are_the_named_sklearn_scores_and_k_found_counts_predicted_domains(benchmark_module):
    bench = benchmark_module("st_dlpfc")
    adata, k = bench.load_slice(bench.slice_path("bundled"))
    adata.obs["pred"] = _layer_labels(adata, merge=("Layer1", "Layer2", "Layer3"))  # 5 layers + "x" (no truth)
    row = bench._scores(adata, "pred")
    scored = adata.obs["truth"].notna().to_numpy()
    truth, pred = adata.obs["truth"].astype(str)[scored], adata.obs["pred"].astype(str)[scored]
    assert row["k_found"] == 6 != k
    assert row["ari"] == pytest.approx(adjusted_rand_score(truth, pred))
    assert row["nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred))
    assert row["completeness"] == pytest.approx(completeness_score(truth, pred))
    assert row["completeness"] == pytest.approx(1.0) and row["nmi"] < 0.99  # merged layers: complete, not homogeneous


def test_benchmark_job_passes_seed_and_options_and_times_only_the_pipeline(
    benchmark_module, monkeypatch, keep_torch_threads
):
    """dfmamba_st and the baselines: the seed and --embed options reach tl.embed, the seed tl.cluster's random_state
    and baseline_rep; seconds exclude reading the slice and scoring; peak MB is this process's peak RSS in MB; the row
    keeps the truth's K when tl.cluster chooses K."""
    bench = benchmark_module("st_dlpfc")
    embeds, clusters, reps = [], [], []
    monkeypatch.setattr(dfm.tl, "embed", _fake_embed(embeds))
    monkeypatch.setattr(dfm.tl, "cluster", _fake_cluster(clusters))
    monkeypatch.setattr(bench, "baseline_rep", _fake_rep(reps))
    monkeypatch.setattr(bench, "load_slice", _slowed(bench.load_slice))
    monkeypatch.setattr(dfm.metrics, "evaluate", _slowed(dfm.metrics.evaluate))
    path = str(bench.slice_path("bundled"))
    row = bench._job("dfmamba_st", path, "bundled", 3, 1, {"epochs": 2, "n_pcs": None}, {"n_clusters": None})
    assert embeds[-1]["seed"] == 3 and embeds[-1]["epochs"] == 2 and embeds[-1]["n_pcs"] is None
    assert embeds[-1].get("model") is None
    assert clusters[-1]["random_state"] == 3 and clusters[-1]["n_clusters"] is None
    assert row["method"] == "dfmamba_st" and row["slice"] == "bundled" and row["seed"] == 3 and row["k"] == 7
    assert row["ari"] == pytest.approx(1.0) and row["k_found"] == 8  # the labels the fake clustering wrote
    assert 0 < row["seconds"] < 0.5  # neither the reading nor the scoring is timed
    rss_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert rss_now * 0.9 <= row["peak_mb"] <= rss_now * 1.1  # MB (Linux's ru_maxrss is in KiB)
    assert 0 <= row["pipeline_mb"] <= row["peak_mb"]
    assert row["torch_threads"] == 1 and row["numba_threads"] == 1  # every pool at --threads, numba's too
    for kind in ("pca_gmm", "pca_nbmean_gmm"):
        row = bench._job(kind, path, "bundled", 4, 1, {}, {})
        assert reps[-1][:2] == (kind, 4)
        assert clusters[-1]["random_state"] == 4 and clusters[-1]["use_rep"] == "X_base"
        assert clusters[-1]["n_clusters"] == 7 and clusters[-1]["refine"] is False
        assert clusters[-1]["ordered"]  # every method's GMM fits in curve order
        assert row["method"] == kind and row["seed"] == 4 and 0 < row["seconds"] < 0.5


def test_baseline_rep_is_scaled_log_normalised_genes_to_30_pcs_and_the_mean_over_19_spots(benchmark_module):
    """pca_gmm: normalize_total 1e4 → log1p → scale (max 10) → 30 PCs (seeded); pca_nbmean_gmm: the mean of those PCs
    over each spot and its 18 nearest spots. The reference is computed here, step by step (bundled slice: 3,000
    genes, no gene selection)."""
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    bench = benchmark_module("st_dlpfc")
    adata, _ = bench.load_slice(bench.slice_path("bundled"))
    adata = adata[:1500].copy()  # a part of the slice: quicker
    pcs = bench.baseline_rep(adata, "pca_gmm", 1)
    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.scale(work, max_value=10)
    ref = sc.pp.pca(work.X, n_comps=30, random_state=1)
    assert pcs.shape == ref.shape == (adata.n_obs, 30)
    signs = np.sign((pcs * ref).sum(0))
    np.testing.assert_allclose(pcs * signs, ref, rtol=1e-4, atol=1e-4)
    smoothed = bench.baseline_rep(adata, "pca_nbmean_gmm", 1)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    _, nbrs = NearestNeighbors(n_neighbors=19).fit(xy).kneighbors(xy)
    np.testing.assert_allclose(smoothed, pcs[nbrs].mean(1), rtol=1e-5, atol=1e-6)


def test_features_ablation_clusters_the_neighbourhood_half_of_tl_embeds_tokens(
    benchmark_module, monkeypatch, keep_torch_threads
):
    """dfm_features: the preset's spot features (3,000 HVGs → 50 PCs) averaged over tl.embed's default two rings of
    the grid graph (the second half of the "concat" tokens), not the spot's own features, clustered with refinement."""
    from dfmamba_st.pp import library_layouts
    from dfmamba_st.tl._features import FeatureTransform, smooth

    bench = benchmark_module("st_dlpfc")
    seen = {}

    def cluster(adata, n_clusters=None, **kwargs):
        seen["X"] = np.asarray(adata.obsm[kwargs["use_rep"]]).copy()
        seen["kwargs"] = kwargs
        adata.obs[kwargs.get("key_added", "dfm_domain")] = _layer_labels(adata)

    monkeypatch.setattr(dfm.tl, "cluster", cluster)
    path = str(bench.slice_path("bundled"))
    bench._job("dfm_features", path, "bundled", 0, 1, {}, {})
    adata, _ = bench.load_slice(path)
    transform = FeatureTransform.fit(adata, layer=None, n_top_genes=3000, n_pcs=50, seed=0, chosen=False)
    features, _ = transform.transform(adata)
    dfm.pp.serialize(adata)
    (layout,) = library_layouts(adata)
    expected = smooth(features, layout.graph(), 2)
    assert seen["X"].shape == (adata.n_obs, 50)
    np.testing.assert_allclose(seen["X"], expected, rtol=1e-5, atol=1e-5)
    assert "refine" not in seen["kwargs"] and seen["kwargs"]["random_state"] == 0


# --- benchmarks/st_dlpfc.py: main ---------------------------------------------------------------------------------


def test_dlpfc_benchmark_tables_are_the_jobs_rows_and_their_means_over_seeds(
    benchmark_module, monkeypatch, capsys, tmp_path
):
    bench = benchmark_module("st_dlpfc")
    calls, extra_calls = [], []
    ari = {0: 0.1, 1: 0.2, 5: 0.9}  # mean 0.4, median 0.2

    def fake_job(kind, path, slice_id, seed, threads, embed_options, cluster_options=None):
        calls.append((kind, path, slice_id, seed, threads, embed_options, cluster_options))
        shift = {"pca_gmm": 0.0, "pca_nbmean_gmm": 0.01, "dfmamba_st": 0.02}[kind] + (slice_id == "151674") * 0.03
        return {
            "method": kind,
            "slice": slice_id,
            "k": 7,
            "seed": seed,
            "k_found": 6 + seed % 3,
            "ari": ari[seed] + shift,
            "nmi": ari[seed] / 2 + shift,
            "completeness": ari[seed] / 3 + shift,
            "seconds": 10.0 * (seed + 1) + shift,
            "peak_mb": 100.0 * (seed + 1),
            "pipeline_mb": 50.0 * (seed + 1),
            "gpu_peak_mb": float("nan"),
        }

    def fake_extra(data_dir, seed, threads, embed_options, cluster_options=None):
        extra_calls.append((data_dir, seed, threads, embed_options, cluster_options))
        return [{"test": "native 151673", "ari": 0.5}]

    monkeypatch.setattr(bench, "_job", fake_job)
    monkeypatch.setattr(bench, "_extra", fake_extra)
    monkeypatch.setattr(bench.cf, "ProcessPoolExecutor", _InProcessPool)
    argv = ["--data-dir", str(tmp_path), "--slices", "151673", "151674", "--seeds", "0", "1", "5", "--threads", "3"]
    argv += ["--embed", "epochs=2", "--cluster", "tol=1e-6"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    methods = ["pca_gmm", "pca_nbmean_gmm", "dfmamba_st"]
    expected_calls = [
        (m, str(tmp_path / bench.FILES[s]), s, seed, 3, {"epochs": 2}, {"tol": 1e-6})
        for s in ("151673", "151674")
        for m in methods
        for seed in (0, 1, 5)
    ]
    assert calls == expected_calls
    rows = pd.DataFrame([fake_job(*c) for c in expected_calls])
    assert rows.round(3).to_string(index=False) in out  # the per-run table
    summary = bench.summarise(rows)
    assert summary.round(3).to_string() in out
    # seeds 0, 1, 5: ARI 0.1 / 0.2 / 0.9 (mean 0.4, median 0.2), K found 6 / 7 / 8, seconds 10 / 20 / 60, 100-600 MB
    got = summary.loc[("151673", 7, "pca_gmm")].drop("gpu_peak_mb_max").to_dict()
    expected = dict(k_found_min=6, k_found_max=8, ari_mean=0.4, ari_min=0.1, ari_max=0.9, nmi_mean=0.2)
    expected.update(completeness_mean=0.4 / 3, seconds_mean=30.0, peak_mb_max=600.0, pipeline_mb_max=300.0)
    assert got == pytest.approx(expected)
    assert summary.loc[("151674", 7, "dfmamba_st"), "ari_mean"] == pytest.approx(0.45)  # + 0.02 + 0.03
    assert summary.shape[0] == 6  # two slices, three methods
    # paired with the neighbour mean, seed for seed: pca_gmm -0.01, dfmamba_st +0.01 on every pair (SE 0)
    pairs = bench.paired(rows).set_index(["method", "slice"])
    assert pairs.round(4).reset_index().to_string(index=False) in out
    assert list(pairs.index) == [(m, s) for m in ("dfmamba_st", "pca_gmm") for s in ("151673", "151674", "all")]
    assert pairs.loc[("dfmamba_st", "all")].to_dict() == pytest.approx(
        dict(pairs=6, mean_diff=0.01, se=0.0, up=6, down=0), abs=1e-12
    )
    assert pairs.loc[("pca_gmm", "151673"), ["pairs", "mean_diff", "up", "down"]].tolist() == pytest.approx(
        [3, -0.01, 0, 3]
    )
    assert extra_calls == [(str(tmp_path), 0, 3, {"epochs": 2}, {"tol": 1e-6})]


def test_dlpfc_pairs_have_their_standard_error_and_skip_seeds_the_baseline_lacks(benchmark_module):
    bench = benchmark_module("st_dlpfc")
    rows = [
        {"method": m, "slice": "151510", "seed": seed, "ari": ari}
        for m, aris in {"pca_nbmean_gmm": [0.5, 0.5, 0.5], "dfmamba_st": [0.6, 0.4, 0.3, 0.9]}.items()
        for seed, ari in enumerate(aris)
    ]  # dfmamba_st's seed 3 has no baseline run: left out
    got = bench.paired(pd.DataFrame(rows)).set_index(["method", "slice"]).loc[("dfmamba_st", "151510")]
    diffs = np.array([0.1, -0.1, -0.2])
    assert got["pairs"] == 3 and got["up"] == 1 and got["down"] == 2
    assert got["mean_diff"] == pytest.approx(diffs.mean())
    assert got["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert bench.paired(pd.DataFrame(rows[3:])).empty  # no baseline, nothing paired


def test_dlpfc_benchmark_refuses_an_unknown_method_before_any_job(benchmark_module, monkeypatch, capsys):
    bench = benchmark_module("st_dlpfc")
    monkeypatch.setattr(bench, "_job", lambda *a, **k: pytest.fail("a job ran"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--slices", "bundled", "--methods", "dfmamba", "--no-extra"])  # a typo of dfmamba_st
    assert exit_.value.code == 2 and "invalid choice: 'dfmamba'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown baseline 'pca_nbmean'"):
        bench.baseline_rep(ad.AnnData(np.ones((3, 2))), "pca_nbmean", 0)


def test_benchmark_workers_start_with_every_pool_at_the_thread_count(benchmark_module, monkeypatch):
    import concurrent.futures as cf
    import multiprocessing as mp

    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "2")  # what a worker would inherit without its initializer
    bench = benchmark_module("st_dlpfc")
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), **bench._workers(1)) as pool:
        env, numba_threads = pool.submit(_worker_threads).result()
    assert numba_threads == 1
    assert all(env[name] == "1" for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"))


def _worker_threads():
    import numba

    return dict(os.environ), numba.get_num_threads()


@needs_data
def test_dlpfc_extra_trains_on_151673_reuses_that_model_and_trains_151674_afresh(
    benchmark_module, monkeypatch, keep_torch_threads, tmp_path
):
    """On crops written to a folder: 151674's crop with two layers merged, so its K (6) differs from 151673's (7)."""

    bench = benchmark_module("st_dlpfc")
    a = crop(ad.read_h5ad(DATA / "dlpfc" / "dlpfc_151673.h5ad"), rows=(0, 80), cols=(0, 130))
    b = crop(ad.read_h5ad(DATA / "dlpfc" / "dlpfc_151674.h5ad"), rows=(0, 80), cols=(0, 130))
    b.obs["layer"] = b.obs["layer"].astype(object).replace("Layer1", "Layer2").astype("category")
    a.write_h5ad(tmp_path / bench.FILES["151673"])
    b.write_h5ad(tmp_path / bench.FILES["151674"])
    embeds, clusters = [], []
    monkeypatch.setattr(dfm.tl, "embed", _fake_embed(embeds))
    monkeypatch.setattr(dfm.tl, "cluster", _fake_cluster(clusters))
    rows = bench._extra(str(tmp_path), 2, 1, {"epochs": 3}, {"tol": 1e-6})
    (n673, k673), (n674, k674) = ((x.n_obs, x.obs["layer"].nunique()) for x in (a, b))
    assert (k673, k674) == (7, 6)
    sizes = [e["n_obs"] for e in embeds]
    assert sizes[0] == n673 and sizes[-2:] == [n674, n674]
    assert embeds[0]["seed"] == 2 and embeds[0]["return_model"] is True and embeds[0].get("model") is None
    assert [e.get("model") for e in embeds[1:4]] == ["MODEL"] * 3  # x2, x4 and the transfer: the 151673 model
    assert embeds[4].get("model") is None and embeds[4]["seed"] == 2  # trained on 151674 itself
    assert all(e["epochs"] == 3 for e in embeds)
    assert [c["n_clusters"] for c in clusters] == [7, 7, 7, 6, 6]  # each slice's own K
    assert all(c["random_state"] == 2 and c["tol"] == 1e-6 for c in clusters)
    assert [r["test"].split(" (")[0] for r in rows] == [
        "native 151673",
        "zero-shot x2 151673",
        "zero-shot x4 151673",
        "transfer 151673 -> 151674",
        "trained on 151674 itself",
    ]
    assert "(2 model genes missing)" in rows[3]["test"]
    assert embeds[1]["n_obs"] < n673 and embeds[2]["n_obs"] < embeds[1]["n_obs"]  # coarsened x2, then x4


# --- benchmarks/st_multislice.py ----------------------------------------------------------------------------------


def _two_bundled(tmp_path):
    one = dfm.datasets.dlpfc_151673_hvg()
    other = one.copy()
    other.obsm["spatial"] = np.asarray(other.obsm["spatial"], dtype=float) + 5.0  # near the first: same frame
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    return path


def test_multislice_joint_job_scores_each_slice_on_its_own_spots(
    benchmark_module, monkeypatch, tmp_path, keep_torch_threads
):
    ms = benchmark_module("st_multislice")
    other = _two_bundled(tmp_path)
    paths = {"a": str(ms.slice_path("bundled")), "b": str(other)}
    embeds, clusters, reps = [], [], []
    monkeypatch.setattr(dfm.tl, "embed", _fake_embed(embeds))

    def cluster(adata, n_clusters=None, **kwargs):  # slice a: the truth; slice b: three layers merged
        serialized = adata.uns.get("dfm_order", {}).get("params", {})
        clusters.append({"n_clusters": n_clusters, "serialized_by": serialized.get("library_key"), **kwargs})
        lib = adata.obs["library"].to_numpy()
        labels = np.asarray(_layer_labels(adata), dtype=object)
        merged = np.asarray(_layer_labels(adata, merge=("Layer1", "Layer2", "Layer3")), dtype=object)
        key = kwargs.get("key_added", "dfm_domain")
        adata.obs[key] = pd.Categorical(np.where(lib == "b", merged, labels))
        _record_as_cluster(adata, key, n_clusters, kwargs.get("library_key"))

    monkeypatch.setattr(dfm.tl, "cluster", cluster)
    _stand_in_baseline_rep(monkeypatch, ms, reps)
    row = ms._joint_job("dfmamba_st", paths, 3, 1, {"tol": 1e-6})
    assert embeds[-1]["library_key"] == "library" and embeds[-1]["seed"] == 3
    assert clusters[-1]["library_key"] == "library" and clusters[-1]["random_state"] == 3
    assert clusters[-1]["n_clusters"] == 7 and clusters[-1]["tol"] == 1e-6
    adata, _ = ms.load_slice(paths["a"])
    scored = adata.obs["truth"].notna().to_numpy()
    truth = adata.obs["truth"].astype(str).to_numpy()[scored]
    merged = np.asarray(_layer_labels(adata, merge=("Layer1", "Layer2", "Layer3")), dtype=str)[scored]
    assert row["ari a"] == pytest.approx(1.0)
    assert row["ari b"] == pytest.approx(adjusted_rand_score(truth, merged))
    assert row["ari pooled"] == pytest.approx(
        adjusted_rand_score(np.concatenate([truth, truth]), np.concatenate([truth, merged]))
    )
    assert row["k_found a"] == 8 and row["k_found b"] == 6  # 7 layers + "x"; 5 layers + "x"
    assert row["method"] == "dfmamba_st joint" and row["seed"] == 3
    row = ms._joint_job("pca_nbmean_gmm", paths, 4, 1, {})
    assert reps[-1] == ("pca_nbmean_gmm", 4, "library")  # each spot averaged within its own slice
    assert clusters[-1]["refine"] is False and clusters[-1]["random_state"] == 4 and clusters[-1]["n_clusters"] == 7
    assert clusters[-1]["serialized_by"] == "library"  # fitted in curve order, each slice its own sequence
    assert row["method"] == "pca_nbmean_gmm joint"


def test_multislice_timer_leaves_out_reading_the_slices(benchmark_module, monkeypatch, tmp_path, keep_torch_threads):
    ms = benchmark_module("st_multislice")
    paths = {"a": str(ms.slice_path("bundled")), "b": str(_two_bundled(tmp_path))}
    monkeypatch.setattr(dfm.tl, "cluster", _fake_cluster([]))
    _stand_in_baseline_rep(monkeypatch, ms, [])
    monkeypatch.setattr(ms, "load_slice", _slowed(ms.load_slice))
    row = ms._joint_job("pca_nbmean_gmm", paths, 0, 1)
    assert 0 < row["seconds"] < 0.5


def test_multislice_table_sums_seconds_takes_peak_max_and_averages_over_seeds(benchmark_module, monkeypatch, capsys):
    ms = benchmark_module("st_multislice")
    joint_calls, single_calls = [], []

    def fake_joint(method, paths, seed, threads, cluster_options=None):
        joint_calls.append((method, paths, seed, threads, cluster_options))
        return {
            "method": f"{method} joint",
            "seed": seed,
            "ari 151673": 0.1 * (seed + 1),
            "ari 151674": 0.2,
            "ari pooled": 0.3,
            "k_found 151673": 7,
            "k_found 151674": 7,
            "seconds": 1.0,
            "peak_mb": 50.0,
        }

    def fake_job(kind, path, slice_id, seed, threads, embed_options, cluster_options=None, genes=None):
        single_calls.append((kind, path, slice_id, seed, threads, embed_options, cluster_options, genes))
        return {
            "method": kind,
            "slice": slice_id,
            "seed": seed,
            "ari": {"151673": 0.4, "151674": 0.6}[slice_id] + seed / 100 - (genes is not None) / 10,
            "k_found": {"151673": 6, "151674": 8}[slice_id],
            "seconds": {"151673": 2.0, "151674": 3.0}[slice_id],
            "peak_mb": {"151673": 100.0, "151674": 300.0}[slice_id],
        }

    monkeypatch.setattr(ms, "_joint_job", fake_joint)
    monkeypatch.setattr(ms, "_job", fake_job)
    pools = []
    monkeypatch.setattr(ms, "run_in_worker", lambda fn, threads, *args: pools.append(threads) or fn(*args))
    monkeypatch.setattr(ms, "shared_genes", lambda paths: ["g1", "g2"])
    argv = ["--data-dir", "/d", "--seeds", "0", "1", "4", "--threads", "1", "--cluster", "tol=1e-6"]
    assert ms.main(argv) == 0  # joint ARI on 151673 over the seeds: 0.1, 0.2, 0.5 (mean 0.267, median 0.2)
    out = capsys.readouterr().out
    paths = {s: f"/d/dlpfc_{s}.h5ad" for s in ("151673", "151674")}
    assert joint_calls == [(m, paths, seed, 1, {"tol": 1e-6}) for m in ms.METHODS for seed in (0, 1, 4)]
    assert single_calls == [  # each slice on the joint job's genes, then on its own
        (m, paths[s], s, seed, 1, {}, {"tol": 1e-6}, genes)
        for m in ms.METHODS
        for seed in (0, 1, 4)
        for genes in (["g1", "g2"], None)
        for s in paths
    ]
    assert pools == [1] * (len(joint_calls) + len(single_calls))  # every worker's pools at --threads
    rows = []
    for m in ms.METHODS:
        for seed in (0, 1, 4):
            rows.append(fake_joint(m, paths, seed, 1))
            for panel, lower in (("shared genes", 0.1), ("own genes", 0.0)):
                rows.append(
                    {
                        "method": f"{m} per slice, {panel}",
                        "seed": seed,
                        "ari 151673": 0.4 + seed / 100 - lower,
                        "ari 151674": 0.6 + seed / 100 - lower,
                        "ari pooled": np.nan,
                        "k_found 151673": 6,
                        "k_found 151674": 8,
                        "seconds": 5.0,  # summed over the slices
                        "peak_mb": 300.0,  # the larger of the two
                    }
                )
    table = pd.DataFrame(rows)
    assert table.round(3).to_string(index=False) in out
    means = table.drop(columns="seed").groupby("method", sort=False).mean()
    assert means.round(3).to_string() in out
    assert means.loc["dfmamba_st joint", "ari 151673"] == pytest.approx(0.8 / 3)  # the mean, not the median


def test_multislice_shared_genes_are_concats_inner_join_and_the_job_keeps_only_them(
    benchmark_module, monkeypatch, tmp_path, keep_torch_threads
):
    ms = benchmark_module("st_multislice")
    one = dfm.datasets.dlpfc_151673_hvg()
    other = one[:, ::-1][:, 100:].copy()  # another order, 100 genes fewer
    paths = {"a": str(ms.slice_path("bundled")), "b": str(tmp_path / "b.h5ad")}
    other.write_h5ad(paths["b"])
    genes = ms.shared_genes(paths)
    joined = ad.concat({"a": one, "b": other}, label="library", join="inner")
    assert genes == list(joined.var_names) and len(genes) == one.n_vars - 100
    embeds = []
    monkeypatch.setattr(dfm.tl, "embed", _fake_embed(embeds))
    monkeypatch.setattr(dfm.tl, "cluster", _fake_cluster([]))
    ms._job("dfmamba_st", paths["a"], "a", 0, 1, {}, {}, genes[:50])
    assert embeds[-1]["n_obs"] == one.n_obs
    monkeypatch.setattr(dfm.tl, "embed", lambda adata, **kw: embeds.append(list(adata.var_names)))
    ms._job("dfmamba_st", paths["a"], "a", 0, 1, {}, {}, genes[:50])
    assert sorted(embeds[-1]) == sorted(genes[:50])


# --- benchmarks/gmm_restarts.py ---------------------------------------------------------------------------------------


def test_gmm_restarts_summary_spreads_within_each_embedding(benchmark_module, monkeypatch, capsys, keep_torch_threads):
    """The summary's mean ARI, ARI range per embedding and log-likelihood."""
    bench = benchmark_module("gmm_restarts")
    slices = list(bench.FILES)[:2]

    def fake_rows(path, seed, restarts, cluster_seeds):
        s = slices.index(next(k for k, f in bench.FILES.items() if path.name == f))
        rows = []
        for c in cluster_seeds:
            for r in restarts:
                # ARI = 0.1 * slice + 0.2 * seed + a clustering-seed part that shrinks with the restarts
                ari = 0.1 * s + 0.2 * seed + (0.04 if r == 10 else 0.01) * [0, 1, 3][c]
                rows.append(dict(seed=seed, cluster_seed=c, restarts=r, ari=ari, loglik=-(c + r), seconds=1.0))
        return rows

    monkeypatch.setattr(bench, "rows_for_slice", fake_rows)
    argv = ["--slices", *slices, "--seeds", "0", "1", "--cluster-seeds", "0", "1", "2", "--restarts", "10", "30"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    lines = printed.split("\nsummary\n")[1].strip().splitlines()
    header = lines[0].split()
    table = {int(line.split()[0]): dict(zip(header, map(float, line.split()[1:]))) for line in lines[2:]}
    assert set(table) == {10, 30}
    for r, step in ((10, 0.04), (30, 0.01)):
        # within one embedding the ARI ranges over step * (0, 1, 3): the range is 3 * step, whatever the seed/slice
        assert table[r]["ari_range_within_embedding"] == pytest.approx(3 * step, abs=1e-4)
        assert table[r]["ari_mean"] == pytest.approx(0.05 + 0.1 + step * 4 / 3, abs=1e-4)
        assert table[r]["loglik_mean"] == pytest.approx(-(1 + r), abs=1e-4)


def test_gmm_restarts_rows_use_the_embedding_seed_the_restarts_and_the_clustering_seed(benchmark_module, monkeypatch):
    """Each seed reaches its own step (tl.embed / tl.cluster replaced by recorders)."""
    bench = benchmark_module("gmm_restarts")
    embeds, clusters = [], []

    def fake_embed(adata, seed, progress):
        embeds.append(seed)

    def fake_cluster(adata, k, n_init, random_state, key_added, progress=True):
        clusters.append((k, n_init, random_state))
        adata.obs[key_added] = adata.obs["layer"].astype(str).to_numpy()  # a perfect clustering
        adata.uns[key_added] = {"log_likelihood": -float(n_init + random_state)}

    monkeypatch.setattr(dfm.pp, "serialize", lambda adata: None)
    monkeypatch.setattr(dfm.tl, "embed", fake_embed)
    monkeypatch.setattr(dfm.tl, "cluster", fake_cluster)
    rows = bench.rows_for_slice(benchmark_module("st_dlpfc").slice_path("bundled"), 5, [10, 30], [3, 4])
    assert embeds == [5]
    assert clusters == [(7, 10, 3), (7, 30, 3), (7, 10, 4), (7, 30, 4)]
    assert [(r["seed"], r["cluster_seed"], r["restarts"], r["loglik"]) for r in rows] == [
        (5, 3, 10, -13.0),
        (5, 3, 30, -33.0),
        (5, 4, 10, -14.0),
        (5, 4, 30, -34.0),
    ]
    assert all(r["ari"] == pytest.approx(1.0) for r in rows)


# --- benchmarks/curve_adjacency.py ------------------------------------------------------------------------------------


def test_curve_adjacency_shares_are_strictly_more_than_w_positions_apart(benchmark_module, monkeypatch):
    """The shares, recomputed by hand on a toy layout (no data needed)."""
    bench = benchmark_module("curve_adjacency")
    # 300 spots on identity orders; five pairs of neighbours 1, 4, 17, 65 and 257 positions apart
    n = 300
    orders = {c: np.arange(n) for c in {c for s in bench.CURVE_SETS for c in s}}
    orders["hilbert_t"] = np.arange(n)[::-1].copy()
    shifted = np.arange(n)
    shifted[[1, 17]] = shifted[[17, 1]]  # spot 17 sits next to spot 0 on hilbert_s
    orders["hilbert_s"] = shifted
    import scipy.sparse as sp

    first = np.array([0, 0, 0, 0, 0])
    second = np.array([1, 4, 17, 65, 257])  # 1, 4, 17, 65 and 257 positions apart on the identity order
    graph = sp.coo_matrix((np.ones(5), (first, second)), shape=(n, n)) + sp.eye(n)  # each spot itself, as tl's graph
    graph = graph.tocoo()
    layout = types.SimpleNamespace(graph=lambda: graph, order=lambda c: orders[c])
    monkeypatch.setattr(bench, "library_layouts", lambda adata: [layout])
    monkeypatch.setattr(bench.ad, "read_h5ad", lambda path, backed=None: None)
    rows = {r["curves"]: r for r in bench.far_shares(Path("unused.h5ad"))}
    # hilbert alone: gaps 1, 4, 17, 65, 257 -> share > w for w = 1, 4, 16, 64, 256
    assert [rows["hilbert"][f">{w}"] for w in (1, 4, 16, 64, 256)] == [0.8, 0.6, 0.6, 0.4, 0.2]
    # hilbert_t is the reversed order: the same gaps, so adding it changes nothing
    assert rows["hilbert+hilbert_t"] == {**rows["hilbert"], "curves": "hilbert+hilbert_t"}
    # hilbert_s puts 17 next to 0 (gap 1) and 1 at position 17 (its gap to 0 stays 1 on hilbert): gaps 1, 4, 1, 65, 257
    assert [rows["hilbert+hilbert_s"][f">{w}"] for w in (1, 4, 16, 64, 256)] == [0.6, 0.4, 0.4, 0.4, 0.2]
    assert list(rows) == ["+".join(s) for s in bench.CURVE_SETS]


# --- benchmarks/tiling_seams.py ---------------------------------------------------------------------------------------


def test_tiling_seams_table_compares_the_dfmamba_block_of_each_tiling_with_the_whole_reading(
    benchmark_module, monkeypatch, capsys, keep_torch_threads
):
    """The printed differences, recomputed from the embeddings the script produced."""
    bench = benchmark_module("tiling_seams")
    real_embed, runs = dfm.tl.embed, []

    def embed(adata, **kw):
        if kw.get("model") is None:
            kw = {**QUICK, **kw}  # a model trained in about a second
        out = real_embed(adata, **kw)
        if kw["tile_size"] == 512:  # a seam much larger than the others, and negative: |diff| and diff differ
            adata.obsm["X_dfm"][0, -1] -= 10.0
        runs.append((kw["tile_size"], adata.obsm["X_dfm"].copy(), out))
        return out

    monkeypatch.setattr(dfm.tl, "embed", embed)
    seeds = []

    def cluster(adata, k, random_state, progress=True):
        seeds.append(random_state)
        adata.obs["dfm_domain"] = adata.obs["layer"]

    monkeypatch.setattr(dfm.tl, "cluster", cluster)
    argv = ["tiling_seams.py", "--threads", "1", "--tile-sizes", "4096", "512", "--seed", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    printed = capsys.readouterr().out
    assert [r[0] for r in runs] == [8192, 4096, 512]
    assert seeds == [2, 2, 2]  # --seed reaches every clustering
    n_pcs = runs[0][2].features.n_features
    whole = runs[0][1][:, n_pcs:]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
        for line in printed.splitlines()
        if line.startswith("| ") and "tile size" not in line
    }
    for tile, values, _ in runs[1:]:
        diff = values[:, n_pcs:] - whole
        rel, mx = np.linalg.norm(diff) / np.linalg.norm(whole), np.abs(diff).max()
        assert rows[str(tile)][:2] == [f"{rel:.2e}", f"{mx:.2e}"], tile
    # a tile larger than the slice reads it whole; 512-spot tiles leave seams
    assert rows["4096"][:2] == ["0.00e+00", "0.00e+00"] and float(rows["512"][1]) >= 10


# --- benchmarks/embed_threads.py --------------------------------------------------------------------------------------


def test_embed_threads_table_compares_each_condition_with_its_own_one_thread_median(benchmark_module, monkeypatch):
    """The table built from fake timings (no process, no spinner started)."""
    bench = benchmark_module("embed_threads")
    active = []

    class FakeProcess:
        def __init__(self, target, daemon):
            assert target is bench._spin and daemon

        def start(self):
            active.append(self)

        def terminate(self):
            active.remove(self)

        def join(self):
            pass

    # seconds by (busy cores, threads): three repeats whose median differs from the mean and the minimum
    timings = {(0, 1): [10, 11, 20], (0, 4): [4, 5, 9], (3, 1): [12, 13, 30], (3, 4): [30, 39, 40]}
    calls = []

    def fake_seconds(threads):
        calls.append((len(active), threads))
        return float(timings[(len(active), threads)][sum(c == calls[-1] for c in calls) - 1])

    monkeypatch.setattr(bench.multiprocessing, "Process", FakeProcess)
    monkeypatch.setattr(bench, "available_cores", lambda: 4)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "embed_seconds", fake_seconds)
    table = bench.main(["--repeats", "3"])
    assert sorted(set(calls)) == sorted(timings) and len(calls) == 12 and not active
    got = {(r.busy_cores, r.threads): [r["min"], r["median"], r["max"], r.vs_one_thread] for _, r in table.iterrows()}
    expected = {
        (0, 1): [10, 11, 20, 1.0],
        (0, 4): [4, 5, 9, 5 / 11],
        (3, 1): [12, 13, 30, 1.0],
        (3, 4): [30, 39, 40, 3.0],
    }
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key] == pytest.approx(values), key


def test_embed_threads_runs_each_job_with_its_thread_count_everywhere(benchmark_module, monkeypatch):
    """The job's argument and every BLAS/OpenMP variable carry the thread count."""
    bench = benchmark_module("embed_threads")
    seen = {}

    def fake_run(cmd, env, cwd, capture_output, text, check):
        seen.update(cmd=cmd, env=env, cwd=cwd)
        return types.SimpleNamespace(stdout="loading...\n12.5\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.embed_seconds(3) == 12.5
    assert seen["cmd"][-1] == "3" and seen["cmd"][1:3] == ["-c", bench.JOB] and seen["cwd"] == bench.REPO
    names = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    assert all(seen["env"][k] == "3" for k in names)


# --- benchmarks/pathology_scale.py ------------------------------------------------------------------------------------


def test_pathology_scale_keeps_train_val_test_apart_and_each_model_its_settings(
    benchmark_module, monkeypatch, keep_torch_threads, capsys
):
    """Data sets, models and columns, with training and scoring replaced by recorders."""
    bench = benchmark_module("pathology_scale")
    from dfmamba_st.core import seed_everything

    made, trained, scored = [], [], []

    def fake_dataset(n, size, seed, cell):
        made.append((n, size, seed, cell))
        return (np.zeros((4 * n, size, size, 3), np.float32), np.repeat(np.arange(4), n))

    def fake_train(model, train, **kw):
        trained.append((model, train, kw, {k: v.clone() for k, v in model.state_dict().items()}))
        return types.SimpleNamespace(history=[{"train_loss": 1.0, "val_loss": 1.0}], best_epoch=0)

    def fake_resolutions(model, images, labels, crops, batch_size):
        scored.append((images, crops))
        confusion = np.zeros((4, 4), int)
        return {256: {"accuracy": 0.5, "confusion": confusion}, 1024: {"accuracy": 0.25, "confusion": confusion}}

    monkeypatch.setattr(bench, "make_synthetic_dataset", fake_dataset)
    monkeypatch.setattr(bench, "train_classifier", fake_train)
    monkeypatch.setattr(bench, "evaluate_resolutions", fake_resolutions)
    quick = bench.parse_args(["--quick", "--epochs", "5", "--d-model=32"])  # given on the line: kept
    assert (quick.epochs, quick.d_model, quick.d_state, quick.train_images) == (5, 32, 4, 8)
    with pytest.raises(SystemExit):  # an abbreviation would escape --quick's check of the names given
        bench.parse_args(["--quick", "--epoch", "5"])
    rows = bench.main(["--quick", "--seed", "3"])
    assert "torch threads 1, numba threads 1" in capsys.readouterr().out  # both counts shown (numba's may be capped)
    # train and validation images: 256 px, each its own seed; test fields: 512 px, a third seed
    assert made == [(8, 256, 3, 16), (2, 256, 4, 16), (4, 512, 5, 16)]
    assert len(trained) == 3 and len(scored) == 3
    for _model, train, kw, _ in trained:
        assert train[0].shape[1] == 256 and kw["val"][0].shape == (8, 256, 256, 3) and kw["val"] is not train
        assert kw["crop"] == 256 and kw["epochs"] == 2 and kw["seed"] == 3
    assert all(images.shape[1] == 512 and crops == (256, None) for images, crops in scored)
    (dfm, _, _, dfm_w), (flat, _, _, flat_w), (_patch, _, _, patch_w) = trained
    assert dfm.config["depth"] == 3 and flat.config["depth"] == 0
    references = [
        lambda: bench.DFMambaClassifier(4, d_model=16, depth=3, d_state=4),
        lambda: bench.DFMambaClassifier(4, d_model=16, depth=0, d_state=4),
        lambda: bench.PatchMLP(4, 16),
    ]
    for build, weights in zip(references, (dfm_w, flat_w, patch_w)):
        seed_everything(3)  # every model starts from the run's seed
        reference = build().state_dict()
        assert reference.keys() == weights.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key])
    assert [(r["acc_256"], r["acc_1024"]) for r in rows] == [(0.5, 0.25)] * 3


# --- benchmarks/scale.py ----------------------------------------------------------------------------------------------


def test_scale_tissue_gives_each_layer_its_own_markers(benchmark_module):
    """The 15 markers of layer k are raised in layer k only."""
    adata = benchmark_module("scale").layered_tissue(6000, seed=0)
    x = np.asarray(adata.X.todense())
    layer = adata.obs["layer"].astype(int).to_numpy()
    assert set(layer) == set(range(6))
    for k in range(6):
        markers = slice(15 * k, 15 * (k + 1))
        inside, outside = x[layer == k][:, markers].mean(), x[layer != k][:, markers].mean()
        assert inside > 1.4 * outside, k


def test_scale_table_sorts_the_sizes_and_prints_the_growth_per_4x(benchmark_module, monkeypatch, capsys):
    """The table from fake worker outputs (no subprocess)."""
    bench = benchmark_module("scale")
    seconds = {10_000: 2.0, 40_000: 8.0, 160_000: 64.0}
    commands = []

    def fake_run(cmd, capture_output, text, env):
        commands.append((cmd, env))
        n = int(cmd[cmd.index("--worker") + 1])
        if n == 20_000:
            return types.SimpleNamespace(returncode=1, stdout="", stderr="MemoryError")
        row = dict(spots=n, seconds=seconds[n], serialize_s=0, embed_s=0, cluster_s=0, peak_rss_gb=0, ari=0, nmi=0)
        row.update(pca_gmm_ari=0.25, pca_gmm_s=1.0, pca_nbmean_gmm_ari=0.9, pca_nbmean_gmm_s=2.5)
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    argv = ["scale.py", "--sizes", "160000", "10000", "20000", "40000", "--threads", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 1  # a size failed
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "spots" not in line]
    assert [line.split("|")[1].strip() for line in lines] == ["10,000", "40,000", "160,000", "20,000"]
    assert [line.split("|")[9].strip() for line in lines[:3]] == ["-", "4.00", "8.00"]
    assert all(line.split("|")[10:12] == [" 0.250 (1.0) ", " 0.900 (2.5) "] for line in lines[:3])
    assert "failed" in lines[3]  # the size that failed has its row, the larger ones ran
    assert all(env["OMP_NUM_THREADS"] == "3" and cmd[-1] == "3" for cmd, env in commands)


def test_scale_run_one_times_the_whole_workflow_and_clusters_into_the_six_layers(
    benchmark_module, monkeypatch, keep_torch_threads
):
    """Seconds = serialize + embed + cluster; tl.cluster asked for the six layers."""
    bench = benchmark_module("scale")
    asked = []

    def fake_cluster(adata, k, random_state, use_rep="X_dfm", key_added="dfm_domain", **kwargs):
        asked.append((k, random_state, use_rep))
        adata.obs[key_added] = adata.obs["layer"].to_numpy() if use_rep == "X_dfm" else "one"

    def getrusage(who):  # 1 GiB until a baseline has clustered, 9 GiB after: the peak must be read before them
        baselines_ran = any(use_rep == "X_base" for _, _, use_rep in asked)
        return types.SimpleNamespace(ru_maxrss=(9 if baselines_ran else 1) * 2**20)

    monkeypatch.setattr(dfm.pp, "serialize", lambda adata, **kw: time.sleep(0.05))
    monkeypatch.setattr(dfm.tl, "embed", lambda adata, progress, seed: time.sleep(0.05))
    monkeypatch.setattr(dfm.tl, "cluster", fake_cluster)
    monkeypatch.setattr(bench.resource, "getrusage", getrusage)
    row = bench.run_one(2000, 3, torch.get_num_threads())
    assert row["peak_rss_gb"] == 1.0  # the method's peak, not the baselines'
    assert asked == [(6, 3, "X_dfm"), (6, 3, "X_base"), (6, 3, "X_base")]  # the method, then the two baselines
    assert row["serialize_s"] >= 0.05 and row["embed_s"] >= 0.05
    assert row["seconds"] == pytest.approx(row["serialize_s"] + row["embed_s"] + row["cluster_s"], rel=1e-9)
    assert row["ari"] == pytest.approx(1.0) and row["spots"] == 2000
    assert row["pca_gmm_ari"] == row["pca_nbmean_gmm_ari"] == pytest.approx(0.0)  # one label: the baselines' own
    assert row["pca_gmm_s"] > 0 and row["pca_nbmean_gmm_s"] > 0
    real_cluster_baseline = bench.cluster_baseline

    def failing(adata, kind, *args):
        if kind == "pca_gmm":
            raise MemoryError
        return real_cluster_baseline(adata, kind, *args)

    monkeypatch.setattr(bench, "cluster_baseline", failing)
    row = bench.run_one(2000, 3, torch.get_num_threads())  # a baseline that fails leaves the method's row
    assert np.isnan(row["pca_gmm_ari"]) and row["pca_nbmean_gmm_ari"] == pytest.approx(0.0)
    assert row["ari"] == pytest.approx(1.0)


def test_scan_speed_workers_start_with_their_thread_count_in_every_pool(benchmark_module, monkeypatch):
    # numba cannot run more threads than NUMBA_NUM_THREADS allowed at its start: under NUMBA_NUM_THREADS=1 the default
    # (every core) made every numba configuration fail with "The number of threads must be between 1 and 1". Each
    # timed process now starts with its own count in every pool, whatever the caller's environment
    module = benchmark_module("scan_speed")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    monkeypatch.setattr(module, "available_cores", lambda: 4)
    seen = []

    def fake_run(cmd, capture_output, text, env, timeout, check):
        seen.append((json.loads(cmd[cmd.index("--worker") + 1])[6], env))
        return types.SimpleNamespace(stdout=json.dumps({"error": "not run"}) + "\n")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setattr(module, "print_table", lambda *args: None)
    names = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    for argv, threads in ((["--quick"], 4), (["--quick", "--threads", "2"], 2)):  # default: the cores
        seen.clear()
        module.main([*argv, "--backends", "numba", "torch"])
        assert len(seen) == 4
        assert all(count == threads and all(env[k] == str(threads) for k in names) for count, env in seen)
        assert all(env["PYTHONPATH"].split(os.pathsep)[0] == str(module.REPO) for _, env in seen)


class _Parsed(Exception):
    """Raised by a patched ``parse_args`` once it has parsed: the script's ``main`` goes no further."""


def _gpu_check_calls() -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of every benchmark script ``benchmarks/gpu_check.sh`` runs, split as bash would split them.

    Continued lines are joined, ``$ST`` is expanded, the loop variable ``$seed`` becomes 0, and a call ends at its first
    redirection.
    """
    text = (BENCHMARKS / "gpu_check.sh").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    st = re.search(r'^ST="([^"]*)"', text, re.MULTILINE).group(1)
    calls = []
    for line in text.splitlines():
        line = line.replace("$ST ", st + " ").replace("$seed", "0")
        if "benchmarks/" not in line or line.lstrip().startswith("#") or "ST=" in line:
            continue
        words = shlex.split(line, comments=True)
        start = next(i for i, w in enumerate(words) if w.startswith("benchmarks/") and w.endswith(".py"))
        argv = []
        for word in words[start + 1 :]:
            if word.startswith((">", "2>", "|")):
                break
            argv.append(word)
        calls.append((Path(words[start]).stem, argv))
    return calls


def test_gpu_scripts_parse_and_call_the_benchmarks_with_options_they_take(benchmark_module, monkeypatch):
    """The GPU check runs only on a lent machine: its shell must parse here, and its calls must not drift."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    for name in ("gpu_check.sh", "gpu_kit.sh"):
        result = subprocess.run(["bash", "-n", str(BENCHMARKS / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"

    calls = _gpu_check_calls()
    assert sorted({script for script, _ in calls}) == ["scan_speed", "st_dlpfc"]
    # the paper preset (one seed per call), the cpu preset on the GPU, the paper preset again on mamba-ssm's kernel
    assert sum(script == "st_dlpfc" for script, _ in calls) == 3
    real_parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real_parse(self, args, namespace))

    embed_params = inspect.signature(dfm.tl.embed).parameters
    for script, argv in calls:
        module = benchmark_module(script)
        with monkeypatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", parse_only)
            with pytest.raises(_Parsed) as parsed:  # argparse's SystemExit for an unknown option or choice fails here
                module.main(argv)
        args = parsed.value.args[0]
        if script == "st_dlpfc":
            options = module.parse_options(args.embed, "--embed")
            assert set(options) <= set(embed_params), f"tl.embed has no {sorted(set(options) - set(embed_params))}"
            assert options["preset"] in dfm.tl.PRESETS, options
            assert options["device"] == "cuda"
