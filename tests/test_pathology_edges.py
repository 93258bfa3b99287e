"""Edge cases of dfmamba_st.pathology: save/load, global state, empty sets, float images, plots, folders, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from _shared import warned_at
from PIL import Image

from dfmamba_st import pathology
from dfmamba_st.core import TrainResult, isolated_global_state
from dfmamba_st.pathology import (
    BACH_CLASSES,
    CropBatches,
    DFMambaClassifier,
    ImageSet,
    eval_batches,
    evaluate,
    evaluate_resolutions,
    list_image_folder,
    load_classifier,
    load_image,
    load_image_folder,
    make_synthetic_dataset,
    plot_saliency,
    random_dihedral,
    saliency_map,
    save_classifier,
    stratified_split,
    to_unit_float,
    tokens_to_grid,
    train_classifier,
    unpatchify,
)
from dfmamba_st.pathology import train as train_module
from dfmamba_st.pathology.data import center_crop

TINY = {"d_model": 8, "depth": 1, "d_state": 2}
CLI_TINY = ["--epochs", "1", "--d-model", "8", "--depth", "1", "--d-state", "2", "--batch-size", "8"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(n_classes: int = 4, **kw) -> DFMambaClassifier:
    torch.manual_seed(0)
    return DFMambaClassifier(n_classes, **{**TINY, **kw})


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """Two 32-px uint8 images per class."""
    return make_synthetic_dataset(2, 32, seed=0)


# --- save / load ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_pixel_normalisation(tmp_path):
    model = tiny_model(pixel_mean=(0.7, 0.5, 0.6), pixel_std=np.array([0.2, 0.3, 0.1]), dropout=0.1).eval()
    again = load_classifier(save_classifier(model, tmp_path))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert torch.equal(again.pixel_mean, model.pixel_mean) and torch.equal(again.pixel_std, model.pixel_std)
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert config["pixel_mean"] == pytest.approx([0.7, 0.5, 0.6])
    assert config["pixel_std"] == pytest.approx([0.2, 0.3, 0.1])


def test_the_embedding_takes_the_images_less_the_pixel_mean_over_the_pixel_std():
    model = tiny_model(pixel_mean=(0.7, 0.5, 0.6), pixel_std=(0.2, 0.3, 0.1)).eval()
    seen = []
    model.embed.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    mean, std = torch.tensor([0.7, 0.5, 0.6]).reshape(3, 1, 1), torch.tensor([0.2, 0.3, 0.1]).reshape(3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
def test_a_classifier_is_read_back_in_the_precision_it_was_saved_in(tmp_path, dtype):
    model = tiny_model().to(dtype).eval()
    again = load_classifier(save_classifier(model, tmp_path))
    assert {p.dtype for p in again.parameters()} == {dtype}
    x = torch.rand(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_validation_images_smaller_than_the_crop_are_refused_before_training(synthetic, monkeypatch):
    images, labels = synthetic
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("trained before checking the validation"))
    small = images[:, :, :16, :16]
    with pytest.raises(ValueError, match=r"Validation images: Crop size 32 is larger than the images \(16×16\)"):
        train_classifier(tiny_model(), (images, labels), val=(small, labels), crop=32, progress=False)
    with pytest.raises(ValueError, match="Validation images: Image sides must be positive multiples of the patch"):
        train_classifier(tiny_model(), (images, labels), val=(images[:, :, :24, :24], labels), crop=None)
    with pytest.raises(ValueError, match=r"Validation images: Float images must hold values in \[0, 1\]"):
        train_classifier(tiny_model(), (images, labels), val=(images.astype(np.float32), labels), crop=32)


def test_a_whole_float_crop_trains_and_evaluates_as_the_int(synthetic):
    images, labels = synthetic
    runs = [
        train_classifier(tiny_model(), (images, labels), val=(images, labels), crop=c, epochs=1, progress=False)
        for c in (32, 32.0)
    ]
    assert runs[0].history == runs[1].history
    (want, _), (got, _) = (next(eval_batches(images, labels, crop=c)) for c in (32, 32.0))
    assert torch.equal(got, want)
    assert len(CropBatches(images, labels, crop=32.0, batch_size=4)) == len(labels) // 4 + bool(len(labels) % 4)
    with pytest.raises(ValueError, match=r"crop must be a whole number >= 1, got 31\.5"):
        CropBatches(images, labels, crop=31.5)


def test_save_classifier_writes_nothing_when_its_extra_cannot_be_stored(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_classifier(tiny_model(), tmp_path / "model", extra={"counts": np.array([1])})
    assert not (tmp_path / "model").exists()  # no weights without their config


def test_pixel_statistics_of_the_wrong_length_are_refused_at_construction():
    for kw in ({"pixel_mean": (0.5, 0.5)}, {"pixel_std": (0.2, 0.2, 0.2, 0.2)}):
        with pytest.raises(ValueError, match=r"must be one value or one per channel \(in_chans=3\)"):
            tiny_model(**kw)
    assert tiny_model(in_chans=1, pixel_mean=(0.4,)).pixel_mean.shape == (1, 1, 1)


def test_load_classifier_reads_a_config_saved_without_pixel_statistics(tmp_path):
    model = tiny_model().eval()  # default normalisation, as every model saved by the old version of the CLI
    save_classifier(model, tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    for key in ("pixel_mean", "pixel_std"):
        del saved["config"][key]
    path.write_text(json.dumps(saved))
    again = load_classifier(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_grey_images_train_evaluate_and_save_without_the_rgb_augmentation(synthetic, tmp_path):
    images, labels = synthetic
    grey = images.mean(axis=1, keepdims=True).round().astype(np.uint8)  # (n, 1, H, W)
    model = tiny_model(in_chans=1)
    with pytest.raises(ValueError, match=r"need RGB images .* got 1 channel\(s\)\. Pass augment=False"):
        train_classifier(model, (grey, labels), crop=16, epochs=1, progress=False)
    result = train_classifier(model, (grey, labels), crop=16, epochs=1, augment=False, progress=False)
    assert len(result.history) == 1
    assert evaluate(model, grey, labels)["confusion"].sum() == len(labels)
    again = load_classifier(save_classifier(model.eval(), tmp_path))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_batch_sizes_given_as_whole_floats_work_and_eval_batches_checks_at_the_call(synthetic):
    images, labels = synthetic
    assert [len(y) for _, y in eval_batches(images, labels, batch_size=4.0)] == [4, 4]
    assert [len(y) for _, y in CropBatches(images, labels, crop=16, batch_size=4.0)(0)] == [4, 4]
    with pytest.raises(ValueError, match="as many labels as images"):
        eval_batches(images, labels[:2])  # at the call, not at the first batch
    with pytest.raises(ValueError, match="larger than the images"):
        eval_batches(images, labels, crop=64)


def test_tokens_to_grid_refuses_values_of_another_length():
    assert tokens_to_grid(np.arange(4), 2, 2).tolist() == [[0, 1], [3, 2]]
    for n in (3, 6):  # six values were cut to four silently, three raised a bare IndexError
        with pytest.raises(ValueError, match=r"one value per token \(2×2 = 4\), got shape \(" + str(n)):
            tokens_to_grid(np.arange(n), 2, 2)
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, L"):
        unpatchify(torch.zeros(4, 768), 32, 32)


def test_image_set_subset_takes_a_boolean_mask_with_paths():
    images = np.arange(3 * 3 * 4 * 4, dtype=np.uint8).reshape(3, 3, 4, 4)
    data = ImageSet(images, np.arange(3), ("a", "b", "c"), ["p0", "p1", "p2"])
    got = data.subset(np.array([True, False, True]))
    want = data.subset(np.array([0, 2]))
    assert got.paths == want.paths == ["p0", "p2"]
    np.testing.assert_array_equal(got.images, want.images)
    with pytest.raises(ValueError, match=r"one value per image \(3\)"):
        data.subset(np.array([True, False]))


def test_evaluate_resolutions_refuses_a_crop_the_model_cannot_take_instead_of_skipping_it(synthetic):
    images, labels = synthetic
    big = np.concatenate([images, images[:, :, :16]], axis=2)  # 48 px high
    big = np.concatenate([big, big[:, :, :, :16]], axis=3)  # 48 × 48
    with pytest.raises(ValueError, match="multiple"):
        evaluate_resolutions(tiny_model(), big, labels, crops=(32, 40))


def test_random_dihedral_of_no_image_is_no_image():
    x = torch.zeros(0, 3, 8, 8)
    out = random_dihedral(x)
    assert out.shape == (0, 3, 8, 8) and out is not x  # a new tensor, as for any batch


def test_empty_image_arrays_pass_the_pixel_check_and_a_crop_wider_than_the_images_is_refused():
    assert to_unit_float(np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    with pytest.raises(ValueError, match="larger than the images"):  # fits the height (64), not the width (32)
        center_crop(np.zeros((1, 3, 64, 32), np.uint8), 48)


# --- global state and seed=None ------------------------------------------------------------------------------------


def _global_state() -> tuple:
    return (
        random.getstate(),
        np.random.get_state()[1].tolist(),  # noqa: NPY002
        torch.random.get_rng_state(),
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


@pytest.mark.parametrize("seed", [42, None])
def test_train_classifier_leaves_the_global_state_as_it_found_it(synthetic, seed):
    with isolated_global_state():  # whatever happens, the test itself leaves the session as it was
        torch.use_deterministic_algorithms(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        random.seed(1)
        np.random.seed(1)  # noqa: NPY002 - the global state is what this test is about
        torch.manual_seed(1)
        before = _global_state()
        model = tiny_model()
        torch.manual_seed(1)
        result = train_classifier(model, synthetic, crop=32, epochs=1, batch_size=4, seed=seed, progress=False)
        after = _global_state()
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])
    assert after[3:] == (False, None)


def test_seed_none_crops_follow_torch_global_seed(synthetic):
    seeds = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        seeds.append(CropBatches(*synthetic, crop=32, seed=None).seed)
    assert seeds[0] == seeds[1] != seeds[2]


# --- empty sets ----------------------------------------------------------------------------------------------------


def test_evaluate_checks_labels_before_casting_them_as_training_does(synthetic):
    images, labels = synthetic
    for bad, message in (
        (labels + 0.7, "class indices \\(whole numbers\\), got float64"),  # 2.7 was read as class 2
        (np.array(["a", "b"] * (len(labels) // 2)), "class indices \\(whole numbers\\)"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate(tiny_model(), images, bad)
    whole = evaluate(tiny_model(), images, labels.astype(np.float64))  # whole numbers as floats are fine
    assert whole["confusion"].sum() == len(labels)


def test_the_model_refuses_uint8_images_and_takes_float64_in_its_precision(synthetic):
    images = torch.from_numpy(synthetic[0][:2])  # uint8, as the loaders give them
    model = tiny_model().eval()
    with pytest.raises(TypeError, match=r"floats in \[0, 1\], got torch.uint8.*to_unit_float"):
        model(images)
    unit = pathology.to_unit_float(images)
    with torch.no_grad():
        torch.testing.assert_close(model(unit.double()), model(unit))


def test_evaluate_on_an_empty_set_gives_nan_accuracy():
    out = evaluate(tiny_model(), np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0, np.int64))
    assert np.isnan(out["accuracy"])
    assert out["predictions"].shape == (0,) and out["confusion"].shape == (4, 4) and out["confusion"].sum() == 0
    assert out["n_tokens"] == 4 and out["image_size"] == (32, 32)


class _MeanColourClassifier(torch.nn.Module):
    """A classifier with neither ``patch_size`` nor ``n_classes``: a linear map of the mean colour, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        with torch.no_grad():  # every image is class 2
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def test_evaluate_takes_a_model_without_patch_size_or_n_classes():
    """16-px patches count the tokens, the confusion matrix spans labels and predictions, the model ends in eval mode.

    (A model of its own: DFMambaClassifier has both attributes.)
    """
    model = _MeanColourClassifier().train()
    out = evaluate(model, np.zeros((2, 3, 32, 64), np.uint8), np.array([0, 1]))
    assert out["n_tokens"] == 2 * 4 and out["image_size"] == (32, 64)
    assert out["predictions"].tolist() == [2, 2]
    assert out["confusion"].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]
    assert not model.training


def test_stratified_split_warns_about_an_empty_part_only_when_it_was_asked_for():
    with pytest.warns(UserWarning, match=r"part\(s\) \[2\].*empty"):
        parts = stratified_split(np.repeat([0, 1], 3), seed=0)
    assert len(parts[2]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = stratified_split(np.repeat([0, 1], 4), (0.5, 0.0, 0.5), seed=0)
    assert [len(p) for p in parts] == [4, 0, 4]


def test_without_validation_every_epoch_runs_and_the_last_weights_are_kept(synthetic, tmp_path):
    """fit would otherwise stop early and pick the best epoch by the training loss, which the docs do not say."""
    model = tiny_model()
    options = dict(crop=32, epochs=6, batch_size=4, patience=1, lr=0.3, progress=False, checkpoint_dir=tmp_path)
    result = train_classifier(model, synthetic, **options)
    assert len(result.history) == 6 and not result.stopped_early
    losses = [h["train_loss"] for h in result.history]
    assert min(losses) < losses[-1]  # (so that the best epoch by the training loss would be other weights)
    last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]  # the weights after the last epoch
    assert all(torch.equal(value, last[name]) for name, value in model.state_dict().items())


def test_train_classifier_refuses_an_empty_validation_set(synthetic):
    x, y = synthetic
    with pytest.raises(ValueError, match="val=None"):
        train_classifier(tiny_model(), (x, y), val=(x[:0], y[:0]), crop=32, epochs=1, progress=False)


def test_cli_refuses_an_empty_test_split_before_training(monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training must not start when the test split is empty")

    monkeypatch.setattr(train_module, "train_classifier", no_training)
    args = ["--synthetic", "--n-per-class", "2", "--image-size", "32", "--crop", "32", *CLI_TINY]
    with pytest.raises(SystemExit) as exc:
        train_module.main(args)
    assert exc.value.code == 2
    assert "test split is empty" in capsys.readouterr().err


def test_cli_warns_about_an_empty_validation_split_and_keeps_one_result_per_field():
    args = ["--synthetic", "--n-per-class", "4", "--image-size", "32", "--crop", "32", *CLI_TINY]
    with pytest.warns(UserWarning, match="validation split is empty") as caught:
        summary = train_module.main(args)
    assert warned_at(caught, "validation split is empty", __file__)  # points at the call of main, not into train.py
    assert list(summary["accuracy"]) == ["4"]  # the 32-px crop is the 32-px field


# --- float images --------------------------------------------------------------------------------------------------


def test_float_images_in_unit_range_are_used_as_they_are(synthetic):
    x, y = synthetic
    xf = x.astype(np.float32) / 255.0
    assert float(next(eval_batches(np.ones((2, 3, 32, 32), np.float32), np.array([0, 1])))[0].max()) == 1.0
    for a, b in zip(eval_batches(x, y, batch_size=3), eval_batches(xf, y, batch_size=3)):
        assert torch.allclose(a[0], b[0], atol=1e-6)
    for kind in (False, True):
        crops_u8 = [b for b, _ in CropBatches(x, y, crop=16, batch_size=3, augment=kind, seed=1)(0)]
        crops_f = [b for b, _ in CropBatches(xf, y, crop=16, batch_size=3, augment=kind, seed=1)(0)]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(crops_u8, crops_f))
    model = tiny_model()
    assert np.array_equal(evaluate(model, x, y)["predictions"], evaluate(model, xf, y)["predictions"])


def test_other_pixel_encodings_are_clear_errors(synthetic):
    x, y = synthetic
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        next(eval_batches(x.astype(np.float32), y))  # 0-255 floats
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CropBatches(x.astype(np.float64), y, crop=16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_unit_float(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(TypeError, match="uint16"):
        evaluate(model, x.astype(np.uint16), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the plots use the same rule
        saliency_map(model, x[0].astype(np.float32))


# --- plots ---------------------------------------------------------------------------------------------------------


def test_plot_saliency_shows_by_default_and_returns_none(monkeypatch):
    import matplotlib.pyplot as plt

    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    model = tiny_model()
    image = torch.rand(3, 32, 32)
    assert plot_saliency(model, image) is None
    assert calls == [1]
    ax = plot_saliency(model, image, show=False)
    assert ax is not None and calls == [1]
    _, given = plt.subplots()  # axes of the user's figure: drawn into, not shown (scanpy's rule), and returned
    assert plot_saliency(model, image, ax=given) is given and calls == [1]
    plt.close("all")


def test_plot_saliency_title_probability_comes_from_eval_mode():
    import matplotlib.pyplot as plt

    model = tiny_model(dropout=0.5).train()
    image = torch.rand(3, 64, 64)  # 16 tokens: enough for a gate at depth 0
    with torch.no_grad():
        model.eval()
        p = torch.softmax(model(image[None]), -1)[0]
        model.train()
    titles = [plot_saliency(model, image, method="gate", show=False).get_title() for _ in range(4)]
    assert titles == [f"gate, depth 0: class {int(p.argmax())} (p = {float(p.max()):.2f})"] * 4
    assert model.training  # the model's mode is put back
    model.eval()  # and a model in eval mode stays in it, whichever map is drawn
    for method, options in (("gate", {}), ("grad_input", {}), ("smoothgrad", {"n_samples": 2})):
        plot_saliency(model, image, method=method, show=False, **options)
        assert not model.training, method
    plt.close("all")


def test_the_gate_overlay_spans_the_gates_and_every_colour_bar_says_what_it_shows():
    """Audit s46, finding 2: on a fixed 0-1 scale the gates (within 0.48-0.50 here) were one flat tint, the bar
    unlabelled. The saliency maps (normalised to [0, 1]) keep 0-1."""
    import matplotlib.pyplot as plt

    from dfmamba_st.pathology import gate_map
    from dfmamba_st.pathology.plot import _as_batch, _gates

    model = tiny_model(depth=3)
    image = torch.rand(3, 64, 64)
    _, gates, _ = _gates(model, _as_batch(image, "cpu"))
    assert len(gates) >= 2  # (the range is taken over every depth's gates, as pl.gates does; review s46)
    want = tuple(np.percentile(np.concatenate(gates), [1, 99]))
    for depth in range(len(gates)):
        ax = plot_saliency(model, image, method="gate", depth=depth, show=False)
        overlay, bar = ax.images[1], ax.figure.axes[1]
        assert overlay.get_clim() == pytest.approx(want)
        assert np.array_equal(overlay.get_array(), gate_map(model, image, depth=depth))
        assert overlay.get_extent() == ax.images[0].get_extent()  # patch over its pixels, row 0 at the top
    assert np.ptp(np.concatenate(gates)) < 0.1 and bar.get_ylabel() == "gate (0 local, 1 global)"
    ax = plot_saliency(model, image, method="gate", vmin=0, vmax=1, show=False)
    assert ax.images[1].get_clim() == (0, 1)
    ax = plot_saliency(model, image, show=False)
    assert ax.images[1].get_clim() == (0, 1) and ax.figure.axes[1].get_ylabel() == "saliency (normalised)"
    assert ax.images[1].get_extent() == ax.images[0].get_extent()
    plt.close("all")


def test_plot_saliency_fits_a_wide_image_and_refuses_mismatched_options():
    """Audit s46, findings 4 and 8: a 5 x 5 inch figure whatever the image (the bar three times a wide image's
    height), a bare IndexError for too few class names, ``target=`` ignored by the gate map."""
    import matplotlib.pyplot as plt

    model = tiny_model()
    wide = torch.rand(3, 32, 96)
    fig = plot_saliency(model, wide, return_fig=True, show=False)
    image_box, bar_box = (a.get_window_extent() for a in fig.axes)
    assert fig.get_figwidth() > 2 * fig.get_figheight()
    assert bar_box.height < 1.2 * image_box.height
    plt.close("all")
    tall = plot_saliency(model, torch.rand(3, 512, 16), return_fig=True, show=False)  # the bar took all the width
    image_box, bar_box = (a.get_window_extent() for a in tall.axes)
    assert image_box.width > 0 and image_box.height > 0 and bar_box.height < 1.2 * image_box.height
    plt.close("all")
    with pytest.raises(ValueError, match="vmin must be below vmax"):
        plot_saliency(model, wide, vmin=1, vmax=0, show=False)
    with pytest.raises(ValueError, match="class_names has 2 names; the model has 4 classes"):
        plot_saliency(model, wide, class_names=["a", "b"], show=False)
    with pytest.raises(ValueError, match=r"the gate map .* has none"):
        plot_saliency(model, torch.rand(3, 64, 64), method="gate", target=0, show=False)
    assert not plt.get_fignums()  # refused before a figure was made


# --- image folders -------------------------------------------------------------------------------------------------


def _write_bach(root) -> None:
    for k, name in enumerate(BACH_CLASSES):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(root / name / f"{name[0]}0.tif")


def test_image_folder_skips_hidden_files_and_names_an_unreadable_image(tmp_path):
    _write_bach(tmp_path)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "Invasive" / "I1.PNG")  # suffixes in any case
    (tmp_path / "Normal" / "._N0.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble sidecar")
    (tmp_path / ".hidden_class").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / ".hidden_class" / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_image_folder(tmp_path, image_size=16)
    assert data.labels.tolist() == [0, 1, 2, 3, 3] and not any("._" in p for p in data.paths)

    (tmp_path / "Benign" / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"broken\.tif"):
        load_image_folder(tmp_path, image_size=16)


def test_image_folder_warns_about_a_folder_next_to_the_bach_classes(tmp_path):
    _write_bach(tmp_path)
    (tmp_path / "Unlabelled").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "Unlabelled" / "u.png")
    with pytest.warns(UserWarning, match="Unlabelled") as caught:
        data = load_image_folder(tmp_path, image_size=16)
    assert data.class_names == BACH_CLASSES
    assert warned_at(caught, "Unlabelled", __file__)  # points at the user's call, not into load_image_folder
    with pytest.warns(UserWarning, match="Unlabelled") as caught:
        list_image_folder(tmp_path)
    assert warned_at(caught, "Unlabelled", __file__)


def test_an_empty_bach_folder_is_an_error_and_an_empty_folder_elsewhere_a_warning(tmp_path):
    """An empty InSitu/ (an unzip that stopped part-way) must not turn BACH into three classes in another order."""
    _write_bach(tmp_path / "bach")
    (tmp_path / "bach" / "InSitu" / "I0.tif").unlink()
    with pytest.raises(ValueError, match=r"InSitu' is missing or holds no image"):
        load_image_folder(tmp_path / "bach", image_size=16)
    for name in ("tumour", "stroma"):
        (tmp_path / "mine" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "mine" / name / "a.png")
    (tmp_path / "mine" / "necrosis").mkdir()
    with pytest.warns(UserWarning, match=r"\['necrosis'\] .* hold no image") as caught:
        data = load_image_folder(tmp_path / "mine", image_size=16)
    assert data.class_names == ("stroma", "tumour")
    assert warned_at(caught, "hold no image", __file__)  # points at the user's call, not into load_image_folder
    with pytest.warns(UserWarning, match=r"\['necrosis'\] .* hold no image") as caught:
        list_image_folder(tmp_path / "mine")
    assert warned_at(caught, "hold no image", __file__)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64), (8, 1))
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.round(ramp * 65535).astype(np.int32)).save(tmp_path / "wide.tif")  # PIL mode I, 32-bit
    eight_bit = np.round(ramp * 255)
    for name in ("deep.png", "float.tif", "wide.tif"):
        image = load_image(tmp_path / name)
        assert image.shape == (3, 8, 64)
        np.testing.assert_allclose(image[0], eight_bit, atol=1)  # grey levels kept (PIL alone: 255s, or 0s and 1s)
    Image.fromarray((ramp * 2).astype(np.float32)).save(tmp_path / "bright.tif")
    with pytest.raises(ValueError, match=r"bright\.tif' \(PIL mode F\) has values outside 0–1"):
        load_image(tmp_path / "bright.tif")


def test_loader_and_labels_refuse_what_they_cannot_use_with_clear_errors(tmp_path, synthetic):
    _write_bach(tmp_path)
    for size in (0, -5, 40.5, (32,)):
        with pytest.raises(ValueError, match=r"image_size must be a whole number >= 1"):
            load_image_folder(tmp_path, image_size=size)
    with pytest.raises(ValueError, match=r"classes names \['Normal'\] more than once"):
        load_image_folder(tmp_path, image_size=16, classes=["Normal", "Normal"])
    x, y = synthetic
    with pytest.raises(ValueError, match=r"Training labels must be class indices \(whole numbers\), got <U"):
        train_classifier(tiny_model(), (x, np.array(["a", "b"] * (len(y) // 2))), crop=32, epochs=1, progress=False)


# --- command line --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (["--image-size", "40", "--crop", "32"], "--image-size must be a positive multiple of 16"),
        (["--image-size", "32", "--crop", "64"], "must not be larger than --image-size"),
        (["--image-size", "64", "--crop", "0"], "--crop must be a positive multiple of 16"),
        (["--d-model", "0"], "--d-model must be >= 1, got 0"),
        (["--d-state", "0"], "--d-state must be >= 1, got 0"),
        (["--depth", "-1"], "--depth must be >= 0, got -1"),
        (["--threads", "-2"], "--threads must be >= 1, got -2"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
        (["--out", "/dev/null/run1"], "--out /dev/null/run1: /dev/null is a file, so the folder cannot be made"),
        (["--patience", "-1"], "--patience must be >= 0, got -1"),
        (["--lr", "-1"], "--lr must be > 0 and --weight-decay >= 0, got -1.0 and"),
        (["--device", "tpu"], "--device tpu: Unknown device 'tpu'"),
        (["--out", "/dev/null"], "--out /dev/null: a file, not a folder"),
    ],
)
def test_cli_checks_sizes_before_making_images(monkeypatch, capsys, sizes, message):
    def no_images(*args, **kwargs):
        raise AssertionError("no image may be generated before the arguments are checked")

    monkeypatch.setattr(train_module, "make_synthetic_dataset", no_images)
    with pytest.raises(SystemExit) as exc:
        train_module.main(["--synthetic", *CLI_TINY, *sizes])  # the flags tested last: they win
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_takes_the_boundary_values_and_an_unasked_for_validation_split_without_a_warning(monkeypatch):
    """--weight-decay 0, --depth 0 and a crop as large as the images are allowed; a validation fraction
    of 0 asks for no validation split, so its absence is not warned about."""

    class Stop(Exception):
        pass

    seen = {}

    def record(model, train, **kwargs):
        seen.update(kwargs, n_train=len(train))
        raise Stop

    monkeypatch.setattr(train_module, "train_classifier", record)
    args = ["--synthetic", "--n-per-class", "4", "--image-size", "32", "--crop", "32", *CLI_TINY]
    args += ["--weight-decay", "0", "--depth", "0", "--split", "0.75", "0", "0.25"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Stop):
            train_module.main(args)
    assert seen["weight_decay"] == 0 and seen["val"] is None and seen["n_train"] == 12


def test_cli_names_the_data_folder_when_it_cannot_be_used(capsys, tmp_path):
    (tmp_path / "only" / "tumour").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "only" / "tumour" / "a.png")
    for folder, message in [(tmp_path / "absent", "does not exist"), (tmp_path / "only", "Found 1 class folder")]:
        with pytest.raises(SystemExit) as exc:
            train_module.main(["--data", str(folder), *CLI_TINY])
        assert exc.value.code == 2 and f"--data {folder}: " in (err := capsys.readouterr().err) and message in err


@pytest.mark.parametrize(
    ("n_per_class", "best_epoch", "why"),
    [
        (4, 1, "no validation split"),  # 70/15/15 of 4 images per class: none to validate on; best by training loss
        (8, -1, "no finite validation loss"),  # one image per class to validate on, but no finite loss
    ],
)
def test_cli_without_validation_says_it_kept_the_last_epoch(monkeypatch, capsys, n_per_class, best_epoch, why):
    history = [{"train_loss": loss, "val_loss": float("nan")} for loss in (3.0, 1.0, 2.0)]
    result = TrainResult(history=history, best_epoch=best_epoch)
    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: result)
    args = ["--synthetic", "--n-per-class", str(n_per_class), "--image-size", "32", "--crop", "32", *CLI_TINY]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_module.main(args)
    assert any("validation split is empty" in str(w.message) for w in caught) == (why == "no validation split")
    assert summary["epoch_kept"] == 2 and summary["best_epoch"] == best_epoch and summary["epochs_run"] == 3
    assert f"kept the last epoch, 2 (counted from 0; {why})" in capsys.readouterr().out


def test_cli_threads_sets_every_pool_through_set_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "set_threads", calls.append)
    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    for argv, expected in ((["--threads", "3"], [3]), ([], [])):  # without --threads the pools are left alone
        calls.clear()
        with pytest.raises(SystemExit), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (the tiny data's empty validation split)
            train_module.main(["--synthetic", "--n-per-class", "4", *argv, *CLI_TINY])
        assert calls == expected


@pytest.mark.filterwarnings("ignore:The validation split is empty:UserWarning")  # too few images per class
def test_cli_patience_0_trains_every_epoch(monkeypatch):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "train_classifier", record)
    with pytest.raises(SystemExit):
        train_module.main(["--synthetic", "--n-per-class", "4", "--patience", "0", *CLI_TINY])
    assert seen["patience"] is None


def test_running_the_cli_module_gives_no_runtime_warning():
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "dfmamba_st.pathology.train", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "--image-size" in proc.stdout


def test_running_the_cli_module_says_each_warning_once_without_a_source_line(tmp_path):
    """The script's __main__ block runs main() inside _cli.warnings_said_once: 'prog: warning: message' lines."""
    argv = ["--synthetic", "--n-per-class", "4", "--image-size", "32", "--crop", "32", "--threads", "3", *CLI_TINY]
    proc = subprocess.run(
        [sys.executable, "-m", "dfmamba_st.pathology.train", *argv, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},  # so --threads 3 is capped: a warning
    )
    assert proc.returncode == 0, proc.stderr
    prog = "python -m dfmamba_st.pathology.train: warning: "
    said = [line for line in proc.stderr.splitlines() if line.startswith(prog)]
    assert len(said) == 2, proc.stderr  # the cap, and the tiny data's empty validation split, each once
    assert "numba's scan kernel runs 1 of the 3 threads asked for" in said[0] and "validation split" in said[1]
    assert "UserWarning" not in proc.stderr  # not Python's own display (file:line: UserWarning: ...)


def test_training_api_is_still_reachable_from_the_package():
    assert pathology.train_classifier is train_module.train_classifier
    assert pathology.train is train_module
    assert {"train_classifier", "evaluate", "load_classifier"} <= set(dir(pathology))
    with pytest.raises(AttributeError, match="no_such_name"):
        pathology.no_such_name  # noqa: B018


# --- clear errors for invalid arguments ----------------------------------------------------------------------------


def test_labels_outside_the_model_classes_are_clear_errors(synthetic):
    x, y = synthetic  # labels 0..3
    for n_classes in (2, 3):  # with 3 classes the largest label is one past the last class index
        with pytest.raises(ValueError, match=f"n_classes={n_classes}"):
            train_classifier(tiny_model(n_classes), (x, y), crop=32, epochs=1, progress=False)
    for label in (7, 4):
        with pytest.raises(ValueError, match="n_classes=4"):
            evaluate(tiny_model(), x[:2], np.array([0, label]))


def test_bad_batch_size_layout_and_target_are_clear_errors(synthetic):
    x, y = synthetic
    with pytest.raises(ValueError, match="batch_size"):
        CropBatches(x, y, crop=16, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        next(eval_batches(x, y, batch_size=0))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"permute\(0, 3, 1, 2\)"):
        model(torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"target must be a class index in 0\.\.3"):
        saliency_map(model, x[0], target=9)
    with pytest.raises(ValueError, match=r"target must be a class index in 0\.\.3, got -1"):  # not the last class
        saliency_map(model, x[0], target=-1)
    with pytest.raises(ValueError, match="'gate'"):
        plot_saliency(model, x[0], method="bogus", show=False)


def test_evaluate_resolutions_evaluates_one_field_once(synthetic, monkeypatch):
    x, y = synthetic
    calls = []
    real = train_module.evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("crop"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", counting)
    out = evaluate_resolutions(tiny_model(), x, y, crops=(32, None))  # 32-px images: the crop is the field
    assert list(out) == [4] and calls == [32]
    assert out[4]["confusion"].sum() == len(y)


def test_cli_defaults_are_the_functions_defaults():
    import inspect

    args = train_module._parser().parse_args(["--synthetic"])
    for function, names in [
        (train_classifier, ("crop", "epochs", "batch_size", "lr", "weight_decay", "patience", "seed")),
        (DFMambaClassifier, ("d_model", "depth", "d_state")),
    ]:
        defaults = inspect.signature(function).parameters
        for name in names:
            assert getattr(args, name) == defaults[name].default, name


def test_image_folder_at_native_size_names_images_of_another_size(tmp_path):
    _write_bach(tmp_path)
    native = load_image_folder(tmp_path, image_size=None)
    assert native.images.shape[0] == 4 and len({img.shape for img in native.images}) == 1
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(tmp_path / "Invasive" / "wide.png")
    with pytest.raises(ValueError, match=r"differ in size.*24×40 in '.*wide\.png'.*image_size="):
        load_image_folder(tmp_path, image_size=None)
    assert load_image_folder(tmp_path, image_size=16).images.shape == (5, 3, 16, 16)


def test_a_checkpoint_of_other_images_is_refused(synthetic, tmp_path):
    x, y = synthetic
    options = dict(crop=32, epochs=1, batch_size=4, progress=False, checkpoint_dir=tmp_path)
    train_classifier(tiny_model(), (x[:4], y[:4]), **options)
    with pytest.raises(ValueError, match=r"another run \(differs in run_key\.train\)"):
        train_classifier(tiny_model(), (x[4:], y[4:]), **options)
    with pytest.raises(ValueError, match=r"differs in run_key\.augment"):
        train_classifier(tiny_model(), (x[:4], y[:4]), **options, augment=False)
    for name, value in (("crop", 16), ("batch_size", 2)):  # the same images cut or batched otherwise
        with pytest.raises(ValueError, match=rf"differs in .*run_key\.{name}\b"):
            train_classifier(tiny_model(), (x[:4], y[:4]), **{**options, name: value})


def test_a_checkpoint_validated_on_other_images_is_refused(synthetic, tmp_path):
    x, y = synthetic
    options = dict(crop=32, epochs=1, batch_size=4, progress=False, checkpoint_dir=tmp_path)
    train_classifier(tiny_model(), (x[:4], y[:4]), val=(x[4:6], y[4:6]), **options)
    with pytest.raises(ValueError, match=r"another run \(differs in run_key\.val\)"):
        train_classifier(tiny_model(), (x[:4], y[:4]), val=(x[6:8], y[6:8]), **options)


def test_cli_expands_the_home_folder_in_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = train_module._parser().parse_args(["--data=~/photos", "--out", "~/runs"])
    assert args.data == tmp_path / "photos" and args.out == tmp_path / "runs"
