"""A trained forecaster with what its input needs: forecasts in the data's units, and its folder on disk.

:class:`Forecaster` holds the model with the scaler and seasonal profile of its training rows;
:func:`save_forecaster` and :func:`load_forecaster` write and read it (weights, scaler and season in
``model.safetensors``, the rest in ``config.json``: no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._weights import load_state, read_model_folder, write_model_folder
from ..core import resolve_device
from .data import ForecastSplits, Scaler, Season
from .evaluate import predict
from .models import DFMambaTS, DLinear, MSMamba

__all__ = ["Forecaster", "load_forecaster", "save_forecaster"]

#: the models a folder can hold, by class name
_MODELS = {cls.__name__: cls for cls in (DFMambaTS, DLinear, MSMamba)}
_WRITER, _KIND = "dfm.ts.save_forecaster", "dfmamba_st.forecaster"


@dataclass
class Forecaster:
    """A trained model with the scaler and seasonal profile of its training data.

    Attributes
    ----------
    model
        :class:`~dfmamba_st.ts.DFMambaTS`, :class:`~dfmamba_st.ts.MSMamba` or :class:`~dfmamba_st.ts.DLinear`.
    scaler
        The training rows' :class:`~dfmamba_st.ts.Scaler` (``None``: the model takes the values as they are).
    season
        The :class:`~dfmamba_st.ts.Season` removed from its input, or ``None``.
    columns
        The variates' names, in the model's order (``None``: not known).
    name
        The data set's name.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import dfmamba_st as dfm
    >>> t = np.arange(2000.0)
    >>> frame = pd.DataFrame({"a": 10 + np.sin(t / 10), "b": np.cos(t / 7)})
    >>> splits = dfm.ts.make_splits("toy", seq_len=32, horizon=8, frame=frame)
    >>> model = dfm.ts.DLinear(2, 32, 8)
    >>> forecaster = dfm.ts.Forecaster.from_splits(model, splits)
    >>> forecaster.forecast(frame.iloc[-32:]).shape  # the next 8 rows, in the data's units
    (8, 2)
    """

    model: nn.Module
    scaler: Scaler | None = None
    season: Season | None = None
    columns: list[str] | None = None
    name: str | None = None

    @classmethod
    def from_splits(cls, model: nn.Module, splits: ForecastSplits) -> Forecaster:
        """``model`` with the scaler, season, columns and name of the splits it was trained on."""
        return cls(model, splits.scaler, splits.season, list(map(str, splits.columns)), splits.name)

    def forecast(self, history, *, first_row: int | np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
        """Forecast the next ``horizon`` rows after each lookback, in the data's units.

        Parameters
        ----------
        history
            Lookbacks in the data's units: (seq_len, variates) or (n, seq_len, variates), an array, a
            :class:`pandas.DataFrame` or a list of them (a frame's columns are taken in :attr:`columns`' order).
        first_row
            Row of the series (counted as in the file the model was trained on) where each lookback starts: one
            number, or one per lookback. Needed only with a :attr:`season`, whose profile is taken at the
            lookback's rows and at the forecast's; rows past the file's end continue its phase, so the lookback
            ending at the file's last row (``first_row = rows - seq_len``) forecasts the rows that follow.
        batch_size
            Lookbacks per forward pass.

        Returns
        -------
        (horizon, variates) or (n, horizon, variates) float32.

        Raises
        ------
        ValueError
            When ``history`` has another shape than the model's lookbacks, or holds missing or infinite values.
        """
        seq_len, n_variates, horizon = self.model.seq_len, self.model.n_variates, self.model.horizon
        x = np.asarray(self._columns_of(history), dtype=np.float64)
        single = x.ndim == 2
        x = x[None] if single else x
        if x.ndim != 3 or x.shape[1:] != (seq_len, n_variates):
            raise ValueError(
                f"history must be lookbacks of shape ({seq_len}, {n_variates}) or (n, {seq_len}, {n_variates}), "
                f"got {np.shape(history)}."
            )
        if not np.isfinite(x).all():
            raise ValueError("history holds missing or infinite values; fill them first (the forecast would be NaN).")
        if self.scaler is not None:
            x = self.scaler.transform(x.reshape(-1, n_variates)).reshape(x.shape)
        if self.season is not None:
            starts = self._first_rows(first_row, len(x))
            x = x - self.season.at(starts[:, None] + np.arange(seq_len))
        y = predict(self.model, x, batch_size=batch_size).float().numpy()  # bfloat16 has no numpy type
        if self.season is not None:
            y = y + self.season.at(starts[:, None] + seq_len + np.arange(horizon))
        if self.scaler is not None:
            y = self.scaler.inverse(y.reshape(-1, n_variates)).reshape(y.shape)
        y = y.astype(np.float32, copy=False)
        return y[0] if single else y

    def _columns_of(self, history):
        """A frame's columns in the model's order (an error names the missing ones); anything else as it is.

        In a list, each frame is reordered on its own.
        """
        if isinstance(history, list | tuple):
            return [self._columns_of(item) for item in history]
        if not hasattr(history, "columns") or self.columns is None:
            return history
        names = [str(c) for c in history.columns]
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise ValueError(f"history has no column {missing} (the model was trained on {self.columns}).")
        return history.set_axis(names, axis=1)[self.columns]

    @staticmethod
    def _first_rows(first_row: int | np.ndarray | None, n: int) -> np.ndarray:
        if first_row is None:
            raise ValueError(
                "This forecaster removes a seasonal profile, which depends on the rows: pass first_row= (the row of "
                "the series where each lookback starts, e.g. len(series) - seq_len for the latest lookback)."
            )
        starts = np.asarray(first_row)
        if starts.ndim > 1 or starts.size not in (1, n):
            raise ValueError(f"first_row must be one number or one per lookback ({n}), got shape {starts.shape}.")
        starts = np.broadcast_to(starts, (n,))
        if not np.issubdtype(starts.dtype, np.integer) or (starts < 0).any():
            raise ValueError(f"first_row must be whole numbers >= 0 (one, or one per lookback), got {first_row!r}.")
        return starts.astype(np.int64)


def save_forecaster(
    model: nn.Module | Forecaster, directory: str | Path, *, splits: ForecastSplits | None = None
) -> Path:
    """Write a trained forecaster to a folder: ``model.safetensors`` (weights, scaler, season) and ``config.json``.

    Parameters
    ----------
    model
        A :class:`~dfmamba_st.ts.DFMambaTS`, :class:`~dfmamba_st.ts.MSMamba` or :class:`~dfmamba_st.ts.DLinear`, or a
        :class:`Forecaster` (its scaler, season and columns are saved with it).
    directory
        Folder to write (made if missing; ``~`` is expanded); existing files of the same names are replaced.
    splits
        The :class:`~dfmamba_st.ts.ForecastSplits` the model was trained on: its scaler, season, columns and name
        are saved, so that :meth:`Forecaster.forecast` takes and gives values in the data's units. Without it (and
        with a bare model) only the model is saved.

    Returns
    -------
    The folder.

    Examples
    --------
    >>> import tempfile, numpy as np, pandas as pd
    >>> import dfmamba_st as dfm
    >>> frame = pd.DataFrame({"a": np.sin(np.arange(2000) / 10)})
    >>> splits = dfm.ts.make_splits("toy", seq_len=32, horizon=8, frame=frame)
    >>> model = dfm.ts.DLinear(1, 32, 8)
    >>> again = dfm.ts.load_forecaster(dfm.ts.save_forecaster(model, tempfile.mkdtemp(), splits=splits))
    >>> again.columns, again.forecast(frame.iloc[-32:]).shape
    (['a'], (8, 1))
    """
    if isinstance(model, Forecaster):
        if splits is not None:
            raise ValueError("Pass a Forecaster (which holds its scaler and season) or a model with splits=, not both.")
        forecaster = model
    else:
        forecaster = Forecaster(model) if splits is None else Forecaster.from_splits(model, splits)
    kind = type(forecaster.model).__name__
    if _MODELS.get(kind) is not type(forecaster.model):
        raise TypeError(f"save_forecaster saves the package's forecasters ({', '.join(_MODELS)}), got {kind}.")
    tensors = {f"model.{k}": v for k, v in forecaster.model.state_dict().items()}
    if forecaster.scaler is not None:
        tensors["scaler.mean"] = torch.as_tensor(np.asarray(forecaster.scaler.mean, dtype=np.float64))
        tensors["scaler.std"] = torch.as_tensor(np.asarray(forecaster.scaler.std, dtype=np.float64))
    season = forecaster.season
    if season is not None:
        tensors["season.profile"] = torch.as_tensor(np.asarray(season.profile))
        tensors["season.phase"] = torch.as_tensor(np.asarray(season.phase, dtype=np.int64))
    config = {
        "forecaster": kind,
        "config": forecaster.model.config,
        "season_period": None if season is None else int(season.period),
        "columns": forecaster.columns,
        "name": forecaster.name,
    }
    return write_model_folder(directory, tensors, config, kind=_KIND)


def load_forecaster(directory: str | Path, *, device: str | torch.device = "cpu") -> Forecaster:
    """Read a folder written by :func:`~dfmamba_st.ts.save_forecaster`.

    Parameters
    ----------
    directory
        The folder (``model.safetensors`` and ``config.json``).
    device
        Where to put the model (``"cpu"``, ``"cuda"``, ``"auto"``, a :class:`torch.device`).

    Returns
    -------
    A :class:`Forecaster` whose model is in eval mode; its scaler and season are ``None`` when they were not saved.

    Examples
    --------
    See :func:`save_forecaster`.
    """
    config, tensors = read_model_folder(directory, kind=_KIND, what=_WRITER)
    kind = config.get("forecaster")
    if kind not in _MODELS:
        raise ValueError(f"{directory} holds no forecaster written by {_WRITER} (its config names {kind!r}).")
    model = _MODELS[kind](**config["config"])
    load_state(model, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    scaler = season = None
    if "scaler.mean" in tensors:
        scaler = Scaler(mean=tensors["scaler.mean"].numpy(), std=tensors["scaler.std"].numpy())
    if config["season_period"] is not None:
        period = config["season_period"]
        season = Season(period=period, profile=tensors["season.profile"].numpy(), phase=tensors["season.phase"].numpy())
    model = model.to(resolve_device(device)).eval()
    return Forecaster(model, scaler, season, config["columns"], config["name"])
