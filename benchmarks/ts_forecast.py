"""Long-horizon forecasting benchmark: DF-Mamba-TS, ms-Mamba and DLinear on one data set and horizon.

Trains every requested model with the shared training loop (early stopping on the validation MSE), then prints one
table (test MSE, MAE on the train-standardised data, parameters, train and inference seconds) and optionally writes
``{model: {"mse", "mae", "params", "train_s", ...}}`` as JSON. In the JSON ``best_epoch`` counts from 0 (as
:class:`dfmamba_st.core.TrainResult`); the printed line counts from 1.

Examples
--------
``python benchmarks/ts_forecast.py --dataset ETTh2 --horizon 96 --models dfmamba_ts,dlinear`` (6 epochs by default)

A fast smoke run (CI): ``--epochs 1 --max-train-windows 256 --max-val-windows 256 --max-test-windows 256``.
Zero-shot coarsening of the trained models: ``--zero-shot 2,4``. Every model forecasts the series less a fixed daily
profile of the training rows unless ``--season none`` is given (``ts.make_splits(season="daily")``; errors are those
of the series either way). DF-Mamba ablations: ``--dfm share_weights=false``
(also ``dt_scaling=linear|const``, ``coarsen=pool``, ``fusion=add``, ``aux=off``, ``tokens=patch``, ...).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, get_args

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._options import parse_options  # noqa: E402
from dfmamba_st import set_threads, ts  # noqa: E402
from dfmamba_st.core import available_backends, fit, seed_everything  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "ts"
MODELS = ("dfmamba_ts", "msmamba", "msmamba_learn", "dlinear")
DEFAULT_LR = {"dfmamba_ts": 1e-3, "msmamba": 5e-4, "msmamba_learn": 5e-4, "dlinear": 1e-3}


def season_option(text: str) -> str | int | None:
    """``--season``: ``"none"`` → ``None``, ``"daily"``, or a period in rows."""
    if text in ("none", "daily"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use 'daily', 'none' or a period in rows, not {text!r}") from None


def build_model(
    name: str, n_variates: int, seq_len: int, horizon: int, dfm_opts: dict, ms_opts: dict
) -> torch.nn.Module:
    """Instantiate one benchmark model by name."""
    if name == "dfmamba_ts":
        return ts.DFMambaTS(n_variates, seq_len, horizon, **dfm_opts)
    if name == "msmamba":
        return ts.MSMamba(n_variates, seq_len, horizon, **ms_opts)
    if name == "msmamba_learn":
        return ts.MSMamba(n_variates, seq_len, horizon, **{"learnable_scales": True, **ms_opts})
    if name == "dlinear":
        return ts.DLinear(n_variates, seq_len, horizon)
    raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(MODELS)}.")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the benchmark; returns the JSON-able results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ETTh2")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--models", default="dfmamba_ts,msmamba,dlinear")
    p.add_argument("--epochs", type=int, default=ts.DEFAULT_EPOCHS, help=f"default: {ts.DEFAULT_EPOCHS}, the package's")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--train-loss",
        default=ts.DEFAULT_TRAIN_LOSS,
        choices=get_args(ts.train.TrainLoss),
        help=f"point loss in training (default: {ts.DEFAULT_TRAIN_LOSS}, the package's)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate for every model (default: per model)")
    p.add_argument(
        "--ema-decay", type=float, default=None, help="validate and keep a moving average of the weights (core.fit)"
    )
    decay = inspect.signature(fit).parameters["weight_decay"].default
    p.add_argument(
        "--weight-decay", type=float, default=decay, help=f"AdamW weight decay (default: {decay}, core.fit's)"
    )
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument(
        "--split-ratios",
        default=None,
        help="train,val,test fractions of all rows instead of the standard split, e.g. 0.6,0.2,0.2 (the paper's ETT)",
    )
    p.add_argument(
        "--season",
        default="daily",
        type=season_option,
        help="'daily' (default; or a period in rows): every model forecasts the series less a fixed daily profile "
        "of the training rows (ts.make_splits(season=...); lower test MSE on the four ETT sets, higher MAE on "
        "weather, docs/ts.md); 'none': the series as it is",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--max-train-windows", type=int, default=None, help="random training windows per epoch")
    p.add_argument("--max-val-windows", type=int, default=None, help="evenly spaced validation windows")
    p.add_argument("--max-test-windows", type=int, default=None, help="evenly spaced test windows (smoke tests only)")
    p.add_argument("--zero-shot", default="", help="coarsening factors to test without retraining, e.g. 2,4")
    p.add_argument("--zero-shot-mode", default="wallclock", choices=("wallclock", "steps"))
    p.add_argument("--dfm", nargs="*", default=[], help="DFMambaTS options key=value (ablations)")
    p.add_argument("--ms", nargs="*", default=[], help="MSMamba options key=value")
    p.add_argument("--threads", type=int, default=1, help="torch and numba CPU threads (numba's capped at its start)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    threads = set_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(MODELS)}.")
    dfm_opts, ms_opts = parse_options(args.dfm, "--dfm"), parse_options(args.ms, "--ms")
    factors = [int(f) for f in args.zero_shot.split(",") if f.strip()]
    ratios = None if args.split_ratios is None else tuple(float(v) for v in args.split_ratios.split(","))
    splits = ts.make_splits(
        args.dataset, args.seq_len, args.horizon, path=args.data_dir, ratios=ratios, season=args.season
    )
    print(
        f"{splits.name}: {splits.n_variates} variates, windows train/val/test = "
        f"{len(splits.train)}/{len(splits.val)}/{len(splits.test)} "
        f"({'standard split' if ratios is None else f'fractions {ratios} of all rows'}), "
        f"lookback {args.seq_len}, horizon {args.horizon}, "
        f"{'no seasonal profile' if splits.season is None else f'seasonal profile of {splits.season.period} rows'}; "
        f"torch threads {threads['torch']}, numba threads {threads['numba']}, scan backends {available_backends()}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        seed_everything(args.seed)
        model = build_model(name, splits.n_variates, args.seq_len, args.horizon, dfm_opts, ms_opts)
        lr = args.lr if args.lr is not None else DEFAULT_LR[name]
        start, cpu_start = time.perf_counter(), time.process_time()
        result = ts.train_forecaster(
            model,
            splits,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            train_loss=args.train_loss,
            max_train_windows=args.max_train_windows,
            max_val_windows=args.max_val_windows,
            patience=args.patience,
            seed=args.seed,
            progress=args.progress,
            description=name,
            ema_decay=args.ema_decay,
            weight_decay=args.weight_decay,
        )
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        test = ts.evaluate(model, splits.test, max_windows=args.max_test_windows)
        row: dict[str, Any] = {
            "mse": test["mse"],
            "mae": test["mae"],
            "params": ts.count_parameters(model),
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "infer_s": test["seconds"],
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "lr": lr,
            "train_loss": args.train_loss,
            "val_mse": [round(h["val_loss"], 5) for h in result.history],
            "test_windows": test["n_windows"],
            "scan_backends": ts.scan_backends(model),
        }
        if factors:
            zs = ts.zero_shot(model, splits, factors=[1, *factors], mode=args.zero_shot_mode)
            row["zero_shot"] = {str(f): {"mse": v["mse"], "mae": v["mae"]} for f, v in zs.items()}
        results[name] = row
        print(
            f"  {name}: test MSE {row['mse']:.4f} MAE {row['mae']:.4f}, {row['epochs_run']} epochs "
            f"(best: epoch {row['best_epoch'] + 1}, counted from 1), val MSE {row['val_mse']}, "
            f"{train_s:.0f}s wall, {train_cpu_s:.0f}s CPU, "
            f"scan {row['scan_backends'] or '-'}",
            flush=True,
        )

    header = f"{'model':<14} {'MSE':>7} {'MAE':>7} {'params':>9} {'train_s':>8} {'train_cpu_s':>11} {'infer_s':>8}"
    print(f"\n{splits.name}-{args.horizon} (test windows: {results[names[0]]['test_windows']})")
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        print(
            f"{name:<14} {row['mse']:>7.4f} {row['mae']:>7.4f} {row['params']:>9d} "
            f"{row['train_s']:>8.1f} {row['train_cpu_s']:>11.1f} {row['infer_s']:>8.2f}"
        )
    if factors:
        print(f"\nzero-shot coarsening ({args.zero_shot_mode}), test MSE / MAE by factor")
        for name, row in results.items():
            cells = "  ".join(f"x{f}: {v['mse']:.4f} / {v['mae']:.4f}" for f, v in row["zero_shot"].items())
            print(f"{name:<14} {cells}")
    if args.json:
        meta = {
            "dataset": splits.name,
            "horizon": args.horizon,
            "seq_len": args.seq_len,
            "split_ratios": ratios,
            "season": None if splits.season is None else splits.season.period,
            "ema_decay": args.ema_decay,
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
            "patience": args.patience,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "threads": args.threads,
            "dfm_opts": dfm_opts,
            "ms_opts": ms_opts,
            "max_train_windows": args.max_train_windows,
            "max_val_windows": args.max_val_windows,
            "max_test_windows": args.max_test_windows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        for row in results.values():
            row["config"] = meta
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
