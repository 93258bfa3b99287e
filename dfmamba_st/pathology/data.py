"""Image folders (BACH layout), stratified splits, crops and stain-robust augmentation.

A data set on disk is one sub-folder per class holding the images, as in the BACH challenge download
(``ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/*.tif``). Images are read once with PIL,
resized to a square working resolution (the paper: 512×512) and kept in memory as uint8 (n, 3, H, W).
Training batches are random crops (the paper: 256×256 = 256 tokens) with flips/rotations by 90° and
stain jitter in the haematoxylin–eosin–DAB (HED) colour space; evaluation batches are centre crops or full
fields, without augmentation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._utils import is_whole_number, user_stacklevel, whole_number

__all__ = [
    "BACH_CLASSES",
    "IMAGE_EXTENSIONS",
    "CropBatches",
    "ImageSet",
    "center_crop",
    "colour_jitter",
    "eval_batches",
    "hed_jitter",
    "list_image_folder",
    "load_image",
    "load_image_folder",
    "random_dihedral",
    "stratified_split",
    "to_unit_float",
]

BACH_CLASSES: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Optical-density vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001), rows normalised.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass
class ImageSet:
    """Images in memory with their labels.

    Attributes
    ----------
    images
        (n, 3, H, W) uint8 RGB (the loaders' output; floats in [0, 1] are accepted too, see :func:`to_unit_float`).
    labels
        (n,) int64 class indices.
    class_names
        Name of every class index.
    paths
        Source file of every image (empty for generated images).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology import ImageSet
    >>> data = ImageSet(np.zeros((4, 3, 32, 32), np.uint8), np.array([0, 1, 0, 1]), ("Normal", "Benign"))
    >>> len(data), data.subset(np.array([1, 3])).labels.tolist()
    (4, [1, 1])
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (a new :class:`ImageSet`; arrays are copied).

        ``index`` holds integer positions or is a boolean mask over the images.
        """
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self.labels),):
                raise ValueError(f"A boolean mask needs one value per image ({len(self.labels)}), got {index.shape}.")
            index = np.flatnonzero(index)
        paths = [self.paths[i] for i in index] if self.paths else []
        return ImageSet(self.images[index], self.labels[index], self.class_names, paths)


def list_image_folder(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Find the images of an ImageFolder-style directory (one sub-folder per class).

    Parameters
    ----------
    root
        The directory holding the class folders.
    classes
        Class folder names in label order. By default the BACH order (Normal, Benign, InSitu, Invasive) when
        those four folders exist (other folders are then ignored, with a warning; an empty one is an error),
        otherwise every sub-folder that holds images, sorted by name (empty ones are skipped with a warning).

    Returns
    -------
    ``(paths, labels, class_names)``, paths sorted within each class. Hidden files and folders (names starting with
    ``.``, such as the ``._name.tif`` sidecars that macOS copies leave) are skipped.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from PIL import Image
    >>> from dfmamba_st.pathology.data import list_image_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("Normal", "Benign", "InSitu", "Invasive"):
    ...     (root / name).mkdir()
    ...     Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / name / "a.png")
    >>> paths, labels, names = list_image_folder(root)
    >>> names, labels.tolist()
    (('Normal', 'Benign', 'InSitu', 'Invasive'), [0, 1, 2, 3])
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist or is not a directory.")

    def visible(folder: Path) -> list[Path]:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    if classes is None:
        folders = sorted(p.name for p in visible(root) if p.is_dir())
        subdirs = [name for name in folders if images_in(root / name)]
        # BACH's four folders fix the classes and their order even when one is empty (an error below, not a
        # silent three-class set in another order)
        classes = BACH_CLASSES if set(BACH_CLASSES) <= set(folders) else tuple(subdirs)
        empty = [name for name in folders if name not in subdirs and name not in classes]
        if empty:
            warnings.warn(
                f"Folder(s) {empty} under {str(root)!r} hold no image ({'/'.join(IMAGE_EXTENSIONS)}) and are not "
                "classes here; pass classes=[...] to name the classes.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        ignored = [name for name in subdirs if name not in classes]
        if ignored:
            warnings.warn(
                f"Using the four BACH classes under {str(root)!r} and ignoring the other image folder(s) {ignored}; "
                "pass classes=[...] to choose the classes.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    classes = tuple(classes)
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise ValueError(f"classes names {repeated} more than once; each class folder is one class.")
    if len(classes) < 2:
        raise ValueError(
            f"Found {len(classes)} class folder(s) with images under {str(root)!r}; expected one sub-folder per class "
            f"(e.g. {', '.join(BACH_CLASSES)}) holding {'/'.join(IMAGE_EXTENSIONS)} files."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        found = images_in(folder) if folder.is_dir() else []
        if not found:
            raise ValueError(
                f"Class folder {str(folder)!r} is missing or holds no image ({'/'.join(IMAGE_EXTENSIONS)})."
            )
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64), classes


def _as_rgb(img, path: str | Path):
    """``img`` as 8-bit RGB.

    16-bit integer images are scaled from 0–65535 and float images from 0–1 (PIL's own conversion clips them to
    0–255: a 16-bit image came out nearly white, a float one black).
    """
    from PIL import Image

    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        array = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else 65535.0
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= top):
            raise ValueError(
                f"The image {str(path)!r} (PIL mode {img.mode}) has values outside 0–{top:g}; save it as 8- or 16-bit."
            )
        img = Image.fromarray(np.round(array * (255 / top)).astype(np.uint8))
    return img.convert("RGB")


def _sides(size: int | tuple[int, int], what: str = "size") -> tuple[int, int]:
    """``(height, width)`` of an image size given as a side or as ``(height, width)``, each a whole number >= 1."""
    sides = (size, size) if np.isscalar(size) else tuple(size)
    if len(sides) != 2 or not all(is_whole_number(side, 1) for side in sides):
        raise ValueError(f"{what} must be a whole number >= 1 or (height, width) of them, got {size!r}.")
    return int(sides[0]), int(sides[1])


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as (3, H, W) uint8 RGB, resized (bilinear) to ``size`` (side or ``(height, width)``) if given.

    Parameters
    ----------
    path
        The image file, in any format PIL reads. Grey, palette and RGBA images are converted to RGB (the alpha
        channel is dropped); 16- and 32-bit integer images (PIL modes ``I;16`` and ``I``) are scaled from 0–65535
        and 32-bit float images (mode ``F``) from 0–1.
    size
        Side of the square to resize to, or ``(height, width)``, whole numbers >= 1. ``None``: the image's own size.

    Returns
    -------
    A C-contiguous (3, H, W) uint8 array.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file exists but cannot be read as an image (the message names the file); if a 32-bit integer or
        float image holds values outside 0–65535 or 0–1 (or non-finite ones); if ``size`` is not a side or
        ``(height, width)`` of whole numbers >= 1 (checked after reading the file).

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> from PIL import Image
    >>> from dfmamba_st.pathology.data import load_image
    >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
    >>> Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    >>> load_image(path).shape, load_image(path, 16).shape
    ((3, 20, 30), (3, 16, 16))
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = _as_rgb(img, path)  # reads the pixels
    except FileNotFoundError:
        raise
    except OSError as err:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(
            f"Cannot read the image file {str(path)!r} ({type(err).__name__}: {err}); remove it from the folder or "
            "save it again in a readable format."
        ) from err
    if size is not None:
        height, width = _sides(size)
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_image_folder(
    root: str | Path, *, image_size: int | tuple[int, int] | None = 512, classes: Sequence[str] | None = None
) -> ImageSet:
    """Load every image of an ImageFolder-style directory into memory at one working resolution.

    Parameters
    ----------
    root
        Directory with one sub-folder per class (BACH: ``.../ICIAR2018_BACH_Challenge/Photos``).
    image_size
        Side (or ``(height, width)``) every image is resized to; must be a multiple of the 16-px patch to be used
        as a full field. The paper resizes BACH's 2048×1536 photographs to 512×512. ``None`` keeps every image at
        its own size, which must then be the same for all.
    classes
        Class folder names in label order (default: see :func:`list_image_folder`).

    Returns
    -------
    An :class:`ImageSet`.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a directory.
    ValueError
        With ``image_size=None``, if the images differ in size (the message names two of them); if ``image_size`` is
        not a side or ``(height, width)`` of whole numbers >= 1 (checked before any file is read); if there are
        fewer than two classes, a class folder is missing or empty, or an image cannot be read (see
        :func:`list_image_folder` and :func:`load_image`).

    Examples
    --------
    A tiny folder with two classes of two images each, 30×40 pixels (height × width), resized to 32×32:

    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from PIL import Image
    >>> from dfmamba_st.pathology import load_image_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("tumour", "stroma"):
    ...     (root / name).mkdir()
    ...     for i in range(2):
    ...         Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(root / name / f"{i}.png")
    >>> data = load_image_folder(root, image_size=32)
    >>> data.images.shape, data.images.dtype, data.labels.tolist(), data.class_names
    ((4, 3, 32, 32), dtype('uint8'), [0, 0, 1, 1], ('stroma', 'tumour'))
    >>> [pathlib.Path(p).relative_to(root).as_posix() for p in data.paths]
    ['stroma/0.png', 'stroma/1.png', 'tumour/0.png', 'tumour/1.png']
    """
    if image_size is not None:
        _sides(image_size, "image_size")  # checked before any file is read
    paths, labels, names = list_image_folder(root, classes)
    loaded = [load_image(p, image_size) for p in paths]
    sizes = {img.shape[1:]: p for img, p in zip(loaded, paths)}
    if len(sizes) > 1:
        (first, a), (second, b) = list(sizes.items())[:2]
        raise ValueError(
            f"The images differ in size ({len(sizes)} sizes, e.g. {first[0]}×{first[1]} in {str(a)!r} and "
            f"{second[0]}×{second[1]} in {str(b)!r}); pass image_size= to resize them all to one size."
        )
    images = np.stack(loaded)
    return ImageSet(images, labels, names, [str(p) for p in paths])


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15), *, seed: int = 0
) -> list[np.ndarray]:
    """Split indices into parts with the given fractions, class by class (the paper: 70/15/15).

    Every class is shuffled with ``seed`` and cut at the rounded cumulative fractions, so each part holds about
    the same class proportions and the split is repeatable. With few images per class a part with a non-zero
    fraction can come out empty (e.g. 3 images per class at 70/15/15); this gives a warning.

    Parameters
    ----------
    labels
        (n,) class label of every item (any values :func:`numpy.unique` sorts: integers, strings).
    fractions
        Share of every part, non-negative and summing to 1 (within 1e-6); any number of parts.
    seed
        Seed of the shuffles (:func:`numpy.random.default_rng`); the global random state is not used.

    Returns
    -------
    One sorted int64 index array per fraction. The parts are disjoint and together hold every index. A class of
    ``m`` items gives part ``k`` the items from position ``round(cumsum(fractions)[k - 1] * m)`` (0 for the first
    part) up to ``round(cumsum(fractions)[k] * m)`` of its shuffled order.

    Raises
    ------
    ValueError
        If a fraction is negative or the fractions do not sum to 1.

    Warns
    -----
    UserWarning
        If a part with a non-zero fraction comes out empty (and there are labels).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology.data import stratified_split
    >>> parts = stratified_split(np.repeat(np.arange(4), 20), seed=0)
    >>> [len(p) for p in parts]
    [56, 12, 12]
    """
    labels = np.asarray(labels)
    fractions = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions < 0) or not math.isclose(float(fractions.sum()), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}.")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    cuts = np.cumsum(fractions)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(cuts * len(idx)).astype(int)
        start = 0
        for k, stop in enumerate(bounds):
            parts[k] += idx[start:stop].tolist()
            start = stop
    empty = [k for k, (part, fraction) in enumerate(zip(parts, fractions)) if fraction > 0 and not part]
    if empty and len(labels):
        counts = np.unique(labels, return_counts=True)[1]
        warnings.warn(
            f"stratified_split: part(s) {empty} of fractions {fractions.tolist()} are empty ({len(labels)} labels, "
            f"{len(counts)} classes, the smallest with {counts.min()}); use more images per class or larger fractions.",
            UserWarning,
            stacklevel=2,
        )
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def center_crop(images: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Central ``size × size`` window of (..., H, W) images (``size`` a whole number >= 1)."""
    size = whole_number(size, "crop")
    height, width = images.shape[-2:]
    if size > height or size > width:
        raise ValueError(f"Crop size {size} is larger than the images ({height}×{width}).")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def check_pixels(images: np.ndarray | torch.Tensor) -> None:
    """Raise unless ``images`` are uint8 (0–255) or floats in [0, 1] (the two encodings :func:`to_unit_float` takes)."""
    if isinstance(images, torch.Tensor):
        is_uint8, is_float, empty = images.dtype == torch.uint8, images.is_floating_point(), images.numel() == 0
    else:
        images = np.asarray(images)
        is_uint8, is_float, empty = images.dtype == np.uint8, np.issubdtype(images.dtype, np.floating), images.size == 0
    if is_uint8:
        return
    if not is_float:
        raise TypeError(
            f"Images must be uint8 (0–255) or floats in [0, 1], got dtype {images.dtype}; convert them first, "
            "e.g. (x / 65535).astype(np.float32) for 16-bit images."
        )
    if not empty:
        low, high = float(images.min()), float(images.max())
        if not (low >= 0.0 and high <= 1.0):  # also false for NaN
            raise ValueError(
                f"Float images must hold values in [0, 1], got values from {low:g} to {high:g}; pass 0–255 images as "
                "uint8 (they are divided by 255) or scale floats to [0, 1] yourself."
            )


def to_unit_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images as a float32 tensor in [0, 1], the model's input: uint8 is divided by 255, floats in [0, 1] are kept.

    Every other dtype (16-bit, integers, booleans) is a ``TypeError`` and floats outside [0, 1] (or NaN) a
    ``ValueError``, so that neither 0–255 floats nor already scaled images are silently rescaled. Used by
    :class:`CropBatches`, :func:`eval_batches` and the plots.

    Parameters
    ----------
    images
        Array or tensor of any shape, uint8 or floating point.

    Returns
    -------
    A new float32 tensor (on the input's device for a tensor).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology.data import to_unit_float
    >>> to_unit_float(np.array([0, 255], np.uint8)).tolist(), to_unit_float(np.array([0.0, 0.5])).tolist()
    ([0.0, 1.0], [0.0, 0.5])
    """
    check_pixels(images)
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a random flip or rotation to every image of a batch (batch, C, H, W), independently.

    A square batch gets one of the 8 flips/rotations by 90°; a batch of other images one of the 4 that keep their
    shape (the identity, a rotation by 180°, a left-right flip, an up-down flip).

    Parameters
    ----------
    x
        (batch, C, H, W) images, any dtype and device; at least one image.
    generator
        CPU random generator of the draws (``None``: torch's global random state). One draw per image, from
        ``0..7`` for square images (a rotation by ``(draw % 4) × 90°`` counter-clockwise, then a left-right flip when
        ``draw >= 4``) and from ``0..3`` for others (the same with the rotation by ``(draw % 2) × 180°`` and the
        flip when ``draw >= 2``).

    Returns
    -------
    A new tensor of the shape, dtype and device of ``x``.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology.data import random_dihedral
    >>> random_dihedral(torch.rand(3, 3, 8, 8), torch.Generator().manual_seed(0)).shape
    torch.Size([3, 3, 8, 8])
    >>> random_dihedral(torch.rand(3, 3, 6, 8), torch.Generator().manual_seed(0)).shape  # not square
    torch.Size([3, 3, 6, 8])
    """
    if len(x) == 0:
        return x.clone()
    square = x.shape[-1] == x.shape[-2]
    draws = torch.randint(0, 8 if square else 4, (x.shape[0],), generator=generator).tolist()
    out = []
    for img, draw in zip(x, draws):
        # non-square: rotations by 0° or 180° only (quarter turns 0 or 2), flipped for the upper half of the draws
        turns, flip = (draw % 4, draw >= 4) if square else (2 * (draw % 2), draw >= 2)
        img = torch.rot90(img, turns, dims=(-2, -1))
        out.append(img.flip(-1) if flip else img)
    return torch.stack(out)


def hed_jitter(
    x: torch.Tensor, sigma: float = 0.05, bias: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stain augmentation: scale and shift the H, E and DAB concentrations of every image at random.

    Pixels are turned into optical density ``-log10(I)``, unmixed into stain concentrations with the
    Ruifrok–Johnston vectors, each stain is multiplied by ``U(1 - sigma, 1 + sigma)`` and shifted by
    ``U(-bias, bias)`` (one draw per image and stain), and mixed back.

    Parameters
    ----------
    x
        (batch, 3, H, W) RGB floats in [0, 1].
    sigma, bias
        Strength of the multiplicative and additive perturbation.
    generator
        Random generator.

    Returns
    -------
    The augmented batch in [0, 1].

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology.data import hed_jitter
    >>> x = torch.rand(2, 3, 4, 4)
    >>> torch.allclose(hed_jitter(x, sigma=0.0, bias=0.0), x, atol=1e-3)
    True
    """
    eps = 1.0 / 255.0
    b = x.shape[0]
    m = torch.as_tensor(_RGB_FROM_HED, dtype=x.dtype, device=x.device)
    m_inv = torch.as_tensor(_HED_FROM_RGB, dtype=x.dtype, device=x.device)
    od = -torch.log10(x.clamp(min=eps))  # (b, 3, H, W)
    conc = torch.einsum("bchw,cs->bshw", od, m_inv)
    scale = 1.0 + sigma * (2.0 * torch.rand(b, 3, 1, 1, generator=generator) - 1.0)
    shift = bias * (2.0 * torch.rand(b, 3, 1, 1, generator=generator) - 1.0)
    conc = conc * scale.to(x) + shift.to(x)
    od = torch.einsum("bshw,sc->bchw", conc, m)
    out = torch.pow(10.0, -od)
    # keep pixels that were saturated at the low end where they were
    return torch.where(x <= eps, x, out).clamp(0.0, 1.0)


def colour_jitter(
    x: torch.Tensor,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness, contrast and saturation factors ``U(1 - s, 1 + s)`` per image; (batch, 3, H, W) in [0, 1].

    Parameters
    ----------
    x
        (batch, 3, H, W) RGB floats in [0, 1].
    brightness
        Strength ``s`` of the brightness change: every image is multiplied by its factor.
    contrast
        Strength of the contrast change: the distance of every value from the image's mean (over its channels and
        pixels, after the brightness change) is multiplied by the factor.
    saturation
        Strength of the saturation change: the distance of every channel from the pixel's grey level
        (``0.299 R + 0.587 G + 0.114 B``) is multiplied by the factor.
    generator
        Random generator of the factors (``None``: torch's global random state); one draw per image for each of
        the three changes, in this order.

    Returns
    -------
    The jittered batch, clipped to [0, 1] (a new tensor). Strengths of 0 give the input back (up to rounding).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology.data import colour_jitter
    >>> x = torch.rand(2, 3, 4, 4)
    >>> torch.allclose(colour_jitter(x, 0.0, 0.0, 0.0), x)
    True
    """
    b = x.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return (1.0 + strength * (2.0 * torch.rand(b, 1, 1, 1, generator=generator) - 1.0)).to(x)

    x = x * factor(brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor(contrast) + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = (x - grey) * factor(saturation) + grey
    return x.clamp(0.0, 1.0)


class CropBatches:
    """Training batches: random square crops of in-memory images, with augmentation, reshuffled every epoch.

    ``CropBatches(...)(epoch)`` yields ``(images, labels)`` with images (batch, C, crop, crop) float32 in [0, 1];
    every image is used once per epoch (the last batch may be smaller). The crops and augmentation of an epoch
    depend only on ``seed`` and ``epoch``, so training is repeatable and resumable. Pass the instance as
    ``train_data`` to :func:`dfmamba_st.core.fit` with ``steps_per_epoch=len(batches)``.

    Parameters
    ----------
    images
        (n, 3, H, W) RGB, uint8 (divided by 255) or floats in [0, 1] (used as they are); see :func:`to_unit_float`.
        Other channel counts (grey, multiplexed) need ``augment=False``.
    labels
        (n,) class indices.
    crop
        Crop side in pixels (``None``: whole images).
    batch_size
        Images per batch.
    augment
        Flips/rotations by 90° (by 180° for images that are not square; see :func:`random_dihedral`), HED stain jitter
        and colour jitter (RGB images only).
    hed_sigma, hed_bias, jitter
        Strength of the stain and colour jitter.
    seed
        Seed of the crops, order and augmentation (``None``: drawn once from torch's global random state, so it
        follows ``torch.manual_seed``); the ``seed`` attribute holds the seed used.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology.data import CropBatches
    >>> batches = CropBatches(np.zeros((5, 3, 64, 64), np.uint8), np.arange(5) % 2, crop=32, batch_size=2)
    >>> len(batches), [tuple(x.shape) for x, _ in batches(0)]
    (3, [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)])
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        crop: int | None = 256,
        batch_size: int = 16,
        augment: bool = True,
        hed_sigma: float = 0.05,
        hed_bias: float = 0.02,
        jitter: float = 0.1,
        seed: int | None = 0,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (n, channels, H, W), got {images.shape}.")
        if augment and images.shape[1] != 3:
            raise ValueError(
                f"augment=True applies stain (HED) and colour jitter, which need RGB images (n, 3, H, W); got "
                f"{images.shape[1]} channel(s). Pass augment=False to train on other images."
            )
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"Need as many labels as images (and at least one), got {len(images)} and {len(labels)}.")
        if crop is not None:
            crop = whole_number(crop, "crop")
            if crop > min(images.shape[2], images.shape[3]):
                raise ValueError(
                    f"crop={crop} must lie between 1 and the image size ({images.shape[2]}×{images.shape[3]})."
                )
        batch_size = whole_number(batch_size, "batch_size")
        check_pixels(images)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.crop = crop
        self.batch_size = batch_size
        self.augment = augment
        self.hed_sigma = hed_sigma
        self.hed_bias = hed_bias
        self.jitter = jitter
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` (a generator)."""
        rng = np.random.default_rng([self.seed, epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        order = rng.permutation(len(self.labels))
        n, _, height, width = self.images.shape
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.crop is None:
                batch = self.images[idx]
            else:
                tops = rng.integers(0, height - self.crop + 1, len(idx))
                lefts = rng.integers(0, width - self.crop + 1, len(idx))
                batch = np.stack(
                    [self.images[i, :, t : t + self.crop, s : s + self.crop] for i, t, s in zip(idx, tops, lefts)]
                )
            x = to_unit_float(batch)
            if self.augment:
                x = random_dihedral(x, gen)
                x = hed_jitter(x, self.hed_sigma, self.hed_bias, gen)
                x = colour_jitter(x, self.jitter, self.jitter, self.jitter, gen)
            yield x, torch.from_numpy(self.labels[idx])


def eval_batches(
    images: np.ndarray, labels: np.ndarray, *, batch_size: int = 16, crop: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches without augmentation: full fields, or centre crops of side ``crop``.

    ``images`` are uint8 or floats in [0, 1] (see :func:`to_unit_float`). Returns a generator of
    ``(images, labels)``, images float32 in [0, 1].

    Parameters
    ----------
    images
        (n, C, H, W) images, uint8 or floats in [0, 1].
    labels
        (n,) class indices (cast to int64).
    batch_size
        Images per batch, in the given order (the last batch may be smaller); a whole number >= 1.
    crop
        Side of the central square crop; ``None``: whole images.

    Returns
    -------
    A generator of ``(images, labels)``: (batch, C, crop, crop) or (batch, C, H, W) float32 images in [0, 1] and
    (batch,) int64 labels.

    Raises
    ------
    ValueError
        If ``images`` and ``labels`` differ in length, ``crop`` is larger than the images or ``batch_size`` is below
        1 (at the call), or float images hold values outside [0, 1] (when their batch is made).
    TypeError
        If the images are neither uint8 nor floating point, or ``batch_size`` is not a number.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology.data import eval_batches
    >>> [tuple(x.shape) for x, _ in eval_batches(np.zeros((3, 3, 64, 64), np.uint8), np.zeros(3), crop=32)]
    [(3, 3, 32, 32)]
    """
    labels = np.asarray(labels, dtype=np.int64)
    batch_size = whole_number(batch_size, "batch_size")
    if len(images) != len(labels):
        raise ValueError(f"Need as many labels as images, got {len(images)} images and {len(labels)} labels.")
    if crop is not None:
        center_crop(images[:0], crop)  # the crop checked against the images now, not at the first batch
    return _eval_batches(images, labels, batch_size, crop)


def _eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, crop: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size]
        if crop is not None:
            batch = center_crop(batch, crop)
        yield to_unit_float(batch), torch.from_numpy(labels[start : start + batch_size])
