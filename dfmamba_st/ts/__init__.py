"""Time-series forecasting with DF-Mamba-TS, ms-Mamba and DLinear on the ETT and weather benchmarks.

Examples
--------
>>> import dfmamba_st as dfm
>>> model = dfm.ts.DLinear(n_variates=7, seq_len=96, horizon=96)
>>> dfm.ts.count_parameters(model)
18624
"""

from .data import (
    DATA_ENV,
    KNOWN_DATASETS,
    ForecastSplits,
    Scaler,
    Season,
    WindowDataset,
    default_data_dir,
    load,
    make_splits,
    split_borders,
)
from .evaluate import coarsened_windows, evaluate, predict, zero_shot
from .forecaster import Forecaster, load_forecaster, save_forecaster
from .models import DFMambaTS, DLinear, MSMamba, RevIN, count_parameters, scan_backends
from .train import DEFAULT_EPOCHS, DEFAULT_TRAIN_LOSS, forecast_loss, train_forecaster

__all__ = [
    "DATA_ENV",
    "DEFAULT_EPOCHS",
    "DEFAULT_TRAIN_LOSS",
    "KNOWN_DATASETS",
    "DFMambaTS",
    "DLinear",
    "ForecastSplits",
    "Forecaster",
    "MSMamba",
    "RevIN",
    "Scaler",
    "Season",
    "WindowDataset",
    "coarsened_windows",
    "count_parameters",
    "default_data_dir",
    "evaluate",
    "forecast_loss",
    "load",
    "load_forecaster",
    "make_splits",
    "predict",
    "save_forecaster",
    "scan_backends",
    "split_borders",
    "train_forecaster",
    "zero_shot",
]
