"""Test metrics and the zero-shot temporal-coarsening evaluation.

Zero-shot protocol (:func:`coarsened_windows`, :func:`zero_shot`). A model trained at the native sampling with
lookback ``L`` and horizon ``H`` is given, without retraining, inputs sampled ``f`` times more coarsely:

* every forecast origin ``t`` of the native test split (the first target row, ``t`` from the test boundary to the
  last row that leaves room for the target, step 1) gives one window;
* lookback: the ``f·L`` native rows before ``t``, average-pooled in non-overlapping groups of ``f`` → ``L`` coarse
  steps (so the model sees ``f`` times more wall-clock history in the same number of tokens);
* ``mode="wallclock"`` (default): the target is the next ``H`` native rows pooled the same way → ``H / f`` coarse
  steps, and the model's first ``H / f`` outputs are scored: the same forecast horizon in wall-clock time;
* ``mode="steps"``: the target is the next ``f·H`` native rows pooled → ``H`` coarse steps, all outputs scored
  (the same number of steps, ``f`` times the wall-clock horizon).

``f = 1`` reproduces the ordinary test set exactly in both modes. Values are the train-standardised series, so
MSE/MAE are on the same scale as the native test metrics (though pooled targets are smoother).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._utils import whole_number
from .data import ForecastSplits, WindowDataset

__all__ = ["coarsened_windows", "evaluate", "predict", "zero_shot"]

#: the splits :func:`coarsened_windows` takes forecast origins from, and their index in ``ForecastSplits.ends``
_SPLITS = {"val": 1, "test": 2}


def _check_forecast_shape(pred: torch.Tensor, y: torch.Tensor) -> None:
    """A clear error when a forecast and its target differ in shape (instead of a broadcast or a size error)."""
    if pred.shape != y.shape:
        raise ValueError(
            f"The model forecasts shape {tuple(pred.shape)} but the targets have shape {tuple(y.shape)} (batch, "
            "horizon, variates): the model's horizon or number of variates does not match the data."
        )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Forecasts of ``model`` (in eval mode) for lookbacks ``x`` (n, L, C), batched; returns (n, H, C) on CPU.

    ``x`` may be a tensor or an array of any float type (e.g. ``splits.scaler.transform(...)`` of a pandas frame,
    float64); it is given to the model in the model's own precision. An empty ``x`` gives an empty (0, H, C)
    tensor (``H``: ``model.horizon``).

    Parameters
    ----------
    model
        A forecaster returning ``(forecast, aux)`` for a lookback batch (DFMambaTS, MSMamba, DLinear). It is put in
        eval mode (and left there); the lookbacks are cast to the dtype of its first parameter and moved to that
        parameter's device.
    x
        (n, seq_len, variates) lookbacks, a tensor or an array.
    batch_size
        Lookbacks per forward pass, a whole number >= 1.

    Returns
    -------
    (n, H, C) forecasts on the CPU, in the dtype the model outputs, computed without gradients.

    Raises
    ------
    ValueError
        When ``x`` is not 3-D, or ``batch_size`` is a number that is not whole or is below 1 (a ``TypeError`` when
        it is not a number).

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import DLinear, predict
    >>> model = DLinear(2, 16, 4)
    >>> predict(model, torch.zeros(5, 16, 2), batch_size=2).shape
    torch.Size([5, 4, 2])
    >>> predict(model, torch.zeros(0, 16, 2)).shape
    torch.Size([0, 4, 2])
    """
    batch_size = whole_number(batch_size, "batch_size")
    x = torch.as_tensor(x)
    if x.ndim != 3:
        raise ValueError(f"x must be lookbacks of shape (n, seq_len, variates), got shape {tuple(x.shape)}.")
    model.eval()
    weights = next(model.parameters())
    device = weights.device
    x = x.to(weights.dtype)  # float64 arrays from numpy / pandas in the model's precision
    if len(x) == 0 and hasattr(model, "horizon"):
        return x.new_zeros((0, model.horizon, x.shape[2]), device="cpu")
    # max(len(x), 1): a model without a ``horizon`` gives the shape of an empty forecast from one empty batch
    outs = [model(x[i : i + batch_size].to(device))[0].cpu() for i in range(0, max(len(x), 1), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: WindowDataset | Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 256,
    max_windows: int | None = None,
    n_outputs: int | None = None,
) -> dict[str, float]:
    """Mean squared and absolute error of the forecasts over every window (and every step and variate).

    Parameters
    ----------
    model
        A forecaster returning ``(forecast, aux)``.
    data
        A :class:`~dfmamba_st.ts.WindowDataset` or an iterable of ``(x, y)`` batches.
    batch_size
        Windows per forward pass (WindowDataset only).
    max_windows
        Evenly spaced subset of the windows (WindowDataset only; ``None`` = all, as for reported numbers).
    n_outputs
        Score only the first ``n_outputs`` forecast steps (``y`` must have that many).

    Returns
    -------
    ``{"mse", "mae", "n_windows", "seconds"}`` (``seconds``: wall time of the forward passes and metrics).

    Raises
    ------
    ValueError
        When the forecasts (cut to ``n_outputs`` steps) and the targets differ in shape, e.g. a model built for
        another horizon; when there is no window; when ``max_windows`` is given with batches, not a
        :class:`~dfmamba_st.ts.WindowDataset`.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.ts import DLinear, WindowDataset, evaluate
    >>> ds = WindowDataset(np.zeros((50, 2), np.float32), seq_len=16, horizon=4)
    >>> model = DLinear(2, 16, 4)
    >>> _ = [p.data.zero_() for p in model.parameters()]
    >>> evaluate(model, ds)["mse"]
    0.0
    """
    batch_size = whole_number(batch_size, "batch_size")
    if max_windows is not None and not isinstance(data, WindowDataset):
        raise ValueError(
            f"max_windows={max_windows!r} takes a subset of a WindowDataset's windows; data is a "
            f"{type(data).__name__} of batches, scored as they come. Pass max_windows=None or a WindowDataset."
        )
    batches = data.batches(batch_size, max_windows=max_windows) if isinstance(data, WindowDataset) else data
    model.eval()
    device = next(model.parameters()).device
    sq, ab, count, n_windows = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    for x, y in batches:
        pred = model(x.to(device))[0].cpu()
        if n_outputs is not None:
            pred = pred[:, :n_outputs]
        _check_forecast_shape(pred, y)
        diff = (pred - y).double()
        sq += float((diff**2).sum())
        ab += float(diff.abs().sum())
        count += diff.numel()
        n_windows += len(x)
    seconds = time.perf_counter() - start
    if count == 0:
        raise ValueError("No window to evaluate.")
    return {"mse": sq / count, "mae": ab / count, "n_windows": n_windows, "seconds": seconds}


def coarsened_windows(
    splits: ForecastSplits,
    factor: int,
    seq_len: int,
    horizon: int,
    mode: Literal["wallclock", "steps"] = "wallclock",
    split: Literal["val", "test"] = "test",
    stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookbacks and targets of the zero-shot coarsening test (see the module docstring for the protocol).

    Parameters
    ----------
    splits
        The data set (its standardised ``values`` and split borders are used).
    factor
        Coarsening factor ``f`` (1 = native), a whole number.
    seq_len, horizon
        The model's lookback ``L`` and horizon ``H``.
    mode
        ``"wallclock"``: target = next ``H`` native rows pooled (``H / f`` steps; ``f`` must divide ``H``);
        ``"steps"``: target = next ``f·H`` native rows pooled (``H`` steps).
    split
        Which split's forecast origins to use.
    stride
        Step between forecast origins, in native rows (>= 1).

    Returns
    -------
    ``(x, y)``: (n, L, C) and (n, H / f or H, C) float32 tensors.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from dfmamba_st.ts import make_splits, coarsened_windows
    >>> s = make_splits("toy", 8, 4, frame=pd.DataFrame({"a": np.arange(200.0)}))
    >>> x, y = coarsened_windows(s, 2, 8, 4)
    >>> x.shape[1:], y.shape[1:], len(x) == len(s.test)
    (torch.Size([8, 1]), torch.Size([2, 1]), True)
    """
    factor = whole_number(factor, "factor")
    origins, span = _coarsened_origins(splits, factor, seq_len, horizon, mode, split, stride)
    values = torch.from_numpy(splits.values)
    c = values.shape[1]
    back = torch.arange(-factor * seq_len, 0)
    ahead = torch.arange(span)
    o = torch.from_numpy(origins)[:, None]
    x = values[o + back].reshape(len(origins), seq_len, factor, c).mean(2)
    y = values[o + ahead].reshape(len(origins), span // factor, factor, c).mean(2)
    return x, y


def _coarsened_origins(
    splits: ForecastSplits, factor: int, seq_len: int, horizon: int, mode: str, split: str, stride: int
) -> tuple[np.ndarray, int]:
    """The forecast origins of :func:`coarsened_windows` and the native rows each target spans (checks first)."""
    stride = whole_number(stride, "stride")
    if mode not in ("wallclock", "steps"):
        raise ValueError(f"mode={mode!r} is not 'wallclock' or 'steps'.")
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(map(repr, _SPLITS))} (the forecast origins).")
    if mode == "wallclock" and horizon % factor:
        raise ValueError(f"mode='wallclock' needs the factor {factor} to divide the horizon {horizon}.")
    span = horizon if mode == "wallclock" else factor * horizon
    idx = _SPLITS[split]
    first, end = splits.ends[idx - 1], splits.ends[idx]
    origins = np.arange(max(first, factor * seq_len), end - span + 1, stride)
    if len(origins) == 0:
        raise ValueError(f"The {split} split is too short for factor {factor} (span {span}).")
    return origins, span


def zero_shot(
    model: nn.Module,
    splits: ForecastSplits,
    factors: Sequence[int] = (1, 2, 4),
    mode: Literal["wallclock", "steps"] = "wallclock",
    stride: int = 1,
    batch_size: int = 256,
) -> dict[int, dict[str, float]]:
    """Test metrics of ``model`` on inputs coarsened by each factor, without retraining.

    Parameters
    ----------
    model
        A trained forecaster with attributes ``seq_len`` and ``horizon``.
    splits
        The data set it was trained on.
    factors
        Coarsening factors, whole numbers; 1 is the native test set.
    mode
        See :func:`coarsened_windows`.
    stride
        Step between forecast origins.
    batch_size
        Windows per forward pass.

    Returns
    -------
    ``{factor: {"mse", "mae", "n_windows", "seconds"}}``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from dfmamba_st.ts import DLinear, make_splits, zero_shot
    >>> s = make_splits("toy", 16, 8, frame=pd.DataFrame({"a": np.sin(np.arange(600) / 5)}))
    >>> sorted(zero_shot(DLinear(1, 16, 8), s, factors=(1, 2)))
    [1, 2]
    """
    batch_size = whole_number(batch_size, "batch_size")
    factors = [whole_number(f, "each factor") for f in factors]
    for f in factors:  # a factor the data cannot serve is refused before any forecast (the windows: one at a time)
        _coarsened_origins(splits, f, model.seq_len, model.horizon, mode, "test", stride)
    results = {}
    for f in factors:
        x, y = coarsened_windows(splits, f, model.seq_len, model.horizon, mode=mode, stride=stride)
        n_out = y.shape[1]
        batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))
        results[f] = evaluate(model, batches, n_outputs=n_out)
    return results
