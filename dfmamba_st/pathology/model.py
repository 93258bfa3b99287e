"""DF-Mamba image classifier over Hilbert-ordered patch tokens (DF-Mamba-Path)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._weights import constructor_config
from ..core import DFMamba, FractalAux, count_parameters
from .tokens import PatchEmbedding

__all__ = ["DFMambaClassifier", "count_parameters"]


class DFMambaClassifier(nn.Module):
    """Patch embedding → DF-Mamba over the Hilbert-ordered token sequence → LayerNorm → mean pool → linear head.

    The model has no positional embedding and no size-specific parameter, so the same weights take images of any
    size whose sides are multiples of ``patch_size`` (train on 256×256 crops = 256 tokens, test on 512×512 fields
    = 1024 tokens).

    Parameters
    ----------
    n_classes
        Number of classes.
    d_model
        Token width (the paper: 256).
    depth
        Fractal depth ``K`` (the paper: 4 for pathology). ``depth=0`` is a flat Mamba block (the baseline).
    d_state, expand, d_conv, min_len
        Passed to :class:`dfmamba_st.core.DFMamba`.
    hidden
        Hidden width of the coarse-graining encoder/decoder; default ``d_model // 2``, which puts the default model
        (d_model 256, depth 4) at about 0.97M parameters, near the paper's 0.89M.
    patch_size
        Patch side in pixels.
    in_chans
        Image channels (3: RGB; other counts train with ``train_classifier(..., augment=False)``, since the stain
        and colour jitter need RGB).
    pixel_mean, pixel_std
        Images are expected as floats in [0, 1] and normalised inside the model with these values (one for all
        channels, or one per channel); they are part of :attr:`config`, so a saved model keeps them.
    dropout
        Dropout before the head.
    embed_scale
        Initial gain of the patch embedding's LayerNorm, i.e. the size of the tokens that enter DF-Mamba's residual
        stream. With a gain of 1 the embedded tokens are much larger than the Mamba block's output at
        initialisation (about 20× at d_model 32); the mean over tokens of the embedding carries no information about
        the arrangement of patches, so the contextual part of the pooled features is drowned and training sits on a
        plateau at chance (probes on the synthetic task on 2026-11-23, not logged; ``docs/pathology.md``). A small
        start (0.02) puts both at a comparable size; the gain is learned. The Mamba block normalises its own input,
        so this only changes the residual stream.
    **dfmamba_kwargs
        Any other :class:`~dfmamba_st.core.DFMamba` option (``bidirectional``, ``lambdas``, ``dt_scaling``,
        ``coarsen``, ``fusion``, ``aux``, ``share_weights``, ``backend``...).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology import DFMambaClassifier
    >>> model = DFMambaClassifier(n_classes=4, d_model=16, depth=2, d_state=4)
    >>> model(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 4])
    >>> model(torch.rand(1, 3, 128, 128)).shape
    torch.Size([1, 4])
    """

    def __init__(
        self,
        n_classes: int,
        d_model: int = 256,
        depth: int = 4,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        min_len: int = 8,
        hidden: int | None = None,
        patch_size: int = 16,
        in_chans: int = 3,
        pixel_mean: float | tuple[float, ...] = 0.5,
        pixel_std: float | tuple[float, ...] = 0.25,
        dropout: float = 0.0,
        embed_scale: float = 0.02,
        **dfmamba_kwargs: Any,
    ) -> None:
        super().__init__()
        #: constructor arguments (JSON-serialisable), enough to rebuild the model (see ``pathology.save_classifier``)
        self.config = constructor_config(locals())
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}.")
        self.n_classes = n_classes
        self.patch_size = patch_size
        mean = torch.as_tensor(pixel_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=torch.float32).reshape(-1, 1, 1)
        for name, value in (("pixel_mean", mean), ("pixel_std", std)):
            if len(value) not in (1, in_chans):  # else forward fails on its first batch, far from here
                raise ValueError(
                    f"{name} must be one value or one per channel (in_chans={in_chans}), got {len(value)} values."
                )
        self.embed = PatchEmbedding(d_model, patch_size=patch_size, in_chans=in_chans, init_scale=embed_scale)
        self.backbone = DFMamba(
            d_model,
            depth=depth,
            d_state=d_state,
            expand=expand,
            d_conv=d_conv,
            min_len=min_len,
            hidden=hidden or max(1, d_model // 2),
            **dfmamba_kwargs,
        )
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, n_classes)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def n_parameters(self) -> int:
        """Trainable parameters (a flat ``depth=0`` model builds no coarse-graining or gate, so none are counted).

        Examples
        --------
        >>> from dfmamba_st.pathology import DFMambaClassifier
        >>> flat = DFMambaClassifier(4, d_model=16, depth=0, d_state=4)
        >>> flat.n_parameters() < DFMambaClassifier(4, d_model=16, depth=2, d_state=4).n_parameters()
        True
        """
        return count_parameters(self)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, FractalAux]:
        """Per-token features (batch, L, d_model) in Hilbert order, and DF-Mamba's auxiliary record."""
        self.embed.check_input(images)  # before the normalisation, whose broadcasting hides a wrong layout
        if not images.is_floating_point():  # uint8 0-255 would be normalised as if in [0, 1]
            raise TypeError(
                f"Expected images as floats in [0, 1], got {images.dtype}: convert them first with "
                "dfmamba_st.pathology.to_unit_float(images) (uint8 is divided by 255)."
            )
        images = images.to(self.pixel_mean.dtype)  # float64 (or half) input in the model's precision
        x = self.embed((images - self.pixel_mean) / self.pixel_std)
        h, aux = self.backbone(x)
        return self.norm(h), aux

    def forward_with_aux(self, images: torch.Tensor) -> tuple[torch.Tensor, FractalAux]:
        """Logits (batch, n_classes) and the :class:`~dfmamba_st.core.FractalAux` (auxiliary loss, gate maps)."""
        h, aux = self.features(images)
        return self.head(self.dropout(h.mean(dim=1))), aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n_classes) for images (batch, in_chans, H, W) in [0, 1], sides multiples of patch_size."""
        return self.forward_with_aux(images)[0]
