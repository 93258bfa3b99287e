"""Training of the forecasters with the shared loop :func:`dfmamba_st.core.fit`."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import whole_number
from ..core import TrainResult, fingerprint, fit, isolated_global_state
from .data import ForecastSplits
from .evaluate import _check_forecast_shape

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_TRAIN_LOSS", "forecast_loss", "train_forecaster"]

TrainLoss = Literal["mse", "mae", "huber"]
_POINT_LOSSES = {"mse": F.mse_loss, "mae": F.l1_loss, "huber": F.huber_loss}
#: the training loss by default: chosen on the validation MSE of DF-Mamba-TS over the five benchmark sets (lower
#: with the MAE on ETTh2, ETTm1, ETTm2 and weather, higher by 0.0014 on ETTh1 with two seeds; docs/ts_log.md)
DEFAULT_TRAIN_LOSS: TrainLoss = "mae"
#: the length of the cosine schedule by default: on ETTh2-96 with every training window, 6 epochs gave DF-Mamba-TS a
#: lower best validation MSE than 10 with 12 of 14 seeds (mean -0.0010, standard error 0.0003; docs/ts_log.md)
DEFAULT_EPOCHS = 6


def forecast_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], *, train_loss: TrainLoss = DEFAULT_TRAIN_LOSS
) -> Any:
    """Loss for :func:`~dfmamba_st.core.fit`: error of the forecast plus the model's auxiliary loss while training.

    In evaluation mode (validation, early stopping) only the forecast MSE is returned, so model selection is on the
    task metric alone, whatever ``train_loss`` the model is trained with (``"mse"``, ``"mae"`` or ``"huber"``
    with δ = 1 on the standardised scale).

    Parameters
    ----------
    model
        A forecaster returning ``(forecast, aux_loss)`` with ``aux_loss`` a scalar tensor (DFMambaTS, MSMamba,
        DLinear). Its ``training`` flag chooses between the two losses.
    batch
        ``(x, y)``: lookbacks (batch, seq_len, C) and targets (batch, horizon, C), moved to the device of the
        model's first parameter.
    train_loss
        Point loss in training mode: ``"mse"``, ``"mae"`` (the default, ``DEFAULT_TRAIN_LOSS``) or ``"huber"``.
        Not used in evaluation mode.

    Returns
    -------
    In training mode ``(point_loss + aux_loss, terms)``: ``terms`` holds the floats ``"mse"`` and ``"aux"``, and
    the point loss under its own name when it is not the MSE. In evaluation mode the forecast MSE alone, a scalar
    tensor.

    Raises
    ------
    ValueError
        When the forecast and the targets differ in shape (a model built for another horizon or number of
        variates).
        For a ``train_loss`` other than the three names (in either mode).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import DLinear, forecast_loss
    >>> model = DLinear(2, 8, 4)
    >>> loss, terms = forecast_loss(model, (torch.zeros(3, 8, 2), torch.zeros(3, 4, 2)))
    >>> loss.ndim, sorted(terms)
    (0, ['aux', 'mae', 'mse'])
    >>> x, y = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(0)), torch.ones(3, 4, 2)
    >>> pred, _ = model.eval()(x)
    >>> bool(forecast_loss(model, (x, y)) == ((pred - y) ** 2).mean())  # eval: the forecast MSE alone
    True
    """
    _check_train_loss(train_loss)
    x, y = batch
    device = next(model.parameters()).device
    pred, aux = model(x.to(device))
    y = y.to(device)
    _check_forecast_shape(pred, y)
    mse = F.mse_loss(pred, y)
    if not model.training:
        return mse
    terms = {"mse": float(mse.detach()), "aux": float(aux.detach())}
    if train_loss == "mse":
        return mse + aux, terms
    point = _POINT_LOSSES[train_loss](pred, y)
    terms[train_loss] = float(point.detach())
    return point + aux, terms


def _check_train_loss(train_loss: str) -> None:
    if train_loss not in _POINT_LOSSES:
        raise ValueError(f"Unknown train_loss {train_loss!r}; use {', '.join(map(repr, _POINT_LOSSES))}.")


def _check_windows(model: nn.Module, splits: ForecastSplits) -> None:
    """A clear error when ``model``'s lookback or horizon (when it has them) differs from the windows of ``splits``."""
    for attr in ("seq_len", "horizon"):
        have, need = getattr(model, attr, None), getattr(splits.train, attr)
        if have is not None and have != need:
            raise ValueError(
                f"The model's {attr} is {have} but the windows of the splits have {attr} {need}; build the model with "
                f"{attr}={need}, or the splits with make_splits(..., {attr}={have})."
            )


@isolated_global_state()
def train_forecaster(
    model: nn.Module,
    splits: ForecastSplits,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 32,
    lr: float = 1e-3,
    train_loss: TrainLoss = DEFAULT_TRAIN_LOSS,
    max_train_windows: int | None = None,
    max_val_windows: int | None = None,
    patience: int | None = 3,
    seed: int | None = 42,
    progress: bool = False,
    description: str = "forecaster",
    **fit_kwargs: Any,
) -> TrainResult:
    """Train ``model`` on ``splits.train`` with early stopping on ``splits.val`` (forecast MSE).

    Parameters
    ----------
    model
        A forecaster returning ``(forecast, aux_loss)`` (DFMambaTS, MSMamba, DLinear).
    splits
        Windows from :func:`~dfmamba_st.ts.make_splits`.
    epochs
        Maximum number of epochs; the cosine schedule of the learning rate spans them, so this also sets how fast
        it decays (``DEFAULT_EPOCHS``, 6, was chosen over 10 on the validation MSE, docs/ts_log.md).
    batch_size
        Windows per optimiser step (32 is standard).
    lr
        Peak AdamW learning rate (cosine schedule with warm-up, as everywhere in the package).
    train_loss
        Point loss minimised in training: ``"mae"`` (default), ``"mse"`` or ``"huber"``. Early stopping and the
        kept weights are always judged on the validation MSE. The MAE was chosen on validation: it gave DF-Mamba-TS
        the lower validation MSE on ETTh2, ETTm1, ETTm2 and weather, the MSE on ETTh1 (by 0.0014, two seeds).
    max_train_windows
        Train on a random subset of this many windows per epoch (a fresh subset every epoch); ``None``: all.
    max_val_windows
        Validate on this many evenly spaced windows; ``None``: all.
    patience
        Early-stopping patience in epochs.
    seed
        Seed of the training run and of the per-epoch shuffles. ``None``: do not reseed; the shuffles and the
        model's random draws (dropout) then follow the caller's torch random state.
    progress
        Show the progress bar of :func:`~dfmamba_st.core.fit`.
    description
        Label of that bar.
    **fit_kwargs
        Passed on to :func:`~dfmamba_st.core.fit` (``weight_decay``, ``grad_clip``, ``checkpoint_dir``, ...).

    Returns
    -------
    The :class:`~dfmamba_st.core.TrainResult`; the model holds the weights of the best validation epoch.

    Notes
    -----
    The caller's global state is left as it was: the Python, NumPy and torch random states and torch's determinism
    settings that :func:`~dfmamba_st.core.fit` changes when it seeds are put back afterwards
    (:func:`~dfmamba_st.core.isolated_global_state`); with ``seed=None`` too, so two such calls from the same state
    draw the same shuffles.

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> from dfmamba_st.ts import DLinear, make_splits, train_forecaster
    >>> t = np.arange(2000, dtype=np.float32)
    >>> frame = pd.DataFrame({"a": np.sin(t / 10), "b": np.cos(t / 7)})
    >>> splits = make_splits("toy", seq_len=32, horizon=8, frame=frame)
    >>> result = train_forecaster(DLinear(2, 32, 8), splits, epochs=2)
    >>> len(result.history)
    2
    """
    _check_train_loss(train_loss)
    batch_size = whole_number(batch_size, "batch_size")
    epochs = whole_number(epochs, "epochs")
    if "device" in fit_kwargs:
        raise TypeError(
            "train_forecaster has no device option: it trains where the model is; move it first, "
            "e.g. model.to('cuda'), and the batches follow it."
        )
    if max_train_windows is not None:
        max_train_windows = whole_number(max_train_windows, "max_train_windows (None: every training window)")
    if max_val_windows is not None:
        max_val_windows = whole_number(max_val_windows, "max_val_windows (None: every validation window)")
    _check_windows(model, splits)
    n_train = len(splits.train) if max_train_windows is None else min(max_train_windows, len(splits.train))
    steps = math.ceil(n_train / batch_size)
    # the shuffles' seed: a draw from the caller's torch random state when the run is not reseeded
    shuffle_seed = seed if seed is not None else int(torch.randint(2**31 - 1, ()))

    def train_batches(epoch: int):
        return splits.train.batches(batch_size, shuffle=True, seed=shuffle_seed + epoch, max_windows=max_train_windows)

    def val_batches(epoch: int):
        return splits.val.batches(256, max_windows=max_val_windows)

    if fit_kwargs.get("checkpoint_dir") is not None:  # what names the run besides fit's own settings
        fit_kwargs.setdefault(
            "run_key",
            {
                "data": fingerprint(splits.values, splits.starts, splits.ends),
                "windows": [len(splits.train), len(splits.val), max_train_windows, max_val_windows],
                "batch_size": batch_size,
                "train_loss": train_loss,
            },
        )
    return fit(
        model,
        functools.partial(forecast_loss, train_loss=train_loss),
        train_batches,
        epochs=epochs,
        val_data=val_batches,
        steps_per_epoch=steps,
        lr=lr,
        patience=patience,
        seed=seed,
        progress=progress,
        description=description,
        **fit_kwargs,
    )
