"""Computational pathology: DF-Mamba image classification over Hilbert-ordered 16×16 patch tokens.

Images become sequences of patch tokens along a 2-D Hilbert curve (:mod:`.tokens`); :class:`DFMambaClassifier`
runs DF-Mamba over them, mean-pools and classifies. It is trained on small crops and applied with the same weights
to larger fields (256 → 1024 tokens). :mod:`.data` reads BACH-style image folders with stain-robust augmentation,
:mod:`.train` is the train/evaluate entry point, :mod:`.plot` draws saliency and gate maps, and :mod:`.synthetic`
generates a task whose class depends on large-scale arrangement only.

Examples
--------
>>> import torch
>>> from dfmamba_st.pathology import DFMambaClassifier
>>> model = DFMambaClassifier(n_classes=4, d_model=16, depth=2, d_state=4)
>>> model(torch.rand(1, 3, 64, 64)).shape
torch.Size([1, 4])
"""

import importlib
from typing import Any

from .data import (
    BACH_CLASSES,
    CropBatches,
    ImageSet,
    colour_jitter,
    eval_batches,
    hed_jitter,
    list_image_folder,
    load_image,
    load_image_folder,
    random_dihedral,
    stratified_split,
    to_unit_float,
)
from .model import DFMambaClassifier, count_parameters
from .plot import gate_map, plot_saliency, saliency_map
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, make_synthetic_image
from .tokens import PatchEmbedding, check_image_size, patch_order, patchify, token_cells, tokens_to_grid, unpatchify

# The training API lives in .train, which is also the command line (`python -m dfmamba_st.pathology.train`). It is
# imported on first use rather than here: importing it with the package makes runpy find it already in sys.modules
# and warn (RuntimeWarning) before running a second copy as __main__.
_TRAIN_API = (
    "classification_loss",
    "evaluate",
    "evaluate_resolutions",
    "load_classifier",
    "save_classifier",
    "train_classifier",
)


def __getattr__(name: str) -> Any:
    if name == "train" or name in _TRAIN_API:
        module = importlib.import_module(f"{__name__}.train")
        return module if name == "train" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_TRAIN_API, "train"})


__all__ = [
    "BACH_CLASSES",
    "SYNTHETIC_CLASSES",
    "CropBatches",
    "DFMambaClassifier",
    "ImageSet",
    "PatchEmbedding",
    "check_image_size",
    "classification_loss",
    "colour_jitter",
    "count_parameters",
    "eval_batches",
    "evaluate",
    "evaluate_resolutions",
    "gate_map",
    "hed_jitter",
    "list_image_folder",
    "load_classifier",
    "load_image",
    "load_image_folder",
    "make_synthetic_dataset",
    "make_synthetic_image",
    "patch_order",
    "patchify",
    "plot_saliency",
    "random_dihedral",
    "saliency_map",
    "save_classifier",
    "stratified_split",
    "to_unit_float",
    "token_cells",
    "tokens_to_grid",
    "train_classifier",
    "unpatchify",
]
