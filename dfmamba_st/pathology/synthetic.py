"""A synthetic "tissue" task whose class is set by large-scale organisation, not by local texture.

Every image is a field of textured blobs on a pink background, in H&E-like colours. The plane is tiled by an
(invisible) lattice of ``cell × cell`` pixel cells (default 16 px, one 16×16 patch token per cell); each cell holds
at most one blob (a jittered disk) filled with one of two textures, "nuclei" (pale purple with dark dots) or
"stroma" (pink, finely striped at a random angle). The class is the spatial organisation of the two textures over
the lattice:

=====  ============  ===========================================================================================
label  name          texture of the cells
=====  ============  ===========================================================================================
0      alternating   ``(i + j) mod 2``: every 4-neighbour differs (anti-correlated)
1      mixed         a random balanced assignment: no spatial correlation
2      clustered     a Gaussian random field smoothed over 1 cell, cut at its median: small domains (~2–3 cells)
3      segregated    the same with 3 cells of smoothing: large domains (~6–10 cells, 100–160 px)
=====  ============  ===========================================================================================

In every class exactly half of the lattice cells hold each texture (on an odd lattice the odd cell goes to either
texture at random), and blob size, jitter, colour, empty cells and textures come from the same distributions, so
neither a single cell, a 16×16 patch, nor the texture composition of the image says anything about the class: a model
that pools local texture is at chance (25 %).
The lattice offset is a multiple of the patch size (``align``), so a patch token never shows parts of two blobs:
with a free offset, a patch on a cell corner shows slivers of up to four blobs, and how often two textures meet
inside one patch reveals the arrangement to a purely local model (a one-off diagnosis of 2026-11-23, not logged: 55 %
with 32-px cells and 79 % with 16-px cells for a logistic regression on per-patch colour statistics, against 21–23 %
with aligned cells; the tests assert ≤ 45 % aligned and ≥ 50 % with a free offset). What
differs between classes is how homogeneous the texture is over growing neighbourhoods — a correlation length, a
statistic of the relations between many patches (from neighbouring patches for classes 0–2 up to domains of
100–160 px for class 3).

The class is defined at a pixel scale (``cell``) and is stationary, so it means the same thing for a 256×256
image and a 512×512 field: the larger field shows more of the same organisation at the same pixel scale (a larger
field of view, not an upsampled image). This is the paper's protocol "train on small crops, test on larger fields"
with a label defined consistently at both sizes. Because every image is balanced over its own lattice, training
images are generated directly at the crop size rather than cropped from larger fields (a crop of a balanced field
is no longer balanced, and its texture composition would leak the domain size to a local model).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["SYNTHETIC_CLASSES", "make_synthetic_dataset", "make_synthetic_image"]

SYNTHETIC_CLASSES: tuple[str, ...] = ("alternating", "mixed", "clustered", "segregated")

# smoothing (in lattice cells) of the random field that makes the domains of classes 2 and 3
_DOMAIN_SIGMA = {2: 1.0, 3: 3.0}

# H&E-like colours (RGB in [0, 1])
_BACKGROUND = np.array([0.94, 0.86, 0.90])
_STROMA = np.array([0.88, 0.55, 0.72])
_STROMA_DARK = np.array([0.74, 0.36, 0.58])
_NUCLEUS = np.array([0.30, 0.20, 0.50])
_CYTO = np.array([0.62, 0.50, 0.80])


def _cell_types(label: int, n_i: int, n_j: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 texture of every lattice cell ``(i, j)`` for one class, half of the cells (±1) of each texture."""
    n = n_i * n_j
    if label == 0:  # alternating: every 4-neighbour differs
        i, j = np.meshgrid(np.arange(n_i), np.arange(n_j), indexing="ij")
        return (i + j + int(rng.integers(2))) % 2
    if label == 1:  # mixed: a random balanced assignment, no spatial correlation
        types = np.zeros(n, dtype=np.int64)
        types[rng.permutation(n)[: (n + int(rng.integers(2))) // 2]] = 1
        return types.reshape(n_i, n_j)
    if label in (2, 3):  # clustered / segregated: a smooth random field cut at its median
        field = gaussian_filter(rng.standard_normal((n_i, n_j)), sigma=_DOMAIN_SIGMA[label], mode="wrap")
        rank = np.argsort(np.argsort(field.ravel() + 1e-9 * rng.standard_normal(n)))
        # an odd lattice's odd cell out goes to either texture, as in classes 0 and 1 (it always went to "nuclei": a
        # composition that told classes 2-3 apart); an even one draws nothing, so its images are as before
        cut = n // 2 if n % 2 == 0 else n // 2 + int(rng.integers(2))
        return (rank >= cut).astype(np.int64).reshape(n_i, n_j)
    raise ValueError(f"label must be in 0..{len(SYNTHETIC_CLASSES) - 1}, got {label}.")


def make_synthetic_image(
    label: int,
    size: int | tuple[int, int] = 256,
    *,
    rng: np.random.Generator | int | None = None,
    cell: int = 16,
    align: int | None = 16,
    radius: tuple[float, float] = (0.38, 0.45),
    jitter: float = 0.04,
    p_empty: float = 0.1,
    noise: float = 0.04,
) -> np.ndarray:
    """Draw one image of the synthetic arrangement task.

    Parameters
    ----------
    label
        Class ``0..3`` (see :data:`~dfmamba_st.pathology.SYNTHETIC_CLASSES` and the module docstring).
    size
        Image side, or ``(height, width)``, in pixels.
    rng
        A NumPy generator or a seed.
    cell
        Lattice spacing in pixels (the scale of the arrangement).
    align
        The lattice offset is a random multiple of ``align`` pixels (``None``: any offset). With the patch size
        here (16) and ``cell`` a multiple of it, no lattice cell straddles a patch border, so a patch never shows
        parts of two blobs, and the co-occurrence of textures inside one patch cannot reveal the arrangement.
    radius
        Range of blob radii as fractions of ``cell``.
    jitter
        Maximum offset of a blob centre from its cell centre, as a fraction of ``cell``.
    p_empty
        Probability that a cell holds no blob (every class).
    noise
        Standard deviation of the per-pixel colour noise.

    Returns
    -------
    (3, height, width) uint8 RGB image (channels first, as torch expects).

    Examples
    --------
    >>> from dfmamba_st.pathology.synthetic import make_synthetic_image
    >>> img = make_synthetic_image(3, 128, rng=0)
    >>> img.shape, img.dtype.name
    ((3, 128, 128), 'uint8')
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    height, width = (size, size) if np.isscalar(size) else size
    if radius[1] + jitter >= 0.5:
        raise ValueError("radius[1] + jitter must stay below 0.5 so that blobs stay inside their cells.")
    # lattice with a random phase: pixel (y, x) lies in cell (floor((y + oy) / cell), floor((x + ox) / cell))
    if align is None:
        oy, ox = rng.uniform(0, cell, size=2)
    else:
        oy, ox = align * rng.integers(0, max(1, cell // align), size=2)
    n_i = int(np.floor((height - 1 + oy) / cell)) + 1
    n_j = int(np.floor((width - 1 + ox) / cell)) + 1
    types = _cell_types(int(label), n_i, n_j, rng)
    empty = rng.random((n_i, n_j)) < p_empty
    cy = (np.arange(n_i)[:, None] + 0.5 + rng.uniform(-jitter, jitter, (n_i, n_j))) * cell - oy
    cx = (np.arange(n_j)[None, :] + 0.5 + rng.uniform(-jitter, jitter, (n_i, n_j))) * cell - ox
    rad = rng.uniform(*radius, size=(n_i, n_j)) * cell
    angle = rng.uniform(0, np.pi, size=(n_i, n_j))

    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    ci = np.floor((yy + oy) / cell).astype(np.int64)
    cj = np.floor((xx + ox) / cell).astype(np.int64)
    dist = np.hypot(yy - cy[ci, cj], xx - cx[ci, cj])
    inside = (dist < rad[ci, cj]) & ~empty[ci, cj]
    is_nuclei = inside & (types[ci, cj] == 1)
    is_stroma = inside & (types[ci, cj] == 0)

    # background: pale pink with low-frequency variation (a few random cosines)
    img = np.broadcast_to(_BACKGROUND, (height, width, 3)).copy()
    shade = np.zeros((height, width))
    for _ in range(3):
        f = rng.uniform(0.005, 0.02, size=2)
        shade += np.cos(2 * np.pi * (f[0] * yy + f[1] * xx) + rng.uniform(0, 2 * np.pi))
    img *= 1.0 - 0.02 * shade[..., None]

    # stroma texture: fine stripes at the blob's angle
    a = angle[ci, cj]
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * (yy * np.sin(a) + xx * np.cos(a)) / 6.0)
    stroma = _STROMA + (_STROMA_DARK - _STROMA) * stripes[..., None]
    img[is_stroma] = stroma[is_stroma]

    # nuclei texture: pale cytoplasm scattered with small dark dots
    img[is_nuclei] = _CYTO
    n_dots = int(height * width / 40)
    dy = rng.integers(0, height, n_dots)
    dx = rng.integers(0, width, n_dots)
    keep = is_nuclei[dy, dx]
    dy, dx = dy[keep], dx[keep]
    for sy, sx in ((0, 0), (0, 1), (1, 0), (1, 1), (-1, 0), (0, -1)):
        py, px = np.clip(dy + sy, 0, height - 1), np.clip(dx + sx, 0, width - 1)
        ok = is_nuclei[py, px]
        img[py[ok], px[ok]] = _NUCLEUS

    # per-image stain variation and pixel noise
    img *= rng.uniform(0.92, 1.05, size=3)
    img += rng.normal(0.0, noise, size=img.shape)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def make_synthetic_dataset(
    n_per_class: int,
    size: int | tuple[int, int] = 256,
    *,
    seed: int = 0,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """A balanced, shuffled, seeded set of synthetic images.

    Parameters
    ----------
    n_per_class
        Images per class (exactly; the set is balanced).
    size
        Image side or ``(height, width)`` in pixels.
    seed
        Seed: the same seed and arguments give the same images.
    **kwargs
        Passed to :func:`make_synthetic_image`.

    Returns
    -------
    ``(images, labels)``: (n, 3, H, W) uint8 and (n,) int64, ``n = 4 · n_per_class``.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology.synthetic import make_synthetic_dataset
    >>> x, y = make_synthetic_dataset(2, 64, seed=1)
    >>> x.shape, np.bincount(y).tolist()
    ((8, 3, 64, 64), [2, 2, 2, 2])
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}.")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(SYNTHETIC_CLASSES)), n_per_class))
    images = np.stack([make_synthetic_image(int(lab), size, rng=rng, **kwargs) for lab in labels])
    return images, labels.astype(np.int64)
