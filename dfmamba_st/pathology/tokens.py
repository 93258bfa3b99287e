"""Images as sequences: 16×16 patch tokens ordered along a 2-D Hilbert curve.

An image of height ``H`` and width ``W`` (both multiples of the patch size ``p``) is cut into an
``(H/p) × (W/p)`` grid of patches. The patches are read in the order of the Hilbert curve over that grid
(:func:`dfmamba_st.core.curves.grid_curve`), so that tokens next to each other in the sequence are next to each
other in the image; on a power-of-two square grid every step of the sequence moves to a 4-neighbour patch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ..core import curves

__all__ = [
    "PatchEmbedding",
    "check_image_size",
    "patch_order",
    "patchify",
    "token_cells",
    "tokens_to_grid",
    "unpatchify",
]


def check_image_size(height: int, width: int, patch_size: int = 16) -> tuple[int, int]:
    """Check that an image can be cut into whole patches and return its patch grid ``(rows, cols)``.

    Parameters
    ----------
    height, width
        Image size in pixels.
    patch_size
        Side of a square patch in pixels.

    Returns
    -------
    ``(height // patch_size, width // patch_size)``.

    Raises
    ------
    ValueError
        If a side is not a positive multiple of ``patch_size``; the message says how to fix it.

    Examples
    --------
    >>> from dfmamba_st.pathology.tokens import check_image_size
    >>> check_image_size(256, 512)
    (16, 32)
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}.")
    sides = (("height", height), ("width", width))
    bad = [f"{name}={value}" for name, value in sides if value % patch_size or value < 1]
    if bad:
        hint_h = max(patch_size, height // patch_size * patch_size)
        hint_w = max(patch_size, width // patch_size * patch_size)
        raise ValueError(
            f"Image sides must be positive multiples of the patch size {patch_size}, got {', '.join(bad)}. "
            f"Crop or resize the image first, e.g. to {hint_h}×{hint_w}."
        )
    return height // patch_size, width // patch_size


@lru_cache(maxsize=64)
def _order_cached(rows: int, cols: int, curve: str) -> tuple[np.ndarray, np.ndarray]:
    cells = curves.grid_curve(rows, cols, curve)  # (L, 2) (row, col) in curve order
    order = cells[:, 0] * cols + cells[:, 1]
    order.setflags(write=False)
    cells.setflags(write=False)
    return order, cells


def patch_order(rows: int, cols: int, curve: curves.Curve = "hilbert") -> np.ndarray:
    """Row-major indices of the patches of a ``rows × cols`` grid, in curve order.

    ``patch_order(r, c)[i]`` is the row-major index (``row * cols + col``) of the ``i``-th token.

    Parameters
    ----------
    rows, cols
        Size of the patch grid (converted with ``int``), each >= 1.
    curve
        Token order, one of :data:`dfmamba_st.core.curves.CURVES` (see :func:`dfmamba_st.core.curves.grid_curve`).

    Returns
    -------
    A (rows·cols,) int64 permutation of ``0 .. rows·cols - 1`` (a fresh, writable copy of a cached result).

    Raises
    ------
    ValueError
        If ``rows`` or ``cols`` is below 1, or ``curve`` is unknown.

    Examples
    --------
    >>> from dfmamba_st.pathology.tokens import patch_order
    >>> patch_order(2, 2).tolist()
    [0, 1, 3, 2]
    """
    return _order_cached(int(rows), int(cols), curve)[0].copy()


def token_cells(rows: int, cols: int, curve: curves.Curve = "hilbert") -> np.ndarray:
    """(rows·cols, 2) ``(row, col)`` patch position of every token, in sequence order.

    Parameters
    ----------
    rows, cols
        Size of the patch grid (converted with ``int``), each >= 1.
    curve
        Token order, one of :data:`dfmamba_st.core.curves.CURVES`.

    Returns
    -------
    A (rows·cols, 2) int64 array (a fresh, writable copy of a cached result); row ``i`` is the patch of token
    ``i``, so ``cells[:, 0] * cols + cells[:, 1]`` is :func:`patch_order`.

    Raises
    ------
    ValueError
        If ``rows`` or ``cols`` is below 1, or ``curve`` is unknown.

    Examples
    --------
    >>> from dfmamba_st.pathology.tokens import token_cells
    >>> token_cells(2, 2).tolist()
    [[0, 0], [0, 1], [1, 1], [1, 0]]
    """
    return _order_cached(int(rows), int(cols), curve)[1].copy()


def patchify(images: torch.Tensor, patch_size: int = 16, curve: curves.Curve = "hilbert") -> torch.Tensor:
    """Cut images into patch tokens in curve order.

    Parameters
    ----------
    images
        (batch, channels, H, W) with H and W multiples of ``patch_size``.
    patch_size
        Patch side in pixels.
    curve
        Token order, see :func:`dfmamba_st.core.curves.grid_curve`.

    Returns
    -------
    (batch, L, channels · patch_size²) tokens, ``L = (H / p) · (W / p)``; each token is the patch's pixels
    flattened channel-first.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology.tokens import patchify, unpatchify
    >>> x = torch.rand(2, 3, 64, 32)
    >>> t = patchify(x)
    >>> t.shape
    torch.Size([2, 8, 768])
    >>> torch.equal(unpatchify(t, 64, 32), x)
    True
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (batch, channels, H, W), got {tuple(images.shape)}.")
    b, c, h, w = images.shape
    rows, cols = check_image_size(h, w, patch_size)
    p = patch_size
    x = images.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)
    order = torch.tensor(patch_order(rows, cols, curve), device=images.device)
    return x.index_select(1, order)


def unpatchify(
    tokens: torch.Tensor, height: int, width: int, patch_size: int = 16, curve: curves.Curve = "hilbert"
) -> torch.Tensor:
    """Inverse of :func:`~dfmamba_st.pathology.patchify`: (batch, L, C · p²) tokens in curve order → (batch, C, H, W).

    Parameters
    ----------
    tokens
        (batch, L, channels · patch_size²) tokens in curve order, each a patch's pixels flattened channel-first,
        ``L = (height / patch_size) · (width / patch_size)``.
    height, width
        Image size in pixels, multiples of ``patch_size``.
    patch_size
        Patch side in pixels.
    curve
        Token order used by :func:`patchify`.

    Returns
    -------
    (batch, channels, height, width) images, with the dtype and device of ``tokens``; the number of channels is
    the token width divided by ``patch_size²``.

    Raises
    ------
    ValueError
        If a side is not a positive multiple of ``patch_size``, or the tokens do not fit the image (wrong ``L``, or
        a width that is not a multiple of ``patch_size²``), or are not 3-D.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology import patchify, unpatchify
    >>> images = torch.arange(2 * 1 * 4 * 8, dtype=torch.float32).reshape(2, 1, 4, 8)
    >>> tokens = patchify(images, patch_size=2)
    >>> tokens.shape
    torch.Size([2, 8, 4])
    >>> torch.equal(unpatchify(tokens, 4, 8, patch_size=2), images)
    True
    """
    rows, cols = check_image_size(height, width, patch_size)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (batch, L, channels · patch_size²), got {tuple(tokens.shape)}.")
    b, length, dim = tokens.shape
    p = patch_size
    if length != rows * cols or dim % (p * p):
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not fit a {height}×{width} image with {p}×{p} patches."
        )
    c = dim // (p * p)
    inverse = torch.as_tensor(curves.inverse_permutation(patch_order(rows, cols, curve)), device=tokens.device)
    x = tokens.index_select(1, inverse)
    return x.reshape(b, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def tokens_to_grid(values: torch.Tensor | np.ndarray, rows: int, cols: int, curve: curves.Curve = "hilbert"):
    """Put per-token values (..., L) in curve order back onto the ``rows × cols`` patch grid (..., rows, cols).

    Used to draw per-token maps (saliency, gates) as images.

    Parameters
    ----------
    values
        (..., L) values in curve order, a tensor or an array (anything :func:`numpy.asarray` takes), with
        ``L = rows · cols`` (another length is a ``ValueError``).
    rows, cols
        Size of the patch grid.
    curve
        Token order the values are in.

    Returns
    -------
    (..., rows, cols) values: a tensor on the device of ``values`` for a tensor, a NumPy array otherwise.
    ``grid[..., r, c]`` is the value of the token of patch ``(r, c)``.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.pathology import patch_order, tokens_to_grid
    >>> tokens_to_grid(np.array([10, 11, 12, 13]), 2, 2).tolist()  # tokens visit (0, 0), (0, 1), (1, 1), (1, 0)
    [[10, 11], [13, 12]]
    >>> grid = tokens_to_grid(np.arange(8), 2, 4)
    >>> bool((grid.ravel()[patch_order(2, 4)] == np.arange(8)).all())
    True
    """
    if not isinstance(values, torch.Tensor):
        values = np.asarray(values)
    if values.ndim == 0 or values.shape[-1] != rows * cols:
        raise ValueError(
            f"values must end in one value per token ({rows}×{cols} = {rows * cols}), got shape {tuple(values.shape)}."
        )
    inverse = curves.inverse_permutation(patch_order(rows, cols, curve))
    if isinstance(values, torch.Tensor):
        out = values.index_select(-1, torch.as_tensor(inverse, device=values.device))
    else:
        out = np.take(values, inverse, axis=-1)
    return out.reshape(*out.shape[:-1], rows, cols)


class PatchEmbedding(nn.Module):
    """Linear embedding of non-overlapping ``patch_size`` patches, returned as a curve-ordered token sequence.

    Equivalent to ``nn.Linear(in_chans · p², d_model)`` applied to :func:`patchify` tokens (implemented as a strided
    convolution), followed by a LayerNorm. There is no positional embedding: the curve order is the position.

    Parameters
    ----------
    d_model
        Token width.
    patch_size
        Patch side in pixels.
    in_chans
        Image channels.
    curve
        Token order.
    init_scale
        Initial gain of the LayerNorm (its learnable ``weight``): the size of the embedded tokens at the start of
        training. :class:`~dfmamba_st.pathology.DFMambaClassifier` starts it small (see its ``embed_scale``).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology.tokens import PatchEmbedding
    >>> PatchEmbedding(32)(torch.rand(1, 3, 256, 256)).shape
    torch.Size([1, 256, 32])
    """

    def __init__(
        self,
        d_model: int,
        patch_size: int = 16,
        in_chans: int = 3,
        curve: curves.Curve = "hilbert",
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.curve = curve
        self.proj = nn.Conv2d(in_chans, d_model, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(d_model)
        nn.init.constant_(self.norm.weight, init_scale)

    def check_input(self, images: torch.Tensor) -> tuple[int, int]:
        """Check that ``images`` are (batch, in_chans, H, W) with sides multiples of the patch; return the patch grid.

        Raises
        ------
        ValueError
            For another layout (channels last, no batch axis) or size; the message says how to fix it.
        """
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            hint = (
                " They look channels-last: use images.permute(0, 3, 1, 2)."
                if images.ndim == 4 and images.shape[-1] == self.in_chans
                else ""
            )
            raise ValueError(
                f"Expected images of shape (batch, {self.in_chans}, H, W), got {tuple(images.shape)}.{hint}"
            )
        return check_image_size(images.shape[2], images.shape[3], self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, in_chans, H, W) → (batch, L, d_model) in curve order."""
        rows, cols = self.check_input(images)
        x = self.proj(images).flatten(2).transpose(1, 2)  # (b, rows*cols, d), row-major
        order = torch.tensor(patch_order(rows, cols, self.curve), device=images.device)
        return self.norm(x.index_select(1, order))
