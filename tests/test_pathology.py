"""Tests of dfmamba_st.pathology: tokens, classifier, synthetic task, data loading, training, saliency."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dfmamba_st.pathology import (
    BACH_CLASSES,
    CropBatches,
    DFMambaClassifier,
    check_image_size,
    evaluate,
    evaluate_resolutions,
    gate_map,
    hed_jitter,
    load_classifier,
    load_image_folder,
    make_synthetic_dataset,
    make_synthetic_image,
    patch_order,
    patchify,
    plot_saliency,
    save_classifier,
    stratified_split,
    token_cells,
    train_classifier,
    unpatchify,
)
from dfmamba_st.pathology.train import classification_loss
from dfmamba_st.pathology.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(depth: int = 2, **kw) -> DFMambaClassifier:
    torch.manual_seed(0)
    return DFMambaClassifier(4, d_model=16, depth=depth, d_state=4, **kw)


# --- classifier ----------------------------------------------------------------------------------------------------


def test_default_classifier_size_and_shapes():
    torch.manual_seed(0)
    model = DFMambaClassifier(n_classes=4).eval()
    n = sum(p.numel() for p in model.parameters())
    assert 600_000 <= n <= 1_200_000, n
    assert model.n_parameters() == n  # every parameter is used when depth > 0
    with torch.no_grad():
        for side in (256, 512):
            logits = model(torch.rand(1, 3, side, side))
            assert logits.shape == (1, 4)
            assert torch.isfinite(logits).all()


def test_logits_are_the_head_of_the_mean_over_tokens():
    model = tiny_model().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens, _ = model.features(images)
        torch.testing.assert_close(model(images), model.head(tokens.mean(dim=1)))


def test_same_weights_any_token_count_and_batch_shapes():
    model = tiny_model().eval()
    with torch.no_grad():
        for h, w in ((64, 64), (128, 128), (64, 128), (16, 16)):
            assert model(torch.rand(3, 3, h, w)).shape == (3, 4)


def test_flat_baseline_builds_only_the_mamba_block():
    flat = tiny_model(depth=0)
    deep = tiny_model(depth=2)
    assert flat.n_parameters() < deep.n_parameters()
    assert not any(name in n for n, _ in flat.named_parameters() for name in ("encoder", "decoder", "gate"))


def test_bad_image_size_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.rand(1, 3, 250, 256))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        patchify(torch.rand(1, 3, 64, 70))
    with pytest.raises(ValueError, match="batch, 3, H, W"):
        model(torch.rand(3, 64, 64))
    assert check_image_size(512, 256) == (32, 16)


# --- tokens --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [4, 16, 32])
def test_tokens_follow_hilbert_curve_on_power_of_two_grid(side):
    cells = token_cells(side, side)
    assert len(np.unique(cells[:, 0] * side + cells[:, 1])) == side * side  # a permutation
    steps = np.abs(np.diff(cells, axis=0)).sum(1)
    assert np.all(steps == 1), "consecutive tokens must be 4-neighbour patches"
    assert tuple(cells[0]) == (0, 0)


def test_patchify_tokens_are_the_patches_in_curve_order_and_unshuffle():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 256, 256)
    tokens = patchify(x)
    assert tokens.shape == (2, 256, 3 * 16 * 16)
    cells = token_cells(16, 16)
    for i in (0, 1, 17, 128, 255):
        r, c = cells[i]
        patch = x[:, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16].reshape(2, -1)
        assert torch.equal(tokens[:, i], patch)
    # neighbours along the sequence are neighbouring patches: their pixels touch
    assert torch.equal(unpatchify(tokens, 256, 256), x)
    # non-square grid round trip (Hilbert on the enclosing power-of-two square)
    y = torch.rand(1, 3, 48, 80)
    assert torch.equal(unpatchify(patchify(y), 48, 80), y)
    assert sorted(patch_order(3, 5).tolist()) == list(range(15))


def test_embedding_order_matches_patchify():
    model = tiny_model()
    x = torch.rand(1, 3, 64, 64)
    direct = model.embed.proj(x).flatten(2).transpose(1, 2)[0]  # row-major
    emb = model.embed(x)[0]
    ref = model.embed.norm(direct[torch.as_tensor(patch_order(4, 4))])
    assert torch.allclose(emb, ref, atol=1e-6)


# --- synthetic task ------------------------------------------------------------------------------------------------


def test_synthetic_is_seeded_balanced_and_uint8():
    x1, y1 = make_synthetic_dataset(5, 64, seed=3)
    x2, y2 = make_synthetic_dataset(5, 64, seed=3)
    x3, _ = make_synthetic_dataset(5, 64, seed=4)
    assert x1.shape == (20, 3, 64, 64) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert np.bincount(y1).tolist() == [5, 5, 5, 5]
    assert np.any(np.diff(y1) < 0)  # shuffled, not sorted by class


def test_synthetic_local_statistics_do_not_give_the_class_away():
    n = 16
    x, y = make_synthetic_dataset(n, 256, seed=0)
    # fraction of dark "nuclei" pixels and mean colour of every image: class means agree up to sampling noise
    stats = np.concatenate([(x.mean(1) < 100).mean(axis=(1, 2))[:, None], x.reshape(len(y), 3, -1).mean(-1)], 1)
    per_class = np.stack([stats[y == k].mean(0) for k in range(4)])
    standard_error = stats.std(0) / np.sqrt(n)
    assert np.all(np.abs(per_class - stats.mean(0)) < 3.5 * standard_error), (per_class, standard_error)


def test_synthetic_organisation_rules():
    from dfmamba_st.pathology.synthetic import _cell_types

    def agreement(types):  # fraction of 4-neighbour cell pairs with the same texture
        return np.concatenate([(types[1:] == types[:-1]).ravel(), (types[:, 1:] == types[:, :-1]).ravel()]).mean()

    rng = np.random.default_rng(0)
    mean_agreement = []
    for label in range(4):
        draws = np.stack([_cell_types(label, 9, 11, rng) for _ in range(200)])
        assert all(abs(int(t.sum()) - 99 / 2) <= 1 for t in draws), "every image holds half of each texture"
        # nor does a cell's texture, or the texture of the odd cell out (99 cells), depend on the class
        assert 0.4 < draws[:, 0, 0].mean() < 0.6 and 0.4 < (draws.sum(axis=(1, 2)) == 50).mean() < 0.6, label
        mean_agreement.append(np.mean([agreement(t) for t in draws]))
    alternating, mixed, clustered, segregated = mean_agreement
    assert alternating == 0.0
    assert 0.4 < mixed < 0.6 < clustered < segregated - 0.05
    img = make_synthetic_image(3, (64, 96), rng=rng, jitter=0.0, p_empty=0.0, noise=0.0)
    assert img.shape == (3, 64, 96)
    # p_empty: the share of cells without a blob; at 1 no "nuclei" (blue well above red) are left, only background
    for p_empty, has_nuclei in ((0.0, True), (1.0, False)):
        img = make_synthetic_image(1, 64, rng=0, p_empty=p_empty, noise=0.0).astype(int)
        assert ((img[2] - img[0]) > 25).any() == has_nuclei
    with pytest.raises(ValueError, match="label"):
        make_synthetic_image(7, 64, rng=0)
    with pytest.raises(ValueError, match="n_per_class"):
        make_synthetic_dataset(0, 64)


def _patch_purple(images: np.ndarray) -> np.ndarray:
    """(n, rows, cols) mean blue-minus-red of every 16×16 patch: high for "nuclei" blobs, low for "stroma"."""
    x = images.astype(np.float32) / 255.0
    n, _, h, w = x.shape
    return (x[:, 2] - x[:, 0]).reshape(n, h // 16, 16, w // 16, 16).mean((2, 4))


def _arrangement_features(images: np.ndarray) -> np.ndarray:
    """Agreement of the patch textures (sign of the purple score) between patches 1, 2 and 4 apart."""
    score = _patch_purple(images)
    t = np.where(score > np.median(score, axis=(1, 2), keepdims=True), 1.0, -1.0)
    lags = [(t[:, k:] * t[:, :-k]).mean((1, 2)) + (t[:, :, k:] * t[:, :, :-k]).mean((1, 2)) for k in (1, 2, 4)]
    return np.stack(lags, 1)


def _single_patch_features(images: np.ndarray) -> np.ndarray:
    """Image means and spreads of per-patch statistics, each patch on its own (what a local model can pool)."""
    x = images.astype(np.float32) / 255.0
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // 16, 16, w // 16, 16)
    mean, std = patches.mean((3, 5)), patches.std((3, 5))
    purple = (x[:, 2] - x[:, 0]).reshape(n, h // 16, 16, w // 16, 16) > 0
    both = purple.mean((2, 4)) * (1 - purple.mean((2, 4)))  # how much both textures share one patch
    per_patch = [mean.mean((2, 3)), mean.std((2, 3)), std.mean((2, 3)), std.std((2, 3)), both.mean((1, 2))[:, None]]
    return np.concatenate(per_patch, 1)


def _probe_accuracy(features, train: tuple, test: tuple) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(features(train[0]), train[1])
    return clf.score(features(test[0]), test[1])


def test_synthetic_class_is_in_the_arrangement_of_patches_not_in_single_patches():
    train, test = make_synthetic_dataset(20, 256, seed=0), make_synthetic_dataset(20, 256, seed=1)
    # relations between patches give the class away almost perfectly: the task is solvable from the token grid
    assert _probe_accuracy(_arrangement_features, train, test) >= 0.85
    # statistics of single patches, pooled over the image, are at chance (0.25) on the patch-aligned lattice ...
    assert _probe_accuracy(_single_patch_features, train, test) <= 0.45
    # ... but not when blobs may straddle patch borders: the same probe then reads the arrangement inside patches
    loose = [make_synthetic_dataset(20, 256, seed=s, align=None) for s in (0, 1)]
    assert _probe_accuracy(_single_patch_features, *loose) >= 0.5


# --- training ------------------------------------------------------------------------------------------------------


def test_tiny_model_training_loss_falls():
    # a tiny model fits a handful of synthetic images: the cross-entropy must fall well below chance (ln 4 = 1.39)
    x, y = make_synthetic_dataset(2, 64, seed=0)
    model = tiny_model(depth=2)
    result = train_classifier(
        model, (x, y), crop=None, epochs=80, batch_size=8, lr=1e-2, augment=False, patience=None, progress=False
    )
    ce = [row["ce"] for row in result.history]
    assert ce[0] > 1.2 and ce[-1] < 0.7, ce
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    out = evaluate(model, x, y)
    assert out["n_tokens"] == 16 and out["confusion"].sum() == len(y)
    assert out["accuracy"] >= 0.75


def test_dfmamba_learns_the_arrangement_task_and_keeps_it_on_larger_fields():
    # a small version of the benchmark: 512 images of 128 px (64 tokens), 640 steps of a small DF-Mamba (30–55 s on one
    # thread). The class is in the arrangement of patches only (see the probe test above), so beating chance (0.25)
    # means the model learned relations between tokens; the same weights are then scored on 256-px fields (256
    # tokens, never trained on). Small models sit on a plateau at chance for a while before they pick up the
    # relational signal, and how long depends on the seed and schedule: this seed and schedule leave it by epoch 4.
    train = make_synthetic_dataset(128, 128, seed=0)
    test = make_synthetic_dataset(16, 256, seed=1)
    torch.manual_seed(0)
    model = DFMambaClassifier(4, d_model=32, depth=3, d_state=16)
    result = train_classifier(model, train, crop=None, epochs=20, lr=2e-3, augment=False, progress=False)
    assert result.history[-1]["ce"] < 0.8, [round(row["ce"], 3) for row in result.history]
    accuracy = {n: r["accuracy"] for n, r in evaluate_resolutions(model, *test, crops=(128, None)).items()}
    assert accuracy[64] >= 0.6 and accuracy[256] >= 0.6, accuracy


def test_crop_batches_are_repeatable_and_augmented():
    x, y = make_synthetic_dataset(2, 64, seed=0)
    batches = CropBatches(x, y, crop=32, batch_size=3, seed=1)
    a = [b for b, _ in batches(0)]
    b = [b for b, _ in batches(0)]
    c = [b for b, _ in batches(1)]
    assert len(a) == len(batches) == 3
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 3, 32, 32) and 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    with pytest.raises(ValueError, match="crop"):
        CropBatches(x, y, crop=128)


def test_hed_jitter_identity_and_change():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 0.9 + 0.05
    assert torch.allclose(hed_jitter(x, 0.0, 0.0), x, atol=1e-4)
    assert not torch.allclose(hed_jitter(x, 0.2, 0.05, torch.Generator().manual_seed(0)), x, atol=1e-3)


def test_stratified_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 25)
    parts = stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    assert sum(len(p) for p in parts) == 100
    assert len(np.unique(np.concatenate(parts))) == 100
    for p in parts:
        counts = np.bincount(labels[p], minlength=4)
        assert counts.max() - counts.min() <= 1
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted
    for fractions in [(0.5, 0.2), (0.7, 0.15, 0.1499), (1.2, -0.2, 0.0)]:  # sums 0.7, 0.9999 (not within 1e-6); < 0
        with pytest.raises(ValueError, match="non-negative and sum to 1"):
            stratified_split(labels, fractions)


# --- image folder --------------------------------------------------------------------------------------------------


def _write_folder(root, size=(40, 48)):
    colours = {}
    for k, name in enumerate(BACH_CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(2):
            colour = (30 * k + 10, 200 - 20 * j, 60 * k)
            Image.fromarray(np.full((*size, 3), colour, np.uint8)).save(root / name / f"img{j}.png")
            colours[(k, j)] = colour
    (root / "Normal" / "notes.txt").write_text("not an image")
    return colours


def test_image_folder_loader_reads_pngs(tmp_path):
    colours = _write_folder(tmp_path)
    data = load_image_folder(tmp_path, image_size=32)
    assert data.class_names == BACH_CLASSES
    assert data.images.shape == (8, 3, 32, 32) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(data.paths) == 8 and data.paths[2].endswith("Benign/img0.png")
    for i, (k, j) in enumerate([(k, j) for k in range(4) for j in range(2)]):
        assert tuple(data.images[i, :, 5, 5]) == colours[(k, j)]
    sub = data.subset(np.array([1, 7]))
    assert sub.labels.tolist() == [0, 3] and len(sub.paths) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "OnlyOne").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "OnlyOne" / "a.png")
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path)


@pytest.mark.filterwarnings("ignore:The validation split is empty:UserWarning")  # too few images per class
def test_train_entry_point_and_save_load(tmp_path):
    summary = train_main(
        [
            "--synthetic",
            "--n-per-class", "5",
            "--image-size", "64",
            "--crop", "32",
            "--epochs", "1",
            "--d-model", "8",
            "--depth", "1",
            "--d-state", "2",
            "--batch-size", "8",
            "--out", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert set(summary["accuracy"]) == {"4", "16"}  # 32 px crop = 4 tokens, 64 px field = 16 tokens
    model = load_classifier(tmp_path / "run")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4)
    again = save_classifier(model, tmp_path / "again")
    assert (again / "model.safetensors").exists()


# --- plots ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grad_input", "smoothgrad", "gate"])
def test_saliency_plot_returns_figure(method):
    import matplotlib.pyplot as plt

    model = tiny_model()
    image = make_synthetic_image(2, 64, rng=0)
    kwargs = {"n_samples": 2} if method == "smoothgrad" else {}
    fig = plot_saliency(model, image, method=method, show=False, return_fig=True, **kwargs)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes[0].images) == 2  # the image and the overlay
    _, ax = plt.subplots()
    assert plot_saliency(model, image, method=method, ax=ax, show=False) is ax
    plt.close("all")


def test_gate_map_shape_and_range():
    model = tiny_model(depth=2)
    g = gate_map(model, torch.rand(3, 64, 64), depth=1)
    assert g.shape == (4, 4) and float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    with pytest.raises(ValueError, match="depth"):
        gate_map(model, torch.rand(3, 64, 64), depth=5)
    with pytest.raises(ValueError, match="no fusion gates"):
        gate_map(tiny_model(depth=0), torch.rand(3, 64, 64))
    with pytest.raises(TypeError):  # options are keyword-only
        gate_map(model, torch.rand(3, 64, 64), 1)
    with pytest.raises(TypeError):
        evaluate_resolutions(model, np.zeros((1, 3, 64, 64), np.uint8), np.zeros(1), (32, None))


def test_crop_batches_apply_the_stain_jitter():
    """P1: with flips and colour jitter neutralised, a flat image changes only through the HED jitter."""
    flat = np.full((4, 3, 32, 32), 150, np.uint8)  # a uniform image is invariant under flips and rotations
    labels = np.arange(4) % 2
    out = next(iter(CropBatches(flat, labels, crop=None, batch_size=4, jitter=0.0, hed_sigma=0.2, seed=0)(0)))[0]
    assert not torch.allclose(out, torch.full_like(out, 150 / 255), atol=1e-3)
    none = CropBatches(flat, labels, crop=None, batch_size=4, jitter=0.0, hed_sigma=0.0, hed_bias=0.0, seed=0)
    assert torch.allclose(next(iter(none(0)))[0], torch.full_like(out, 150 / 255), atol=1e-3)


def test_crop_batches_use_rotations_as_well_as_flips():
    """P6: square crops get every one of the 8 flips and rotations by 90 degrees (the flip alone reaches 2)."""
    img = np.arange(3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16) / (3 * 16 * 16)
    images = np.repeat(img, 64, 0)
    batches = CropBatches(images, np.zeros(64), crop=None, batch_size=64, jitter=0.0, hed_sigma=0.0, hed_bias=0.0)
    x = torch.from_numpy(img[0])
    # no stain change at sigma = bias = 0 (up to the OD round trip)
    out = next(iter(batches(0)))[0]
    dihedral = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    dihedral += [v.flip(-1) for v in dihedral]
    which = [int(np.argmin([float((o - v).abs().max()) for v in dihedral])) for o in out]
    assert all(float((o - dihedral[w]).abs().max()) < 2e-3 for o, w in zip(out, which))
    assert set(which) == set(range(8)), which


def test_crop_offsets_cover_every_position():
    """P2: random crops reach the first and the last row and column."""
    h = w = 24
    rows = np.repeat(np.arange(h, dtype=np.uint8)[:, None], w, 1)
    cols = rows.T.copy()
    img = np.stack([rows, cols, np.zeros_like(rows)])[None].repeat(8, 0)
    batches = CropBatches(img, np.zeros(8), crop=16, batch_size=8, augment=False, seed=0)
    tops, lefts = [], []
    for epoch in range(10):
        for x, _ in batches(epoch):
            tops += (x[:, 0, 0, 0] * 255).round().long().tolist()
            lefts += (x[:, 1, 0, 0] * 255).round().long().tolist()
    assert min(tops) == 0 and max(tops) == h - 16
    assert min(lefts) == 0 and max(lefts) == w - 16
    assert any(top != left for top, left in zip(tops, lefts))  # two draws, not one


def test_crop_batches_reshuffle_every_epoch_and_refuse_no_images_or_a_crop_wider_than_them():
    images = np.zeros((16, 3, 32, 32), np.uint8)
    batches = CropBatches(images, np.arange(16), crop=None, batch_size=16, augment=False, seed=0)
    orders = [next(iter(batches(epoch)))[1].tolist() for epoch in range(2)]  # the labels name the images
    assert all(sorted(order) == list(range(16)) for order in orders)  # every image once per epoch
    assert orders[0] != list(range(16)) and orders[0] != orders[1]
    with pytest.raises(ValueError, match="at least one"):
        CropBatches(images[:0], np.zeros(0), crop=16)
    with pytest.raises(ValueError, match="crop=48 must lie between 1 and the image size"):  # 64 high, 32 wide
        CropBatches(np.zeros((2, 3, 64, 32), np.uint8), np.zeros(2), crop=48)


class _Recorder(nn.Module):
    """A stand-in classifier that records what it is shown and predicts class 0."""

    n_classes, patch_size = 2, 16

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(len(x), 2) + self.w


def test_evaluate_at_a_crop_scores_the_centre_crop():
    """P3: the crop evaluated is the one whose token count is reported."""
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    model = _Recorder()
    out = evaluate(model, images, np.zeros(3, np.int64), crop=32)
    assert out["n_tokens"] == 4
    shown = torch.cat(model.seen)
    assert shown.shape == (3, 3, 32, 32)
    assert torch.equal(shown, torch.from_numpy(images[:, :, 16:48, 16:48]).float() / 255)


def test_validation_uses_centre_crops_of_the_training_size():
    """P4: the full field stays unseen until the test."""
    x, y = make_synthetic_dataset(2, 64, seed=0)
    model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    sizes = []
    model.embed.register_forward_hook(lambda m, inp, out: sizes.append((m.training, tuple(inp[0].shape[-2:]))))
    train_classifier(model, (x, y), val=(x, y), crop=32, epochs=1, batch_size=8, progress=False)
    assert {s for training, s in sizes if not training} == {(32, 32)}


def test_classification_loss_validates_on_cross_entropy_alone():
    """P5: fit's validation pass (eval mode) must not include the auxiliary terms."""
    torch.manual_seed(0)
    model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    x, y = torch.rand(2, 3, 64, 64), torch.tensor([0, 3])
    model.eval()
    loss, terms = classification_loss(model, (x, y))
    logits, aux = model.forward_with_aux(x)
    assert float(aux.loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, y).detach()), rel=1e-6)
    model.train()
    loss, terms = classification_loss(model, (x, y))
    assert float(loss.detach()) == pytest.approx(terms["ce"] + terms["aux"], rel=1e-5)
    model.eval()  # "acc": the batch's accuracy of the arg-max predictions
    predicted = logits.argmax(-1)
    assert classification_loss(model, (x, predicted))[1]["acc"] == 1.0
    assert classification_loss(model, (x, (predicted + 1) % 4))[1]["acc"] == 0.0


def test_gate_map_gives_each_patch_the_gate_of_its_coarse_token():
    """P9: coarse token i at depth k holds the fine tokens i*2^k ... (i+1)*2^k - 1 of the Hilbert sequence."""
    torch.manual_seed(0)
    model = DFMambaClassifier(4, d_model=8, depth=2, d_state=2, min_len=2)
    image = torch.rand(3, 64, 64)
    _, aux = model.eval().forward_with_aux(image[None])
    position = np.argsort(patch_order(4, 4))  # sequence position of every patch (row-major)
    assert len(aux.gates) == 2
    for depth in (0, 1):
        g = aux.gates[depth][0].numpy()
        grid = gate_map(model, image, depth=depth)
        for r in range(4):
            for c in range(4):
                assert grid[r, c] == pytest.approx(g[position[r * 4 + c] // 2**depth], abs=1e-6)


def test_stratified_split_depends_on_the_seed():
    """M27: the seed shuffles the classes (same seed same split, another seed another split)."""
    from dfmamba_st.pathology import stratified_split

    labels = np.repeat(np.arange(3), 20)
    a, b, c = (stratified_split(labels, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])


class _Fixed(nn.Module):
    """Predicts class 0 for every image (n_classes 3)."""

    n_classes, patch_size = 3, 16

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3) + self.w


def test_confusion_rows_are_true_classes():
    """M28: confusion[i, j] counts images of class i predicted as j."""
    from dfmamba_st.pathology import evaluate

    out = evaluate(_Fixed(), np.zeros((3, 3, 16, 16), np.uint8), np.array([2, 2, 0]))
    assert out["confusion"][2, 0] == 2 and out["confusion"][0, 0] == 1 and out["confusion"][0, 2] == 0


def test_saliency_is_gradient_times_centred_input_and_explains_the_prediction():
    """M29/M35: sum_c |d logit / d x_c * (x_c - mean_c)|, normalised; the default target is the predicted class."""
    from dfmamba_st.pathology import DFMambaClassifier, saliency_map

    torch.manual_seed(0)
    model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2, pixel_mean=(0.7, 0.2, 0.4))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # class 2 predicted
    image = torch.rand(3, 32, 32)
    sal, target = saliency_map(model, image)
    assert target == 2
    x = image[None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.eval()(x)[0, 2], x)
    raw = (grad * (image[None] - model.pixel_mean)).abs().sum(1)[0].numpy()
    np.testing.assert_allclose(sal, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)


def test_smoothgrad_is_the_mean_absolute_gradient_over_noisy_copies():
    """sum_c |d logit / d x_c| averaged over n_samples copies with Gaussian noise of SD `noise` (drawn from `seed`)."""
    from dfmamba_st.pathology import DFMambaClassifier, saliency_map

    torch.manual_seed(0)
    model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2).eval()
    image = torch.rand(3, 32, 32)
    sal, target = saliency_map(model, image, method="smoothgrad", n_samples=3, noise=0.2, seed=5)
    gen = torch.Generator().manual_seed(5)
    raw = torch.zeros(32, 32)
    for _ in range(3):
        xn = (image[None] + 0.2 * torch.randn((1, 3, 32, 32), generator=gen)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xn)[0, target], xn)
        raw += grad.abs().sum(1)[0] / 3  # the absolute value per channel, then the sum over channels
    raw = raw.numpy()
    np.testing.assert_allclose(sal, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)
    plain, _ = saliency_map(model, image, method="smoothgrad", n_samples=3, noise=0.0, seed=5)
    assert np.abs(plain - sal).max() > 0.05  # the noise matters


@pytest.mark.parametrize(("stain", "vector"), [(0, [0.65, 0.70, 0.29]), (1, [0.07, 0.99, 0.11])])
def test_hed_jitter_scales_the_stain_concentrations(stain, vector):
    """A pixel of pure haematoxylin (or eosin) unmixes to that stain alone; the jitter scales it by that stain's factor.

    The stain vectors are the published ones (Ruifrok & Johnston 2001), not the module's.
    """
    od = torch.tensor(vector, dtype=torch.float64)
    od /= od.norm()  # optical density of one unit of the stain
    pixel = torch.pow(10.0, -0.8 * od).reshape(1, 3, 1, 1).expand(3, 3, 2, 2).contiguous()  # three images
    # one factor per image and stain
    scale = 1.0 + 0.3 * (2.0 * torch.rand(3, 3, 1, 1, generator=torch.Generator().manual_seed(0)) - 1.0)
    out = hed_jitter(pixel, sigma=0.3, bias=0.0, generator=torch.Generator().manual_seed(0))
    expected = torch.pow(10.0, -0.8 * scale[:, stain, None].double() * od.reshape(1, 3, 1, 1)).expand_as(pixel)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)  # the other two stains stay at zero


def test_hed_jitter_shifts_each_stain_by_its_own_draw():
    """At ``sigma=0`` only the shifts act: the optical density moves by the sum over stains of the stain's shift times
    its unit vector (the published vectors), one shift per image and stain, drawn after the scales."""
    vectors = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
    vectors /= vectors.norm(dim=1, keepdim=True)
    od = torch.full((3,), 0.5, dtype=torch.float64)  # a grey pixel
    pixel = torch.pow(10.0, -od).reshape(1, 3, 1, 1).expand(4, 3, 2, 2).contiguous()  # four images
    generator = torch.Generator().manual_seed(0)
    torch.rand(4, 3, 1, 1, generator=generator)  # the scales' draw, without effect at sigma = 0
    shift = 0.1 * (2.0 * torch.rand(4, 3, 1, 1, generator=generator) - 1.0)  # (image, stain)
    out = hed_jitter(pixel, sigma=0.0, bias=0.1, generator=torch.Generator().manual_seed(0))
    expected = torch.pow(10.0, -(od + shift[:, :, 0, 0].double() @ vectors))[:, :, None, None].expand_as(pixel)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_random_dihedral_turns_then_flips_left_right_as_documented():
    from dfmamba_st.pathology.data import random_dihedral

    for shape, n_draws in (((32, 1, 3, 3), 8), ((32, 1, 2, 3), 4)):  # square: 8 transforms; otherwise 4
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        draws = torch.randint(0, n_draws, (len(x),), generator=torch.Generator().manual_seed(0)).tolist()
        out = random_dihedral(x, torch.Generator().manual_seed(0))
        for image, result, draw in zip(x, out, draws):
            turns, flip = (draw % 4, draw >= 4) if n_draws == 8 else (2 * (draw % 2), draw >= 2)
            expected = torch.rot90(image, turns, dims=(-2, -1))  # counter-clockwise
            assert torch.equal(result, expected.flip(-1) if flip else expected)
        assert set(draws) == set(range(n_draws))


def test_colour_jitter_follows_its_three_formulas():
    from dfmamba_st.pathology.data import colour_jitter

    x = torch.rand(2, 3, 5, 4, dtype=torch.float64) * 0.5 + 0.25
    out = colour_jitter(x, 0.2, 0.3, 0.4, generator=torch.Generator().manual_seed(1))
    draws = torch.rand(3, 2, 1, 1, 1, generator=torch.Generator().manual_seed(1))  # one per image, per change
    # each factor U(1 - s, 1 + s), drawn in float32 as the function draws it
    brightness, contrast, saturation = ((1.0 + s * (2.0 * d - 1.0)).double() for s, d in zip((0.2, 0.3, 0.4), draws))
    y = x * brightness
    mean = y.mean(dim=(1, 2, 3), keepdim=True)  # over the channels and pixels of each image
    y = (y - mean) * contrast + mean
    grey = 0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:]
    y = ((y - grey) * saturation + grey).clamp(0.0, 1.0)
    torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)


def test_crop_batches_flip_images_that_are_not_square():
    """Whole fields that are not square (BACH at 384 x 512) get the flips and the half turn that keep their shape."""
    img = np.arange(3 * 6 * 8, dtype=np.float32).reshape(1, 3, 6, 8) / (3 * 6 * 8)
    batches = CropBatches(
        np.repeat(img, 32, 0), np.zeros(32), crop=None, batch_size=32, jitter=0.0, hed_sigma=0.0, hed_bias=0.0
    )
    out = next(iter(batches(0)))[0]
    x = torch.from_numpy(img[0])
    group = [x, torch.rot90(x, 2, (-2, -1)), x.flip(-1), torch.rot90(x, 2, (-2, -1)).flip(-1)]
    which = [int(np.argmin([float((o - v).abs().max()) for v in group])) for o in out]
    assert all(float((o - group[w]).abs().max()) < 2e-3 for o, w in zip(out, which))
    assert set(which) == {0, 1, 2, 3}, which


def test_load_image_resizes_bilinearly(tmp_path):
    from dfmamba_st.pathology.data import load_image

    path = tmp_path / "two.png"
    Image.fromarray(np.array([[[0, 0, 0], [200, 200, 200]]], np.uint8)).save(path)  # 1 x 2 pixels: black, grey
    assert load_image(path, size=(1, 1))[:, 0, 0].tolist() == [100, 100, 100]  # the mean, not one of the two
    assert load_image(path, size=(3, 5)).shape == (3, 3, 5)  # (height, width)
    with pytest.raises(FileNotFoundError):  # a missing file is not an unreadable one
        load_image(tmp_path / "absent.png")


def test_to_unit_float_returns_a_new_tensor():
    """M30: floats are copied ('a new float32 tensor'): writing to the result leaves the caller's images alone."""
    from dfmamba_st.pathology import to_unit_float

    arr = np.full((2, 2), 0.5, np.float32)
    out = to_unit_float(arr)
    out += 0.25
    assert np.all(arr == 0.5)
    t = torch.full((2, 2), 0.5)
    assert to_unit_float(t) is not t and to_unit_float(t).data_ptr() != t.data_ptr()


def test_check_image_size_refuses_empty_or_negative_sides():
    """M31: sides must be positive multiples of the patch."""
    from dfmamba_st.pathology import check_image_size

    for h, w in ((0, 32), (32, 0), (-16, 32)):
        with pytest.raises(ValueError, match="positive multiples"):
            check_image_size(h, w)


def test_save_load_keeps_every_config_field(tmp_path):
    """M32/M36: min_len, hidden and the DF-Mamba options come back, so the loaded model computes the same."""
    from dfmamba_st.pathology import DFMambaClassifier, load_classifier, save_classifier

    torch.manual_seed(0)
    kw = dict(min_len=2, hidden=6, dropout=0.1, embed_scale=0.5, bidirectional=True, dt_scaling="linear")
    model = DFMambaClassifier(3, d_model=8, depth=2, d_state=2, **kw, lambdas=(0.5, 1.0, 0.0)).eval()
    again = load_classifier(save_classifier(model, tmp_path))
    assert again.config == json.loads(json.dumps(model.config))
    x = torch.rand(2, 3, 32, 32)  # 4 tokens: min_len 2 recurses, the default 8 would not
    with torch.no_grad():
        y, aux = model.forward_with_aux(x)
        y2, aux2 = again.forward_with_aux(x)
    assert aux.lengths == aux2.lengths == [4, 2, 1]
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(aux2.loss, aux.loss, rtol=0, atol=0)


def test_cli_writes_results_json_with_history_and_class_names(tmp_path):
    """M33: results.json holds the summary and the per-epoch history; config.json the class names."""
    from dfmamba_st.pathology import SYNTHETIC_CLASSES
    from dfmamba_st.pathology.train import main

    argv = ["--synthetic", "--n-per-class", "8", "--image-size", "32", "--crop", "16", "--epochs", "2"]
    argv += ["--d-model", "8", "--depth", "1", "--d-state", "2", "--batch-size", "8", "--out", str(tmp_path)]
    summary = main(argv)
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == {*summary, "history"}
    assert {k: res[k] for k in summary} == json.loads(json.dumps(summary))
    assert len(res["history"]) == res["epochs_run"] == 2 and set(res["accuracy"]) == {"1", "4"}
    assert res["epoch_kept"] == res["best_epoch"]  # with a validation split, the best epoch's weights are kept
    assert json.loads((tmp_path / "config.json").read_text())["class_names"] == list(SYNTHETIC_CLASSES)
