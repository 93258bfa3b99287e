"""Where the classifier looks: gradient saliency (gradient × input, SmoothGrad) and DF-Mamba gate maps on the image."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._utils import check_colour_range, gate_range
from .data import to_unit_float
from .tokens import check_image_size, tokens_to_grid

__all__ = ["gate_map", "plot_saliency", "saliency_map"]

Method = Literal["grad_input", "smoothgrad", "gate"]
_GRADIENT_METHODS = ("grad_input", "smoothgrad")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (no dropout), then put its train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_batch(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(3, H, W) uint8 / float in [0, 1] (array or tensor) → (1, 3, H, W) float32 on ``device``."""
    x = image if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(x.shape)}.")
    return to_unit_float(x).unsqueeze(0).to(device)


def _check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {', '.join(map(repr, allowed))}, got {method!r}.")


def _display(image: np.ndarray | torch.Tensor) -> np.ndarray:
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    x = x.transpose(1, 2, 0)
    return x if x.dtype == np.uint8 else np.clip(x, 0.0, 1.0)


def _normalise(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def saliency_map(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    target: int | None = None,
    method: Literal["grad_input", "smoothgrad"] = "grad_input",
    n_samples: int = 16,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Pixel saliency of one image for one class, normalised to [0, 1].

    Parameters
    ----------
    model
        A classifier taking (batch, 3, H, W) images in [0, 1] (e.g. :class:`~dfmamba_st.pathology.DFMambaClassifier`).
    image
        (3, H, W) uint8 or float in [0, 1].
    target
        Class whose logit is explained, ``0 .. n_classes - 1`` (default: the predicted class).
    method
        ``"grad_input"``: ``Σ_c |∂logit/∂x_c · (x_c - mean_c)|`` on the normalised input;
        ``"smoothgrad"``: ``Σ_c |∂logit/∂x_c|`` averaged over ``n_samples`` copies with Gaussian noise of standard
        deviation ``noise`` (the paper's choice).
    n_samples, noise, seed
        SmoothGrad settings.

    Returns
    -------
    ``(saliency, target)``: (H, W) float map in [0, 1] and the explained class.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology import DFMambaClassifier, saliency_map
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> sal, cls = saliency_map(model, torch.rand(3, 32, 32))
    >>> sal.shape, bool(0.0 <= sal.min() <= sal.max() <= 1.0)
    ((32, 32), True)
    """
    _check_method(method, _GRADIENT_METHODS)
    device = next(model.parameters()).device
    x = _as_batch(image, device)
    with _eval_mode(model):
        return _saliency(model, x, target, method, n_samples, noise, seed)


def _saliency(
    model: nn.Module, x: torch.Tensor, target: int | None, method: str, n_samples: int, noise: float, seed: int
) -> tuple[np.ndarray, int]:
    """:func:`saliency_map` on a (1, 3, H, W) batch, with the model already in eval mode."""
    device = x.device
    with torch.no_grad():
        logits = model(x)[0]
    n_classes = logits.shape[-1]
    target = int(logits.argmax()) if target is None else int(target)
    if not 0 <= target < n_classes:
        raise ValueError(f"target must be a class index in 0..{n_classes - 1}, got {target}.")
    mean = getattr(model, "pixel_mean", torch.zeros(1, 1, 1)).to(device)
    if method == "grad_input":
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg)[0, target], xg)
        sal = (grad * (x - mean)).abs().sum(1)[0]
    else:
        gen = torch.Generator().manual_seed(seed)
        sal = torch.zeros(x.shape[-2:], device=device)
        for _ in range(n_samples):
            xn = (x + noise * torch.randn(x.shape, generator=gen).to(device)).requires_grad_(True)
            (grad,) = torch.autograd.grad(model(xn)[0, target], xn)
            sal += grad.abs().sum(1)[0] / n_samples
    return _normalise(sal.detach().cpu().numpy()), target


@torch.no_grad()
def gate_map(model: nn.Module, image: np.ndarray | torch.Tensor, *, depth: int = 0) -> np.ndarray:
    """DF-Mamba's fusion gate at recursion ``depth`` on the patch grid (0 = local, 1 = global).

    The gate of depth ``k`` has one value per coarse token, and coarse token ``i`` summarises the fine tokens
    ``i·2^k … (i+1)·2^k − 1`` of the Hilbert sequence; each patch gets the value of the coarse token that holds it.

    Parameters
    ----------
    model
        A :class:`~dfmamba_st.pathology.DFMambaClassifier` with ``depth >= 1``.
    image
        (3, H, W) uint8 or float in [0, 1].
    depth
        Recursion depth ``k``, ``0 <= k < model depth``.

    Returns
    -------
    (H / patch, W / patch) float array in [0, 1].

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.pathology import DFMambaClassifier, gate_map
    >>> model = DFMambaClassifier(4, d_model=8, depth=2, d_state=2)
    >>> gate_map(model, torch.rand(3, 64, 64), depth=1).shape
    (4, 4)
    """
    _, gates, grid = _gates(model, _as_batch(image, next(model.parameters()).device))
    return _gate_grid(gates, depth, grid)


def _gate_grid(gates: list[np.ndarray], depth: int, grid: tuple[int, int]) -> np.ndarray:
    """The gate of ``depth`` on the patch grid: each patch takes the value of the coarse token that holds it."""
    if not gates:
        raise ValueError("This model has no fusion gates (depth 0, fusion='add', or a sequence shorter than min_len).")
    if not 0 <= depth < len(gates):
        raise ValueError(f"depth must be in 0..{len(gates) - 1} for this model and image size, got {depth}.")
    rows, cols = grid
    return tokens_to_grid(np.repeat(gates[depth], 2**depth)[: rows * cols], rows, cols)


@torch.no_grad()
def _gates(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray], tuple[int, int]]:
    """Logits, the gate of every depth and the patch grid's shape, from one forward pass in eval mode.

    ``x`` is the batch of one image; a gate has one value per coarse token (no gates for a model without them).
    """
    with _eval_mode(model):
        logits, aux = model.forward_with_aux(x)
    gates = [g[0].cpu().numpy() for g in aux.gates]
    return logits, gates, check_image_size(x.shape[2], x.shape[3], model.patch_size)


def plot_saliency(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    method: Method = "grad_input",
    target: int | None = None,
    depth: int = 0,
    class_names: list[str] | tuple[str, ...] | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    **saliency_kwargs,
):
    """Overlay a saliency map (or a gate map) on the image.

    Parameters
    ----------
    model
        The classifier.
    image
        (3, H, W) uint8 or float in [0, 1].
    method
        ``"grad_input"``, ``"smoothgrad"`` (see :func:`saliency_map`) or ``"gate"`` (:func:`gate_map` at ``depth``).
    target
        Class to explain (gradient methods; default the predicted class). The gate map explains no class: an error
        with ``method="gate"``.
    depth
        Recursion depth of the gate map.
    class_names
        Names for the title, one per class of the model.
    alpha, cmap
        Opacity and colour map of the overlay.
    vmin, vmax
        The values at the ends of the colour map. By default 0 and 1 for a saliency map (normalised to [0, 1]); for
        a gate map the 1st and 99th percentiles of the image's gates of every depth (gates often lie within a few
        hundredths of 0.5, which on the full 0–1 scale looks uniform), as :func:`dfmamba_st.pl.gates` draws them, so
        one colour is one gate value in the maps of every depth of an image.
    title
        Axes title (default: method, class and probability).
    ax
        Matplotlib axes to draw into (default: a new figure).
    show
        Call ``plt.show()``; default: when neither ``ax`` nor ``return_fig`` is given.
    return_fig
        Return the figure.
    **saliency_kwargs
        Passed to :func:`saliency_map` (``n_samples``, ``noise``, ``seed``).

    Returns
    -------
    The figure if ``return_fig``, the axes if ``show`` is false, otherwise ``None``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import torch
    >>> from dfmamba_st.pathology import DFMambaClassifier, plot_saliency
    >>> model = DFMambaClassifier(4, d_model=8, depth=1, d_state=2)
    >>> fig = plot_saliency(model, torch.rand(3, 32, 32), show=False, return_fig=True)
    >>> len(fig.axes)
    2
    """
    import matplotlib.pyplot as plt

    _check_method(method, (*_GRADIENT_METHODS, "gate"))
    if method == "gate" and target is not None:
        raise ValueError("target= chooses the class a saliency map explains; the gate map (method='gate') has none.")
    if show is None:  # decided on the arguments, before ``ax`` gets a new figure's axes below
        show = not return_fig and ax is None
    x = _as_batch(image, next(model.parameters()).device)
    if method == "gate":  # one pass gives the probability in the title and the gates
        logits, gates, grid = _gates(model, x)
    else:
        with _eval_mode(model), torch.no_grad():  # the probability in the title, without dropout (as the maps)
            logits = model(x)
    probs = torch.softmax(logits, -1)[0].cpu().numpy()
    if class_names is not None and len(class_names) != probs.size:
        raise ValueError(f"class_names has {len(class_names)} names; the model has {probs.size} classes.")
    height, width = x.shape[-2:]
    if method == "gate":
        heat = _gate_grid(gates, depth, grid)
        label, bar_label = f"gate, depth {depth}", "gate (0 local, 1 global)"
        shown_class = int(probs.argmax())
        vmin, vmax = gate_range(np.concatenate(gates), vmin, vmax)
    else:
        vmin, vmax = 0.0 if vmin is None else vmin, 1.0 if vmax is None else vmax
        check_colour_range(vmin, vmax)
        heat, shown_class = saliency_map(model, image, target=target, method=method, **saliency_kwargs)
        label = "gradient × input" if method == "grad_input" else "SmoothGrad"
        bar_label = "saliency (normalised)"
    own_figure = ax is None
    if own_figure:  # 5 inches on the image's longer side, as wide as its aspect asks (and the colour bar)
        scale = 5.0 / max(height, width)
        fig, ax = plt.subplots(figsize=(max(width * scale + 1.2, 3.0), max(height * scale + 0.6, 2.0)))
    else:
        fig = ax.figure
    ax.imshow(_display(image))
    im = ax.imshow(
        heat,
        cmap=cmap,
        alpha=alpha,
        vmin=vmin,
        vmax=vmax,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, fraction=0.046 * min(1.0, height / width), pad=0.04).set_label(bar_label, fontsize=8)
    name = class_names[shown_class] if class_names is not None else f"class {shown_class}"
    ax.set_title(title if title is not None else f"{label}: {name} (p = {probs[shown_class]:.2f})", fontsize=9)
    ax.set_axis_off()
    if own_figure:
        fig.tight_layout()
    if show:
        plt.show()
    if return_fig:
        return fig
    return None if show else ax
