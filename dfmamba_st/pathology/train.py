r"""Train on crops, evaluate per resolution: the pathology entry point (library functions and a command line).

Command line, on a local BACH download (``ICIAR2018_BACH_Challenge/Photos`` holds Normal/Benign/InSitu/Invasive)::

    python -m dfmamba_st.pathology.train --data /path/to/ICIAR2018_BACH_Challenge/Photos \\
        --image-size 512 --crop 256 --epochs 100 --out runs/bach

or on the synthetic arrangement task (no download)::

    python -m dfmamba_st.pathology.train --synthetic --epochs 20 --d-model 64

(a demonstration of the pipeline: it crops the synthetic fields at any offset, so the crops are neither aligned with
the blob lattice nor balanced in texture, and local statistics say something about the class; the controlled
comparison is ``benchmarks/pathology_scale.py``).

It splits the images 70/15/15 (stratified, seeded), trains on random crops with flip/rotation, stain and colour
augmentation using :func:`dfmamba_st.core.fit` (validation on centre crops of the training size, so the larger field is
never seen before the test), and prints the test accuracy at the crop size and on the full field (zero-shot).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._cli import check_shared_arguments, path_argument, warnings_said_once
from .._threads import set_threads
from .._utils import user_stacklevel
from .._weights import load_state, read_model_folder, write_model_folder
from ..core import TrainResult, fingerprint, fit, isolated_global_state, resolve_device, seed_everything
from .data import CropBatches, ImageSet, center_crop, check_pixels, eval_batches, load_image_folder, stratified_split
from .model import DFMambaClassifier, count_parameters
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset
from .tokens import check_image_size

__all__ = [
    "classification_loss",
    "evaluate",
    "evaluate_resolutions",
    "load_classifier",
    "main",
    "save_classifier",
    "train_classifier",
]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Cross-entropy plus DF-Mamba's auxiliary loss; the loss function handed to :func:`dfmamba_st.core.fit`.

    In eval mode (``fit``'s validation pass) the loss is the cross-entropy alone, so that early stopping and the
    best epoch are chosen on classification, not on the auxiliary terms.

    Returns ``(loss, {"ce": ..., "aux": ..., "acc": ...})``.

    Parameters
    ----------
    model
        A classifier with ``forward_with_aux(images) -> (logits, aux)``, ``aux`` a
        :class:`~dfmamba_st.core.FractalAux` (:class:`~dfmamba_st.pathology.DFMambaClassifier`). Its ``training``
        flag chooses the loss.
    batch
        ``(images, labels)``: (batch, C, H, W) float images in [0, 1] and (batch,) int64 class indices, both moved
        to the device of the model's first parameter.

    Returns
    -------
    ``(loss, terms)``: ``loss`` is the scalar mean cross-entropy plus ``aux.loss`` in training mode, the mean
    cross-entropy alone in eval mode; ``terms`` holds the floats ``"ce"`` (mean cross-entropy), ``"aux"``
    (``aux.loss``, reported in both modes) and ``"acc"`` (the batch's accuracy of the arg-max predictions).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology import DFMambaClassifier, classification_loss
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> batch = (torch.rand(2, 3, 32, 32), torch.tensor([0, 3]))
    >>> loss, terms = classification_loss(model, batch)  # a new model is in training mode
    >>> loss.ndim, sorted(terms)
    (0, ['acc', 'aux', 'ce'])
    >>> loss, terms = classification_loss(model.eval(), batch)
    >>> loss.item() == terms["ce"]  # eval mode: the cross-entropy alone
    True
    """
    x, y = batch
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    logits, aux = model.forward_with_aux(x)
    ce = F.cross_entropy(logits, y)
    loss = ce + aux.loss if model.training else ce
    acc = (logits.argmax(-1) == y).float().mean()
    return loss, {"ce": float(ce.detach()), "aux": float(aux.loss.detach()), "acc": float(acc)}


def _check_labels(labels: np.ndarray, model: nn.Module, what: str) -> None:
    """Raise a clear error when ``labels`` are not class indices ``0 .. model.n_classes - 1``."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise ValueError(
            f"{what} labels must be class indices (whole numbers), got {labels.dtype} values such as "
            f"{labels.flat[0]!r}; map class names to 0, 1, ... first (e.g. pd.factorize)."
        )
    n_classes = getattr(model, "n_classes", None)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (n_classes is not None and high >= n_classes):
        valid = f"0..{n_classes - 1} (the model has n_classes={n_classes})" if n_classes is not None else ">= 0"
        raise ValueError(
            f"{what} labels must be class indices in {valid}, got values from {low} to {high}; re-index the labels "
            "or build the model with as many classes as the data have."
        )


def _unpack(data: ImageSet | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (data.images, data.labels) if isinstance(data, ImageSet) else data


@isolated_global_state()
def train_classifier(
    model: DFMambaClassifier,
    train: ImageSet | tuple[np.ndarray, np.ndarray],
    *,
    val: ImageSet | tuple[np.ndarray, np.ndarray] | None = None,
    crop: int | None = 256,
    epochs: int = 50,
    batch_size: int = 16,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    augment: bool = True,
    patience: int | None = 10,
    seed: int | None = 42,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    description: str = "pathology",
) -> TrainResult:
    """Train a classifier on random crops with :func:`dfmamba_st.core.fit`.

    Parameters
    ----------
    model
        The classifier (on its device).
    train
        Training images: an :class:`~dfmamba_st.pathology.data.ImageSet` or ``(images, labels)`` with images
        (n, 3, H, W) uint8 or floats in [0, 1], labels in ``0 .. model.n_classes - 1``. Images of another channel
        count (grey, multiplexed; the model built with that ``in_chans``) train with ``augment=False``.
    val
        Validation images (at least one), evaluated on centre crops of side ``crop`` (the training size) for early
        stopping and best-epoch selection, so that the full field stays unseen until the test. ``None``: every epoch
        runs and the last weights are kept (``patience`` is not used).
    crop
        Training crop side (``None``: whole images).
    epochs, batch_size, lr, weight_decay, patience, checkpoint_dir, progress, description
        Passed to :func:`~dfmamba_st.core.fit` (``batch_size`` to the batches).
    seed
        Seed of the crops, augmentation, shuffling and of :func:`~dfmamba_st.core.fit`'s reseeding. ``None``: do not
        reseed; the crops then take their seed from torch's current global random state (see
        :class:`~dfmamba_st.pathology.data.CropBatches`), and so does training.
    augment
        Flips/rotations, HED stain jitter and colour jitter on the training crops (RGB images only).

    Returns
    -------
    The :class:`~dfmamba_st.core.TrainResult`; the model holds the weights of the epoch with the lowest validation
    loss (``result.best_epoch``) with ``val``, and the last epoch's without it.

    Notes
    -----
    The caller's Python, NumPy and torch random states and torch's determinism settings are put back afterwards
    (:func:`dfmamba_st.core.isolated_global_state`), whatever ``seed`` is; with ``seed=None`` two calls from the same
    global state therefore train on the same crops.

    Examples
    --------
    >>> from dfmamba_st.pathology import DFMambaClassifier, make_synthetic_dataset, train_classifier
    >>> x, y = make_synthetic_dataset(2, 64, seed=0)
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> result = train_classifier(model, (x, y), crop=32, epochs=1, batch_size=4, progress=False)
    >>> len(result.history)
    1
    """
    images, labels = _unpack(train)
    _check_labels(labels, model, "Training")
    batches = CropBatches(images, labels, crop=crop, batch_size=batch_size, augment=augment, seed=seed)
    val_data = None
    if val is not None:
        v_images, v_labels = _unpack(val)
        if len(v_labels) == 0:
            raise ValueError("val holds no image; pass val=None to train without validation (no early stopping).")
        _check_labels(v_labels, model, "Validation")
        try:  # the validation field and pixels checked now, not after the first epoch
            _field(model, v_images, crop)
            check_pixels(v_images)
        except ValueError as err:
            raise ValueError(f"Validation images: {err}") from err

        def val_data(epoch: int):
            return eval_batches(v_images, v_labels, batch_size=batch_size, crop=crop)

    return fit(
        model,
        classification_loss,
        batches,
        epochs=epochs,
        val_data=val_data,
        steps_per_epoch=len(batches),
        lr=lr,
        weight_decay=weight_decay,
        # without validation every epoch runs and the last weights are kept (fit would judge by the training loss)
        patience=patience if val_data is not None else None,
        restore_best=val_data is not None,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        # what names the run besides fit's own settings: its images, labels and crops
        run_key=None
        if checkpoint_dir is None
        else {
            "train": fingerprint(images, labels),
            "val": None if val is None else fingerprint(v_images, v_labels),
            "crop": crop,
            "batch_size": batch_size,
            "augment": augment,
        },
        progress=progress,
        description=description,
    )


def _field(model: nn.Module, images: np.ndarray, crop: int | None) -> tuple[tuple[int, int], int]:
    """The image size :func:`evaluate` sees at ``crop`` and its token count (checks the crop against the images)."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (n, channels, H, W), got {tuple(images.shape)}.")
    view = images[:0] if crop is None else center_crop(images[:0], crop)
    height, width = (int(side) for side in view.shape[-2:])
    if hasattr(model, "patch_size"):  # a patch model takes whole patches only: the error it would give, here
        rows, cols = check_image_size(height, width, int(model.patch_size))
        return (height, width), rows * cols
    return (height, width), (height // 16) * (width // 16)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, crop: int | None = None, batch_size: int = 16
) -> dict[str, object]:
    """Accuracy of ``model`` on full fields (``crop=None``) or centre crops of side ``crop``.

    ``images`` are (n, 3, H, W) uint8 or floats in [0, 1], ``labels`` class indices below ``model.n_classes``.
    The model is left in eval mode.

    Parameters
    ----------
    model
        A classifier returning logits (batch, n_classes) (:class:`~dfmamba_st.pathology.DFMambaClassifier`). Its
        ``n_classes`` sizes the confusion matrix and bounds the labels, its ``patch_size`` (16 without one) gives
        ``n_tokens``; the images go to the device of its first parameter.
    images
        (n, C, H, W) images, uint8 or floats in [0, 1].
    labels
        (n,) class indices: integers, or floats with whole values.
    crop
        Side of the central square crop evaluated; ``None``: the full field. The evaluated sides must be multiples
        of the model's patch size.
    batch_size
        Images per forward pass (see :func:`~dfmamba_st.pathology.eval_batches`).

    Returns
    -------
    ``{"accuracy", "n_tokens", "image_size", "predictions", "confusion"}``; ``confusion[i, j]`` counts images of
    class ``i`` predicted as ``j``. An empty set gives accuracy NaN and an all-zero confusion matrix.
    ``n_tokens`` is the token count of the evaluated field, ``image_size`` its ``(height, width)`` and
    ``predictions`` the (n,) int64 arg-max classes.

    Raises
    ------
    ValueError
        If the labels are not whole numbers or lie outside ``0 .. model.n_classes - 1``, ``images`` is not 4-D,
        ``crop`` is larger than the images, or images and labels differ in number; the model's own errors (e.g. a
        side that is not a multiple of the patch) pass through.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology import DFMambaClassifier, evaluate
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> out = evaluate(model, np.zeros((2, 3, 64, 64), np.uint8), np.array([0, 1]), crop=32)
    >>> out["n_tokens"], out["predictions"].shape
    (4, (2,))
    """
    _check_labels(np.asarray(labels), model, "Evaluation")  # before the cast, which would truncate 2.9 to 2
    labels = np.asarray(labels, dtype=np.int64)
    side, n_tokens = _field(model, images, crop)
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(x.to(device)).argmax(-1).cpu().numpy()
        for x, _ in eval_batches(images, labels, batch_size=batch_size, crop=crop)
    ]
    predictions = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    n_classes = getattr(model, "n_classes", None)
    if n_classes is None:
        n_classes = max(int(labels.max(initial=-1)), int(predictions.max(initial=-1))) + 1
    confusion = np.zeros((int(n_classes), int(n_classes)), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return {
        "accuracy": float((predictions == labels).mean()) if len(labels) else float("nan"),
        "n_tokens": n_tokens,
        "image_size": side,
        "predictions": predictions,
        "confusion": confusion,
    }


def evaluate_resolutions(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, crops: Sequence[int | None] = (256, None), **kwargs
) -> dict[int, dict[str, object]]:
    """:func:`~dfmamba_st.pathology.evaluate` at several resolutions of the same images, keyed by token count.

    Crops that give the same token count give the same field (a square crop as large as the images and ``None``, or
    a crop listed twice): it is evaluated once and stored once, under that count.

    Parameters
    ----------
    model
        The classifier (see :func:`evaluate`).
    images
        (n, C, H, W) images, uint8 or floats in [0, 1].
    labels
        (n,) class indices.
    crops
        Sides of the central square crops to evaluate, multiples of the model's patch size; ``None``: the full
        field.
    **kwargs
        Passed on to :func:`evaluate` (``batch_size``).

    Returns
    -------
    ``{n_tokens: evaluate(...)}``, in the order of ``crops`` (first occurrence of every token count).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology import DFMambaClassifier, evaluate_resolutions
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> images, labels = np.zeros((2, 3, 64, 64), np.uint8), np.array([0, 1])
    >>> list(evaluate_resolutions(model, images, labels, crops=(32, 64, None)))
    [4, 16]
    """
    fields = {crop: _field(model, images, crop)[1] for crop in crops}  # every crop checked before any work
    out: dict[int, dict[str, object]] = {}
    for crop, n_tokens in fields.items():
        if n_tokens not in out:  # a square crop with the field's token count is the whole field
            out[n_tokens] = evaluate(model, images, labels, crop=crop, **kwargs)
    return out


#: what ``config.json`` of a saved classifier says it holds
_KIND = "dfmamba_st.classifier"


def save_classifier(model: DFMambaClassifier, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` (weights) and ``config.json`` (constructor arguments, plus ``extra``).

    The constructor arguments (``model.config``) include ``pixel_mean`` and ``pixel_std``, so that
    :func:`load_classifier` rebuilds a model that gives the same outputs.

    Parameters
    ----------
    model
        The classifier.
    directory
        Folder to write (made if missing; ``~`` is expanded); existing files of the same names are replaced.
    extra
        More JSON-serialisable entries for ``config.json`` (e.g. ``{"class_names": [...]}``, as the command line
        writes); not ``config``, ``format``, ``format_version`` or ``dfmamba_st_version``, the folder's own. Nothing
        is written when they cannot be stored.

    Returns
    -------
    The folder.

    Examples
    --------
    >>> import tempfile, torch
    >>> from dfmamba_st.pathology import DFMambaClassifier, load_classifier, save_classifier
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2, pixel_mean=(0.7, 0.5, 0.6)).eval()
    >>> again = load_classifier(save_classifier(model, tempfile.mkdtemp()))
    >>> x = torch.rand(1, 3, 32, 32)
    >>> torch.equal(model(x), again(x))
    True
    """
    if extra and "config" in extra:
        raise ValueError("extra= cannot hold 'config': it is the model's own entry of config.json.")
    tensors = model.state_dict()
    return write_model_folder(directory, tensors, {"config": model.config, **(extra or {})}, kind=_KIND)


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> DFMambaClassifier:
    """Rebuild a classifier written by :func:`~dfmamba_st.pathology.save_classifier` (in eval mode, on ``device``).

    A ``config.json`` written before ``pixel_mean`` / ``pixel_std`` were saved gets the constructor's defaults
    (0.5 / 0.25), which is what such models used unless they were built with other values.

    Parameters
    ----------
    directory
        The folder :func:`save_classifier` wrote (``model.safetensors`` and ``config.json``).
    device
        Where to put the model (``"cpu"``, ``"cuda"``, ``"auto"``, a :class:`torch.device`).

    Returns
    -------
    The classifier, in eval mode. Its ``config.json``'s other entries (``extra``) are not read; load them with
    ``json`` when needed.

    Examples
    --------
    >>> import tempfile
    >>> from dfmamba_st.pathology import DFMambaClassifier, load_classifier, save_classifier
    >>> folder = save_classifier(DFMambaClassifier(4, d_model=8, depth=1, d_state=2), tempfile.mkdtemp())
    >>> load_classifier(folder).config["d_model"]
    8
    """
    config, tensors = read_model_folder(directory, kind=_KIND, what="dfm.pathology.save_classifier")
    if "forecaster" in config:  # a forecaster's folder from before folders named their kind
        kind = config["forecaster"]
        raise ValueError(f"{directory} holds a forecaster ({kind}): read it with dfm.ts.load_forecaster.")
    model = load_state(DFMambaClassifier(**config["config"]), tensors)
    return model.to(resolve_device(device)).eval()


def _defaults(function) -> dict:
    return {name: param.default for name, param in inspect.signature(function).parameters.items()}


#: the command line's training and model defaults are the functions' own, so that both train alike
_TRAIN_DEFAULTS, _MODEL_DEFAULTS = _defaults(train_classifier), _defaults(DFMambaClassifier)


def _parser() -> argparse.ArgumentParser:
    fn, net = _TRAIN_DEFAULTS, _MODEL_DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m dfmamba_st.pathology.train",
        description="Train DF-Mamba on crops of an image folder (BACH layout); test at the crop size and full field.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=path_argument, help="folder with one sub-folder per class (BACH: .../Photos)")
    src.add_argument("--synthetic", action="store_true", help="use the synthetic arrangement task instead")
    p.add_argument("--image-size", type=int, default=512, help="working resolution of the full fields (px)")
    p.add_argument("--crop", type=int, default=fn["crop"], help="training crop side (px); 256 = 256 tokens")
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of the images (stratified by class)",
    )
    p.add_argument("--n-per-class", type=int, default=100, help="synthetic images per class")
    p.add_argument("--d-model", type=int, default=net["d_model"], help="model width")
    p.add_argument("--depth", type=int, default=net["depth"], help="fractal depth K (0: a flat Mamba block)")
    p.add_argument("--d-state", type=int, default=net["d_state"], help="state size N of the scan")
    p.add_argument("--epochs", type=int, default=fn["epochs"], help="most epochs (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=fn["batch_size"], help="crops per step")
    p.add_argument("--lr", type=float, default=fn["lr"], help="AdamW learning rate (cosine, 10%% warm-up)")
    p.add_argument("--weight-decay", type=float, default=fn["weight_decay"], help="AdamW weight decay")
    p.add_argument(
        "--patience", type=int, default=fn["patience"], help="early-stopping patience (epochs; 0: never stop early)"
    )
    p.add_argument(
        "--no-augment", action="store_true", help="no flips/rotations, stain or colour jitter of the training crops"
    )
    p.add_argument("--seed", type=int, default=fn["seed"], help="split, initialisation and crops")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the numba scan kernel, torch and BLAS (dfm.set_threads)",
    )
    p.add_argument(
        "--out",
        type=path_argument,
        default=None,
        help="write model.safetensors, config.json, results.json here",
    )
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad sizes and counts with an argparse error, before any image is read or generated."""
    for flag, value in (("--image-size", args.image_size), ("--crop", args.crop)):
        if value < 16 or value % 16:
            parser.error(
                f"{flag} must be a positive multiple of 16 (the patch size), got {value}; "
                f"e.g. {max(16, value // 16 * 16)}."
            )
    if args.crop > args.image_size:
        parser.error(f"--crop ({args.crop}) must not be larger than --image-size ({args.image_size}).")
    try:
        stratified_split(np.zeros(0, dtype=np.int64), args.split)  # checks the fractions only
    except ValueError as err:
        parser.error(f"--split: {err}")
    for flag, value in (
        ("--n-per-class", args.n_per_class),
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--d-model", args.d_model),
        ("--d-state", args.d_state),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}.")
    for flag, value, minimum in (
        ("--depth", args.depth, 0),
        ("--threads", 1 if args.threads is None else args.threads, 1),
        ("--patience", args.patience, 0),
    ):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}.")
    if not args.lr > 0 or not args.weight_decay >= 0:
        parser.error(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}.")
    check_shared_arguments(parser, args.device, args.out, args.seed)


def _split(parser: argparse.ArgumentParser, data: ImageSet, args: argparse.Namespace) -> list[ImageSet]:
    """The train/val/test parts; an empty training or test part is an argparse error, an empty validation a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty parts are reported below, with the options to change
        parts = [data.subset(idx) for idx in stratified_split(data.labels, args.split, seed=args.seed)]
    counts = "/".join(str(len(part)) for part in parts)
    more = "a larger --n-per-class" if args.synthetic else "more images per class"
    for name, part in (("training", parts[0]), ("test", parts[2])):
        if not len(part):
            parser.error(
                f"the {name} split is empty (train/val/test = {counts} of {len(data)} images with --split "
                f"{' '.join(map(str, args.split))}); use {more} or a larger {name} fraction."
            )
    if not len(parts[1]) and args.split[1] > 0:
        warnings.warn(
            f"The validation split is empty (train/val/test = {counts}); training runs for --epochs {args.epochs} "
            f"without early stopping or best-epoch selection. Use {more} or a larger validation fraction.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return parts


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the results dictionary it prints."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.threads is not None:
        set_threads(args.threads)  # warns when NUMBA_NUM_THREADS caps numba's pool
    seed_everything(args.seed)
    if args.synthetic:
        images, labels = make_synthetic_dataset(args.n_per_class, args.image_size, seed=args.seed)
        data = ImageSet(images, labels, SYNTHETIC_CLASSES)
    else:
        try:
            data = load_image_folder(args.data, image_size=args.image_size)
        except (FileNotFoundError, ValueError) as err:  # no folder, one class, an unreadable image: the user's data
            parser.error(f"--data {args.data}: {err}")
    train, val, test = _split(parser, data, args)
    print(f"{len(data)} images, classes {list(data.class_names)}; train/val/test = {len(train)}/{len(val)}/{len(test)}")

    device = resolve_device(args.device)
    model = DFMambaClassifier(len(data.class_names), d_model=args.d_model, depth=args.depth, d_state=args.d_state).to(
        device
    )
    t0 = time.perf_counter()
    result = train_classifier(
        model,
        train,
        val=val if len(val) else None,
        crop=args.crop,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=not args.no_augment,
        patience=args.patience or None,  # 0: never stop early
        seed=args.seed,
    )
    seconds = time.perf_counter() - t0
    res = evaluate_resolutions(model, test.images, test.labels, crops=(args.crop, None), batch_size=args.batch_size)
    validated = len(val) > 0 and result.best_epoch >= 0  # (no finite validation loss: fit keeps the last weights)
    epoch_kept = result.best_epoch if validated else len(result.history) - 1
    summary = {
        "params": count_parameters(model),
        "train_seconds": round(seconds, 1),
        "best_epoch": result.best_epoch,
        "epoch_kept": epoch_kept,
        "epochs_run": len(result.history),
        "accuracy": {str(k): v["accuracy"] for k, v in res.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    why = "" if validated else ("; no validation split" if not len(val) else "; no finite validation loss")
    kept = f"kept the {'best epoch on validation' if validated else 'last epoch'}, {epoch_kept} (counted from 0{why})"
    print(f"params {summary['params']:,}; trained {seconds:.0f} s, {kept}")
    print(f"{'tokens':>8} {'image':>10} {'test acc':>9}")
    for n_tokens, r in res.items():
        h, w = r["image_size"]
        print(f"{n_tokens:>8} {f'{h}x{w}':>10} {r['accuracy']:>9.3f}")
    if args.out is not None:
        save_classifier(model, args.out, extra={"class_names": list(data.class_names)})
        (args.out / "results.json").write_text(json.dumps({**summary, "history": result.history}, indent=2))
    return summary


if __name__ == "__main__":
    with warnings_said_once(_parser().prog):
        main()
