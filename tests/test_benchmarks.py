"""The benchmark scripts' own plumbing, for those whose tables are quoted (GMM restarts, curve adjacency, tiling seams,
threads, pathology at scale, large tissues): which seeds and settings reach which step, and how each table is built.

The expensive parts (training, ``tl.embed``, subprocesses, busy-loop processes) are replaced by recorders, so each test
takes about a second; the real runs are the scripts themselves (``benchmarks/``).
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import QUICK

BUNDLED = Path(__file__).resolve().parents[1] / "dfmamba_st" / "data" / "dlpfc_151673_hvg.h5ad"


# ------------------------------------------------------------------------------------------------ gmm_restarts


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
    import dfmamba_st as dfm

    embeds, clusters = [], []

    def fake_embed(adata, seed, progress):
        embeds.append(seed)

    def fake_cluster(adata, k, n_init, random_state, key_added):
        clusters.append((k, n_init, random_state))
        adata.obs[key_added] = adata.obs["layer"].astype(str).to_numpy()  # a perfect clustering
        adata.uns[key_added] = {"log_likelihood": -float(n_init + random_state)}

    monkeypatch.setattr(dfm.pp, "serialize", lambda adata: None)
    monkeypatch.setattr(dfm.tl, "embed", fake_embed)
    monkeypatch.setattr(dfm.tl, "cluster", fake_cluster)
    rows = bench.rows_for_slice(BUNDLED, 5, [10, 30], [3, 4])
    assert embeds == [5]
    assert clusters == [(7, 10, 3), (7, 30, 3), (7, 10, 4), (7, 30, 4)]
    assert [(r["seed"], r["cluster_seed"], r["restarts"], r["loglik"]) for r in rows] == [
        (5, 3, 10, -13.0),
        (5, 3, 30, -33.0),
        (5, 4, 10, -14.0),
        (5, 4, 30, -34.0),
    ]
    assert all(r["ari"] == pytest.approx(1.0) for r in rows)


# ------------------------------------------------------------------------------------------------ curve_adjacency


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
    graph = sp.coo_matrix((np.ones(5), (first, second)), shape=(n, n))
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


# ------------------------------------------------------------------------------------------------ tiling_seams


def test_tiling_seams_table_compares_the_dfmamba_block_of_each_tiling_with_the_whole_reading(
    benchmark_module, monkeypatch, capsys, keep_torch_threads
):
    """The printed differences, recomputed from the embeddings the script produced."""
    bench = benchmark_module("tiling_seams")
    import dfmamba_st as dfm

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
    monkeypatch.setattr(dfm.tl, "cluster", lambda adata, k: adata.obs.__setitem__("dfm_domain", adata.obs["layer"]))
    monkeypatch.setattr(sys, "argv", ["tiling_seams.py", "--threads", "1", "--tile-sizes", "4096", "512"])
    bench.main()
    printed = capsys.readouterr().out
    assert [r[0] for r in runs] == [8192, 4096, 512]
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


# ------------------------------------------------------------------------------------------------ embed_threads


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
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
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


# ------------------------------------------------------------------------------------------------ pathology_scale


def test_pathology_scale_keeps_train_val_test_apart_and_each_model_its_settings(
    benchmark_module, monkeypatch, keep_torch_threads
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
    rows = bench.main(["--quick", "--seed", "3"])
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


# ------------------------------------------------------------------------------------------------ scale


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
        row = dict(spots=n, seconds=seconds[n], serialize_s=0, embed_s=0, cluster_s=0, peak_rss_gb=0, ari=0, nmi=0)
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["scale.py", "--sizes", "160000", "10000", "40000", "--threads", "3"])
    bench.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "spots" not in line]
    assert [line.split("|")[1].strip() for line in lines] == ["10,000", "40,000", "160,000"]
    assert [line.split("|")[9].strip() for line in lines] == ["-", "4.00", "8.00"]
    assert all(env["OMP_NUM_THREADS"] == "3" and cmd[-1] == "3" for cmd, env in commands)


def test_scale_run_one_times_the_whole_workflow_and_clusters_into_the_six_layers(benchmark_module, monkeypatch):
    """Seconds = serialize + embed + cluster; tl.cluster asked for the six layers."""
    bench = benchmark_module("scale")
    import time

    import dfmamba_st as dfm

    asked = []

    def fake_cluster(adata, k):
        asked.append(k)
        adata.obs["dfm_domain"] = adata.obs["layer"].to_numpy()

    monkeypatch.setattr(dfm.pp, "serialize", lambda adata: time.sleep(0.05))
    monkeypatch.setattr(dfm.tl, "embed", lambda adata, progress, seed: time.sleep(0.05))
    monkeypatch.setattr(dfm.tl, "cluster", fake_cluster)
    threads = torch.get_num_threads()
    try:
        row = bench.run_one(2000, 0, threads)
    finally:
        torch.set_num_threads(threads)
    assert asked == [6]
    assert row["serialize_s"] >= 0.05 and row["embed_s"] >= 0.05
    assert row["seconds"] == pytest.approx(row["serialize_s"] + row["embed_s"] + row["cluster_s"], rel=1e-9)
    assert row["ari"] == pytest.approx(1.0) and row["spots"] == 2000
