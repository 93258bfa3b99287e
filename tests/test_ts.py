"""Tests of dfmamba_st.ts on the real benchmark CSVs (../shared/data/ts)."""

from __future__ import annotations

import inspect
import json
import re
import types

import numpy as np
import pandas as pd
import pytest
import torch
from _shared import DATA as SHARED

from dfmamba_st import ts

DATA = SHARED / "ts"
needs_data = pytest.mark.skipif(not (DATA / "ETTh2.csv.gz").is_file(), reason=f"benchmark CSVs not found in {DATA}")


@pytest.fixture(scope="module")
def etth2() -> pd.DataFrame:
    return ts.load("ETTh2", path=DATA)


@pytest.fixture(scope="module")
def splits(etth2) -> ts.ForecastSplits:
    return ts.make_splits("ETTh2", 96, 96, frame=etth2)


# ------------------------------------------------------------------------------------------------ loading, splits


@needs_data
def test_load_reads_real_files():
    df = ts.load("ETTh2", path=DATA)
    assert df.shape == (17420, 7)
    assert list(df.columns) == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert df.index[0] == pd.Timestamp("2016-07-01 00:00:00")
    assert df.dtypes.eq(np.float32).all()
    weather = ts.load("weather.csv.gz", path=DATA / "weather.csv.gz")  # a file path and a suffix work too
    assert weather.shape == (52696, 21)
    assert weather.index[0] == pd.Timestamp("2020-01-01 00:10:00")


def test_load_missing_file_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv(ts.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))) as err:
        ts.load("ETTh1")
    assert ts.DATA_ENV in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"ETTm1\.csv"):
        ts.load("ETTm1", path=tmp_path)


def test_split_borders_hand_computed():
    # ETTh: 12/4/4 months of 30 days x 24 h; val/test start seq_len before their boundary.
    assert ts.split_borders("ETTh1", 17420, 96) == ([0, 8640 - 96, 11520 - 96], [8640, 11520, 14400])
    # ETTm: the same months at 15 min.
    assert ts.split_borders("ETTm2", 69680, 96) == ([0, 34560 - 96, 46080 - 96], [34560, 46080, 57600])
    # weather: 70/10/20 with int() truncation as in Autoformer: 36887 train, 10539 test, 5270 val.
    assert ts.split_borders("weather", 52696, 96) == ([0, 36887 - 96, 42157 - 96], [36887, 42157, 52696])
    with pytest.raises(ValueError, match="rows"):
        ts.split_borders("ETTh2", 1000, 96)
    # the DF-Mamba paper's ETT split: 60/20/20 of all 17420 rows -> 10452 train, 3484 test, 3484 val
    ratios = (0.6, 0.2, 0.2)
    assert ts.split_borders("ETTh2", 17420, 96, ratios=ratios) == ([0, 10452 - 96, 13936 - 96], [10452, 13936, 17420])
    with pytest.raises(ValueError, match="ratios"):
        ts.split_borders("ETTh2", 17420, 96, ratios=(0.6, 0.2, 0.1))


@needs_data
def test_ratio_split_uses_all_rows_and_fits_the_scaler_on_its_training_rows(etth2):
    paper = ts.make_splits("ETTh2", 96, 96, frame=etth2, ratios=(0.6, 0.2, 0.2))
    raw = etth2.to_numpy(np.float64)
    np.testing.assert_allclose(paper.scaler.mean, raw[:10452].mean(0))
    assert (len(paper.train), len(paper.val), len(paper.test)) == (10452 - 191, 3484 + 96 - 191, 3484 + 96 - 191)
    # the test targets end with the file, not at month 20, and start 580 days + 16 h after 2016-07-01 00:00
    assert paper.test.rows(len(paper.test) - 1)[1].stop == 17420
    assert paper.test.rows(0)[1].start == 13936
    assert etth2.index[13936] == pd.Timestamp("2018-02-01 16:00:00")


@needs_data
def test_windows_match_hand_computed_rows(etth2, splits):
    raw = etth2.to_numpy(np.float64)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8449, 2785, 2785)
    # first test window: lookback rows 11424..11519, first target row 11520 = 2017-10-24 00:00 (480 days in)
    lookback, target = splits.test.rows(0)
    assert (lookback.start, lookback.stop, target.start, target.stop) == (11424, 11520, 11520, 11616)
    assert etth2.index[11520] == pd.Timestamp("2017-10-24 00:00:00")
    x, y = splits.test[0]
    mean, std = raw[:8640].mean(0), raw[:8640].std(0)
    np.testing.assert_allclose(x.numpy(), (raw[11424:11520] - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.numpy(), (raw[11520:11616] - mean) / std, rtol=1e-4, atol=1e-4)
    # last test window ends at row 14399 (the end of month 20); last training target row is 8639
    assert splits.test.rows(len(splits.test) - 1)[1].stop == 14400
    assert splits.train.rows(len(splits.train) - 1)[1].stop == 8640
    # first validation target is the first row after the training months
    assert splits.val.rows(0)[1].start == 8640
    # batched access agrees with item access
    xb, yb = next(splits.test.batches(4))
    torch.testing.assert_close(xb[0], x)
    torch.testing.assert_close(yb[0], y)


@needs_data
def test_ettm_and_weather_window_counts():
    m2 = ts.make_splits("ETTm2", 96, 96, path=DATA)
    assert (len(m2.train), len(m2.val), len(m2.test)) == (34560 - 191, 11520 - 95, 11520 - 95)
    assert ts.load("ETTm2", path=DATA).index[34560] == pd.Timestamp("2017-06-26 00:00:00")
    w = ts.make_splits("weather", 96, 192, path=DATA)
    assert (len(w.train), len(w.val), len(w.test)) == (36887 - 287, 5270 + 96 - 287, 10539 + 96 - 287)


@needs_data
def test_no_test_leakage_into_normalisation(etth2, splits):
    raw = etth2.to_numpy(np.float64)
    np.testing.assert_allclose(splits.scaler.mean, raw[:8640].mean(0))
    np.testing.assert_allclose(splits.scaler.std, raw[:8640].std(0))
    assert not np.allclose(splits.scaler.mean, raw.mean(0))  # would be the leaky choice
    # corrupt every row after the training months: the scaler and the training windows must not move
    corrupted = etth2.copy()
    corrupted.iloc[8640:] = corrupted.iloc[8640:] * 100 + 1e4
    other = ts.make_splits("ETTh2", 96, 96, frame=corrupted)
    np.testing.assert_array_equal(other.scaler.mean, splits.scaler.mean)
    np.testing.assert_array_equal(other.scaler.std, splits.scaler.std)
    torch.testing.assert_close(other.train.values, splits.train.values)
    assert not torch.allclose(other.test.values, splits.test.values)


@needs_data
def test_daily_season_is_the_training_mean_per_hour_and_ignores_later_rows(etth2, splits):
    seasonal = ts.make_splits("ETTh2", 96, 96, frame=etth2, season="daily")
    season = seasonal.season
    assert season.period == 24 and season.profile.shape == (24, 7)
    # the file starts at midnight: hour h of the day is phase h; 8640 training rows = 360 whole days
    hand = splits.values[:8640].reshape(360, 24, 7).mean(0)
    np.testing.assert_allclose(season.profile, hand, atol=1e-5)
    np.testing.assert_array_equal(season.phase[:50], np.arange(50) % 24)
    # the windows hold the series less the profile; adding it back gives the plain standardised series
    np.testing.assert_allclose(seasonal.values + season.at(np.arange(len(etth2))), splits.values, atol=1e-5)
    torch.testing.assert_close(
        seasonal.train.values, torch.from_numpy(splits.values[:8640] - season.profile[np.arange(8640) % 24])
    )
    # rows after the training months do not move the profile (no leakage)
    corrupted = etth2.copy()
    corrupted.iloc[8640:] = corrupted.iloc[8640:] * 100 + 1e4
    np.testing.assert_array_equal(
        ts.make_splits("ETTh2", 96, 96, frame=corrupted, season="daily").season.profile, season.profile
    )
    assert ts.make_splits("ETTh2", 96, 96, frame=etth2, season=12).season.period == 12
    for bad in ("weekly", 1):
        with pytest.raises(ValueError, match="season"):
            ts.make_splits("ETTh2", 96, 96, frame=etth2, season=bad)


@needs_data
def test_season_phase_follows_the_timestamps_across_a_gap():
    weather = ts.load("weather", path=DATA)
    season = ts.make_splits("weather", 96, 96, frame=weather, season="daily").season
    assert season.period == 144  # one day of 10-minute rows
    minutes = (weather.index - weather.index[0]) / pd.Timedelta(minutes=10)
    np.testing.assert_array_equal(season.phase, np.round(minutes).astype(np.int64) % 144)
    jump = int(np.argmax(np.diff(weather.index) > np.timedelta64(10, "m")))  # the file's one gap (1 h 40 min)
    assert season.phase[jump + 1] == (season.phase[jump] + 10) % 144
    assert not np.array_equal(season.phase, np.arange(len(weather)) % 144)  # row numbers would drift
    # rows past the file's end (a forecast of the future) go on from the last row's phase, not from row numbers
    ahead = np.arange(len(weather), len(weather) + 3)
    np.testing.assert_array_equal(season.at(ahead), season.profile[(season.phase[-1] + np.arange(1, 4)) % 144])
    assert season.phase[-1] != (len(weather) - 1) % 144


def test_daily_season_needs_a_day_of_whole_sampling_steps():
    def daily(minutes: int) -> ts.ForecastSplits:
        index = pd.date_range("2024-01-01", periods=3000, freq=f"{minutes}min")
        return ts.make_splits(
            "toy", 16, 4, frame=pd.DataFrame({"a": np.sin(np.arange(3000) / 9)}, index=index), season="daily"
        )

    assert daily(8).season.period == 180  # 1440 / 8
    with pytest.raises(ValueError, match="whole number of sampling steps"):  # 1440 / 7 is not whole
        daily(7)


@needs_data
def test_season_leaves_the_errors_of_the_series_unchanged(etth2, splits):
    seasonal = ts.make_splits("ETTh2", 96, 96, frame=etth2, season="daily")
    torch.manual_seed(0)
    model = ts.DLinear(7, 96, 96).eval()
    got = ts.evaluate(model, seasonal.test, max_windows=64)
    # by hand: forecast of the residual + profile of the forecast rows against the plain standardised targets
    idx = torch.linspace(0, len(seasonal.test) - 1, 64).round().long().numpy()
    rows = seasonal.test.offset + idx[:, None] + np.arange(96)
    with torch.no_grad():
        pred = model(torch.from_numpy(seasonal.values[rows]))[0].numpy() + seasonal.season.at(rows + 96)
    target = splits.values[rows + 96]
    assert got["mse"] == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-5)
    assert got["mae"] == pytest.approx(float(np.abs(pred - target).mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ models


def _tiny_dfm(n: int, seq_len: int = 96, horizon: int = 96, **kw) -> ts.DFMambaTS:
    return ts.DFMambaTS(n, seq_len, horizon, d_model=16, d_state=4, **kw)


@pytest.mark.parametrize("tokens", ["time", "patch", "mixed"])
def test_dfmamba_ts_shapes_and_aux(tokens):
    model = _tiny_dfm(7, 32, 24, tokens=tokens, patch_len=2)  # 16 patch tokens: long enough to recurse
    y, aux = model(torch.randn(3, 32, 7))
    assert y.shape == (3, 24, 7)
    assert aux.ndim == 0 and float(aux.detach()) > 0
    assert model.last_aux is not None and len(model.last_aux.gates) >= 1
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(3, 31, 7))


@pytest.mark.parametrize("tokens", ["patch", "mixed"])
def test_dfmamba_ts_linear_skip_is_a_linear_map_of_the_normalised_lookback(tokens):
    torch.manual_seed(0)
    model = _tiny_dfm(3, 16, 8, tokens=tokens, patch_len=4, linear_skip=True, dropout=0.0).double().eval()
    assert _tiny_dfm(3, 16, 8, tokens=tokens, patch_len=4).skip is None
    head = model.head_out if tokens == "mixed" else model.head
    with torch.no_grad():  # silence the DF-Mamba path: what is left is the skip map alone
        head.weight.zero_()
        head.bias.zero_()
        model.revin.weight.uniform_(0.5, 2.0)  # a learned affine that is not the identity
        model.revin.bias.normal_()
    x = torch.randn(2, 16, 3, dtype=torch.float64) * 4 + 2
    y, _ = model(x)
    mean, std = x.mean(1, keepdim=True), (x.var(1, keepdim=True, unbiased=False) + model.revin.eps).sqrt()
    z = (x - mean) / std * model.revin.weight + model.revin.bias
    linear = torch.einsum("blc,hl->bhc", z, model.skip.weight) + model.skip.bias[None, :, None]
    expected = (linear - model.revin.bias) / (model.revin.weight + model.revin.eps**2) * std + mean
    torch.testing.assert_close(y, expected)
    y.pow(2).sum().backward()  # and it is trained with the rest
    assert model.skip.weight.grad is not None and model.skip.weight.grad.abs().sum() > 0


def test_dfmamba_ts_paper_size():
    # d=64, K=3, N=16, expand 2, time-step tokens, flatten head: close to the paper's 0.658M on ETTm2 (7 variates)
    n = ts.count_parameters(ts.DFMambaTS(7, 96, 96, tokens="time"))
    assert 0.6e6 < n < 0.7e6


def test_revin_is_per_window():
    norm = ts.RevIN(2, affine=False)
    x = torch.randn(4, 20, 2) * torch.tensor([1.0, 50.0]) + torch.tensor([3.0, -7.0])
    z = norm.normalize(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), x, atol=1e-4, rtol=1e-4)


def test_msmamba_scales_and_variants():
    model = ts.MSMamba(5, 32, 16, d_model=16, d_ff=16, d_state=4)
    y, aux = model(torch.randn(2, 32, 5))
    assert y.shape == (2, 16, 5) and float(aux) == 0.0
    ms = model.layers[0].mamba
    assert ms.scales() == [1.0, 2.0, 4.0, 8.0]
    assert all(blk.dt_proj is ms.blocks[0].dt_proj for blk in ms.blocks)  # one learned base rate
    # ... but the input-dependent part of each block's Δ comes from its own projections (docs/ts.md says so)
    assert not any(blk.x_proj is ms.blocks[0].x_proj or blk.in_proj is ms.blocks[0].in_proj for blk in ms.blocks[1:])
    assert all(blk.bidirectional for blk in ms.blocks)
    learn = ts.MSMamba(5, 32, 16, d_model=16, d_ff=16, d_state=4, learnable_scales=True)
    out, _ = learn(torch.randn(2, 32, 5))
    out.pow(2).mean().backward()
    assert learn.layers[0].mamba.log_scales.grad is not None
    assert learn.layers[0].mamba.log_scales.grad.abs().sum() > 0
    # fixed or learned, the multipliers are part of the model's state (saved with it, moved with it)
    for m in (model, learn):
        assert torch.equal(m.state_dict()["layers.0.mamba.log_scales"].exp(), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    # different multipliers give different outputs (alpha reaches the scan)
    torch.manual_seed(0)
    a = ts.MSMamba(5, 32, 16, d_model=16, d_ff=16, d_state=4, scales=(1.0,), dropout=0.0).eval()
    torch.manual_seed(0)
    b = ts.MSMamba(5, 32, 16, d_model=16, d_ff=16, d_state=4, scales=(8.0,), dropout=0.0).eval()
    x = torch.randn(2, 32, 5)
    assert not torch.allclose(a(x)[0], b(x)[0])


def test_scan_backends_reports_what_the_scan_resolves_to():
    from dfmamba_st.core import available_backends

    assert ts.scan_backends(ts.DLinear(3, 16, 4)) == []
    assert ts.scan_backends(_tiny_dfm(3, 16, 4, tokens="time", backend="torch")) == ["torch"]
    auto = ts.MSMamba(3, 16, 4, d_model=8, d_ff=8, d_state=4)
    expected = "numba" if "numba" in available_backends() else "torch"  # the CPU choice of backend="auto"
    assert ts.scan_backends(auto) == [expected]
    assert ts.scan_backends(_tiny_dfm(3, 16, 4, tokens="time")) == [expected]


def test_dlinear_matches_manual_decomposition():
    model = ts.DLinear(3, 30, 10, kernel_size=5)
    x = torch.randn(2, 30, 3)
    padded = torch.cat([x[:, :1].repeat(1, 2, 1), x, x[:, -1:].repeat(1, 2, 1)], 1)
    trend = torch.stack([padded[:, i : i + 5].mean(1) for i in range(30)], 1)
    expected = model.seasonal[0]((x - trend).transpose(1, 2)) + model.trend[0](trend.transpose(1, 2))
    torch.testing.assert_close(model(x)[0], expected.transpose(1, 2))


@needs_data
@pytest.mark.parametrize("name", ["dlinear", "dfmamba_ts", "msmamba"])
def test_training_lowers_loss_on_real_slice(splits, name):
    torch.manual_seed(0)
    model = {
        "dlinear": lambda: ts.DLinear(7, 96, 96),
        "dfmamba_ts": lambda: _tiny_dfm(7, tokens="patch", patch_len=8),
        "msmamba": lambda: ts.MSMamba(7, 96, 96, d_model=32, d_ff=32, d_state=4, n_layers=1),
    }[name]()
    fixed = next(splits.val.batches(128, max_windows=128))
    before = ts.evaluate(model, [fixed])["mse"]
    ts.train_forecaster(model, splits, epochs=2, lr=3e-3, max_train_windows=192, max_val_windows=32)
    after = ts.evaluate(model, [fixed])["mse"]
    assert after < 0.9 * before, (before, after)


def _point_losses(pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three training losses written out (Huber with δ = 1)."""
    err = (pred - y).detach()
    return {
        "mse": (err**2).mean(),
        "mae": err.abs().mean(),
        "huber": torch.where(err.abs() < 1, 0.5 * err**2, err.abs() - 0.5).mean(),
    }


@pytest.mark.parametrize("train_loss", ["mse", "mae", "huber", None])
def test_forecast_loss_trains_on_the_chosen_loss_and_validates_on_mse(train_loss):
    torch.manual_seed(0)
    model = ts.DLinear(3, 16, 4)
    x, y = torch.randn(5, 16, 3), 3 * torch.randn(5, 4, 3)  # errors of a few units: the three losses differ
    expected = _point_losses(model(x)[0], y)
    chosen = {} if train_loss is None else {"train_loss": train_loss}  # None: the default, the MAE
    loss, terms = ts.forecast_loss(model.train(), (x, y), **chosen)
    assert float(loss.detach()) == pytest.approx(float(expected[train_loss or "mae"]), rel=1e-5)  # DLinear: aux = 0
    assert terms["mse"] == pytest.approx(float(expected["mse"]), rel=1e-5)
    val = ts.forecast_loss(model.eval(), (x, y), **chosen)
    assert float(val.detach()) == pytest.approx(float(expected["mse"]), rel=1e-5)


@pytest.mark.parametrize("train_loss", ["mse", "mae", "huber"])
def test_forecast_loss_adds_the_auxiliary_loss_in_training_only(train_loss):
    torch.manual_seed(0)
    model = _tiny_dfm(2, 16, 4, patch_len=2, dropout=0.0)  # 8 tokens: DF-Mamba coarsens, so aux > 0
    x, y = torch.randn(3, 16, 2), 3 * torch.randn(3, 4, 2)
    loss, terms = ts.forecast_loss(model.train(), (x, y), train_loss=train_loss)
    pred, aux = model(x)  # no dropout: the same forecast and auxiliary loss again
    assert float(aux.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(_point_losses(pred, y)[train_loss] + aux.detach()), rel=1e-5)
    assert terms["aux"] == pytest.approx(float(aux.detach()), rel=1e-5)
    val = ts.forecast_loss(model.eval(), (x, y), train_loss=train_loss)
    assert float(val.detach()) == pytest.approx(float(_point_losses(model(x)[0], y)["mse"]), rel=1e-5)


@needs_data
def test_unknown_train_loss_is_refused(splits):
    with pytest.raises(ValueError, match="train_loss"):
        ts.train_forecaster(ts.DLinear(7, 96, 96), splits, epochs=1, train_loss="l3")


# ------------------------------------------------------------------------------------------------ zero-shot


@needs_data
def test_zero_shot_protocol(splits):
    model = ts.DLinear(7, 96, 96)
    native = ts.evaluate(model, splits.test)
    zs = ts.zero_shot(model, splits, factors=(1, 2, 4))
    assert set(zs) == {1, 2, 4}
    assert zs[1]["n_windows"] == len(splits.test)
    assert zs[1]["mse"] == pytest.approx(native["mse"], rel=1e-6)
    steps = ts.zero_shot(model, splits, factors=(1,), mode="steps")[1]  # f = 1 is the native test set in both modes
    assert steps["n_windows"] == len(splits.test) and steps["mse"] == pytest.approx(native["mse"], rel=1e-6)
    # x2: lookback = 192 native rows before the first test target row, averaged in pairs; target = 96 rows -> 48
    x, y = ts.coarsened_windows(splits, 2, 96, 96)
    assert x.shape[1:] == (96, 7) and y.shape[1:] == (48, 7)
    v = splits.values
    np.testing.assert_allclose(x[0].numpy(), v[11520 - 192 : 11520].reshape(96, 2, 7).mean(1), atol=1e-6)
    np.testing.assert_allclose(y[0].numpy(), v[11520 : 11520 + 96].reshape(48, 2, 7).mean(1), atol=1e-6)
    xs, ys = ts.coarsened_windows(splits, 4, 96, 96, mode="steps")
    assert ys.shape[1:] == (96, 7) and len(xs) == 14400 - 11520 - 4 * 96 + 1
    with pytest.raises(ValueError, match="divide"):
        ts.coarsened_windows(splits, 5, 96, 96)


def test_coarsened_lookbacks_never_reach_before_the_first_row():
    # 400 rows, lookback 24: the test split starts at row 320, but a x14 lookback spans 336 rows
    t = np.arange(400, dtype=np.float64)
    splits = ts.make_splits("toy", 24, 1, frame=pd.DataFrame({"a": np.sin(t / 7), "b": t / 400}))
    x, y = ts.coarsened_windows(splits, 14, 24, 1, mode="steps")
    assert len(x) == 400 - 14 - 336 + 1  # forecast origins 336 ... 386
    v = splits.values
    np.testing.assert_allclose(x[0].numpy(), v[:336].reshape(24, 14, 2).mean(1), atol=1e-6)
    np.testing.assert_allclose(y[0].numpy(), v[336:350].mean(0, keepdims=True), atol=1e-6)


# ------------------------------------------------------------------------------------------------ benchmark


@needs_data
def test_benchmark_script_end_to_end(tmp_path, capsys, benchmark_module, keep_torch_threads):
    bench = benchmark_module("ts_forecast")
    out = tmp_path / "res.json"
    argv = ["--dataset", "ETTh2", "--horizon", "96", "--models", "dfmamba_ts,msmamba,dlinear", "--epochs", "1"]
    argv += ["--data-dir", str(DATA), "--json", str(out), "--max-train-windows", "64", "--max-val-windows", "64"]
    argv += ["--max-test-windows", "64", "--zero-shot", "2", "--dfm", "d_model=16", "d_state=4", "tokens=patch"]
    argv += ["--ms", "d_model=16", "d_ff=16", "d_state=4", "n_layers=1"]
    bench.main(argv)
    printed = capsys.readouterr().out
    assert "MSE" in printed and "dfmamba_ts" in printed and "zero-shot" in printed
    res = json.loads(out.read_text())
    assert set(res) == {"dfmamba_ts", "msmamba", "dlinear"}
    for row in res.values():
        assert {"mse", "mae", "params", "train_s"} <= set(row)
        assert np.isfinite(row["mse"]) and row["params"] > 0
        assert set(row["zero_shot"]) == {"1", "2"}
    assert res["dlinear"]["params"] == 18624 and res["dlinear"]["scan_backends"] == []
    assert res["dfmamba_ts"]["scan_backends"] == ts.scan_backends(ts.DFMambaTS(7, 96, 96))

    # the paper's split and the moving average of the weights go through the script, and without --epochs it uses
    # the package's default schedule (DLinear: quick)
    argv = ["--dataset", "ETTh2", "--models", "dlinear", "--data-dir", str(DATA)]
    argv += ["--json", str(out), "--max-train-windows", "64", "--max-test-windows", "64", "--max-val-windows", "64"]
    bench.main([*argv, "--split-ratios", "0.6,0.2,0.2", "--ema-decay", "0.9", "--weight-decay", "0.1"])
    assert "train/val/test = 10261/3389/3389 (fractions (0.6, 0.2, 0.2) of all rows)" in capsys.readouterr().out
    config = json.loads(out.read_text())["dlinear"]["config"]
    assert config["split_ratios"] == [0.6, 0.2, 0.2] and config["ema_decay"] == 0.9 and config["weight_decay"] == 0.1
    assert config["season"] == 24  # the daily profile by default (24 hourly rows)
    bench.main([*argv, "--season", "none"])
    assert "no seasonal profile" in capsys.readouterr().out
    assert json.loads(out.read_text())["dlinear"]["config"]["season"] is None
    with pytest.raises(SystemExit):
        bench.main([*argv, "--season", "weekly"])
    assert "use 'daily', 'none' or a period in rows" in capsys.readouterr().err
    assert config["epochs"] == ts.DEFAULT_EPOCHS == inspect.signature(ts.train_forecaster).parameters["epochs"].default


@needs_data
def test_ts_benchmark_hands_every_setting_and_seed_to_each_model_and_scores_the_test_split(
    tmp_path, benchmark_module, monkeypatch, keep_torch_threads
):
    """What the script hands each model and scores: training, scoring and zero-shot replaced by recorders."""
    bench = benchmark_module("ts_forecast")
    from dfmamba_st.core import seed_everything

    trained, scored, zero_shots = [], [], []

    def fake_train(model, splits, **kw):
        trained.append((model, splits, kw))
        # the weights as built (before any training) and the torch random state right after the build
        trained[-1] += ({k: v.detach().clone() for k, v in model.state_dict().items()},)
        history = [{"train_loss": 0.9, "val_loss": 0.5}, {"train_loss": 0.8, "val_loss": 0.7}]
        return types.SimpleNamespace(history=history, best_epoch=0)

    def fake_evaluate(model, data, **kw):
        scored.append((data, kw))
        return {"mse": 1.25, "mae": 2.5, "n_windows": 8, "seconds": 0.1}

    def fake_zero_shot(model, splits, factors, mode):
        zero_shots.append((factors, mode))
        return {f: {"mse": 3.0, "mae": 4.0} for f in factors}

    monkeypatch.setattr(bench.ts, "train_forecaster", fake_train)
    monkeypatch.setattr(bench.ts, "evaluate", fake_evaluate)
    monkeypatch.setattr(bench.ts, "zero_shot", fake_zero_shot)
    out = tmp_path / "res.json"
    dfm_opts, ms_opts = dict(d_model=8, d_state=2), dict(d_model=8, d_ff=8, d_state=2, n_layers=1)
    argv = ["--dataset", "ETTh2", "--seq-len", "48", "--horizon", "24", "--data-dir", str(DATA)]
    argv += ["--models", "dfmamba_ts,msmamba,msmamba_learn,dlinear", "--epochs", "2", "--patience", "1"]
    argv += ["--batch-size", "8", "--train-loss", "mse", "--ema-decay", "0.9", "--weight-decay", "0.1"]
    argv += ["--max-train-windows", "16", "--max-val-windows", "8", "--max-test-windows", "4", "--seed", "7"]
    argv += ["--zero-shot", "2", "--zero-shot-mode", "steps", "--json", str(out)]
    argv += ["--dfm", *[f"{k}={v}" for k, v in dfm_opts.items()], "--ms", *[f"{k}={v}" for k, v in ms_opts.items()]]
    bench.main(argv)

    names = ["dfmamba_ts", "msmamba", "msmamba_learn", "dlinear"]
    assert len(trained) == 4
    splits = trained[0][1]
    x, y = splits.train[0]
    assert x.shape == (48, 7) and y.shape == (24, 7)  # lookback and horizon not swapped
    references = {
        "dfmamba_ts": lambda: ts.DFMambaTS(7, 48, 24, **dfm_opts),
        "msmamba": lambda: ts.MSMamba(7, 48, 24, **ms_opts),
        "msmamba_learn": lambda: ts.MSMamba(7, 48, 24, learnable_scales=True, **ms_opts),
        "dlinear": lambda: ts.DLinear(7, 48, 24),
    }
    for name, (model, model_splits, kw, built) in zip(names, trained):
        assert model_splits is splits
        assert kw["seed"] == 7 and kw["epochs"] == 2 and kw["patience"] == 1 and kw["batch_size"] == 8
        assert kw["train_loss"] == "mse" and kw["ema_decay"] == 0.9 and kw["weight_decay"] == 0.1
        assert kw["max_train_windows"] == 16 and kw["max_val_windows"] == 8
        assert kw["lr"] == bench.DEFAULT_LR[name]
        # the model as the reference would build it after seed_everything(seed): same options, same initial weights
        seed_everything(7)
        reference = references[name]()
        assert type(model) is type(reference)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()], name
        ref_state = reference.state_dict()
        assert built.keys() == ref_state.keys(), name
        for key in ref_state:
            torch.testing.assert_close(built[key], ref_state[key], msg=f"{name}: {key}")
        with torch.no_grad():
            assert model.eval()(torch.zeros(2, 48, 7))[0].shape == (2, 24, 7)
    # the test split is scored, on the windows asked for, and MSE / MAE land in their own columns
    assert len(scored) == 4 and all(data is splits.test for data, _ in scored)
    assert all(kw.get("max_windows") == 4 for _, kw in scored)
    assert zero_shots == [([1, 2], "steps")] * 4
    res = json.loads(out.read_text())
    for name in names:
        row = res[name]
        assert (row["mse"], row["mae"]) == (1.25, 2.5)
        assert row["epochs_run"] == 2 and row["best_epoch"] == 0 and row["val_mse"] == [0.5, 0.7]
        assert row["zero_shot"] == {"1": {"mse": 3.0, "mae": 4.0}, "2": {"mse": 3.0, "mae": 4.0}}
        assert row["config"]["max_train_windows"] == 16 and row["config"]["dfm_opts"] == dfm_opts
        recorded = {k: row["config"][k] for k in ("seed", "patience", "batch_size", "max_val_windows")}
        assert recorded == {"seed": 7, "patience": 1, "batch_size": 8, "max_val_windows": 8}
        assert row["config"]["ms_opts"] == ms_opts


def test_dfmamba_ts_aux_weight_scales_the_returned_auxiliary_loss():
    """TS5."""
    torch.manual_seed(0)
    model = ts.DFMambaTS(2, 32, 8, d_model=8, d_state=2, patch_len=2, aux_weight=0.25).eval()
    _, aux = model(torch.randn(3, 32, 2))
    assert float(model.last_aux.loss.detach()) > 0
    torch.testing.assert_close(aux, 0.25 * model.last_aux.loss)


@pytest.mark.parametrize("tokens", ["patch", "time"])
def test_dfmamba_ts_tokens_are_contiguous_patches_of_one_variate(tokens):
    """TS6/TS7: token i of variate c is x[b, i*p:(i+1)*p, c] (channel independence, non-overlapping patches)."""
    p = 4 if tokens == "patch" else 1
    model = ts.DFMambaTS(3, 16, 4, d_model=8, d_state=2, tokens=tokens, patch_len=p, revin=False)
    seen = []
    model.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    entered = []
    model.backbone.register_forward_hook(lambda mod, inp, out: entered.append(inp[0].detach()))
    x = torch.randn(2, 16, 3)
    model(x)
    tok = seen[0]
    with torch.no_grad():  # each token gets its learned position embedding before DF-Mamba
        torch.testing.assert_close(entered[0], model.embed(tok) + model.position)
    assert tok.shape == (2 * 3, 16 // p, p)
    for b in range(2):
        for c in range(3):
            for i in range(16 // p):
                assert torch.equal(tok[b * 3 + c, i], x[b, i * p : (i + 1) * p, c])


def test_train_forecaster_draws_a_fresh_shuffle_every_epoch(monkeypatch):
    """TS8: max_train_windows is 'a fresh subset every epoch'."""
    t = np.arange(600, dtype=np.float32)
    splits = ts.make_splits("toy", 16, 4, frame=pd.DataFrame({"a": np.sin(t / 5)}))
    real = ts.train.forecast_loss
    epochs_seen = []

    def per_epoch(model, batch, **kw):
        if model.training and not per_epoch.in_epoch:
            epochs_seen.append(batch[0].clone())
            per_epoch.in_epoch = True
        if not model.training:
            per_epoch.in_epoch = False
        return real(model, batch, **kw)

    per_epoch.in_epoch = False
    monkeypatch.setattr(ts.train, "forecast_loss", per_epoch)
    ts.train_forecaster(ts.DLinear(1, 16, 4), splits, epochs=3, max_train_windows=32, patience=None)
    assert len(epochs_seen) == 3
    assert not torch.equal(epochs_seen[0], epochs_seen[1]) and not torch.equal(epochs_seen[1], epochs_seen[2])


def test_evaluate_averages_over_windows_not_over_batches():
    """M17: MSE/MAE over every value, whatever the batch size (the last batch is smaller)."""
    g = np.random.default_rng(0)
    ds = ts.WindowDataset(g.normal(size=(40, 2)).astype(np.float32), seq_len=8, horizon=4)  # 29 windows
    torch.manual_seed(0)
    model = ts.DLinear(2, 8, 4)
    whole = ts.evaluate(model, ds, batch_size=256)
    for batch_size in (3, 7, 28):
        part = ts.evaluate(model, ds, batch_size=batch_size)
        assert part["mse"] == pytest.approx(whole["mse"], rel=1e-6)
        assert part["mae"] == pytest.approx(whole["mae"], rel=1e-6)
        assert part["n_windows"] == 29


def test_zero_shot_passes_the_mode_on():
    """M18: zero_shot(mode='steps') scores the f*H-row pooled targets of coarsened_windows(mode='steps')."""
    t = np.arange(800, dtype=np.float32)
    splits = ts.make_splits("toy", 16, 8, frame=pd.DataFrame({"a": np.sin(t / 5), "b": np.cos(t / 9)}))
    torch.manual_seed(0)
    model = ts.DLinear(2, 16, 8)
    got = ts.zero_shot(model, splits, factors=(2,), mode="steps")[2]
    x, y = ts.coarsened_windows(splits, 2, 16, 8, mode="steps")
    assert y.shape[1] == 8
    want = ts.evaluate(model, [(x, y)])
    assert got["mse"] == pytest.approx(want["mse"], rel=1e-6) and got["n_windows"] == len(x)


def test_shuffled_batches_take_max_windows_distinct_windows():
    """M19: max_windows with shuffle is 'a random subset' of that many windows."""
    ds = ts.WindowDataset(np.arange(300, dtype=np.float32)[:, None], seq_len=8, horizon=2)
    xs = torch.cat([x for x, _ in ds.batches(16, shuffle=True, seed=3, max_windows=40)])
    assert len(xs) == 40
    starts = xs[:, 0, 0].long()
    assert len(set(starts.tolist())) == 40 and int(starts.max()) < len(ds)


def test_constant_variate_gets_unit_std():
    """M20: a constant training variate is standardised with std 1 (finite values, not NaN/inf)."""
    t = np.arange(400, dtype=np.float32)
    splits = ts.make_splits("toy", 16, 4, frame=pd.DataFrame({"a": np.sin(t / 5), "flat": np.full(400, 3.0)}))
    assert splits.scaler.std[1] == 1.0
    assert np.isfinite(splits.values).all() and np.all(splits.values[:, 1] == 0.0)


def test_msmamba_averages_the_blocks_each_at_its_own_scale():
    """M21/M22: the multi-scale module is mean_i block_i(h, alpha=scale_i)."""
    torch.manual_seed(0)
    model = ts.MSMamba(3, 16, 4, d_model=8, d_ff=8, d_state=2, dropout=0.0, backend="reference").double().eval()
    ms = model.layers[0].mamba
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    want = torch.stack([blk(h, alpha=s) for blk, s in zip(ms.blocks, (1.0, 2.0, 4.0, 8.0))]).mean(0)
    torch.testing.assert_close(ms(h), want, rtol=1e-8, atol=1e-10)  # exp(log 8) is 8 to rounding
    layer = model.layers[0]  # a residual and a LayerNorm after the module, then after the MLP
    mixed = layer.norm1(h + ms(h))
    torch.testing.assert_close(layer(h), layer.norm2(mixed + layer.mlp(mixed)))
    # the whole model: instance norm without affine, variates as tokens, the layers, a LayerNorm and the linear head
    assert not list(model.revin.parameters())
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    h = model.embed(model.revin.normalize(x).transpose(1, 2))
    for layer in model.layers:
        h = layer(h)
    want = model.revin.denormalize(model.head(model.norm(h)).transpose(1, 2))
    torch.testing.assert_close(model(x)[0], want)


def test_dfmamba_ts_patch_tokens_recurse_to_length_two_by_default():
    """M23: the documented 12 -> 6 -> 3 -> 2 of the default patch tokens (min_len 2)."""
    torch.manual_seed(0)
    model = ts.DFMambaTS(2, d_model=8, d_state=2).eval()
    model(torch.randn(1, 96, 2))
    assert model.last_aux.lengths == [12, 6, 3, 2]


def test_dlinear_maps_start_as_the_mean_of_the_lookback():
    for individual in (False, True):
        model = ts.DLinear(2, 20, 5, individual=individual)
        for lin in (*model.seasonal, *model.trend):
            torch.testing.assert_close(lin.weight.detach(), torch.full((5, 20), 1 / 20))


def test_dlinear_individual_uses_each_variates_own_maps():
    """M24: individual=True: variate c goes through seasonal[c] and trend[c]."""
    torch.manual_seed(0)
    model = ts.DLinear(3, 20, 5, kernel_size=5, individual=True)
    with torch.no_grad():
        for lin in (*model.seasonal, *model.trend):
            lin.weight.normal_()
            lin.bias.normal_()
    x = torch.randn(2, 20, 3)
    trend = model.decomp(x)
    want = torch.stack(
        [model.seasonal[c](x[:, :, c] - trend[:, :, c]) + model.trend[c](trend[:, :, c]) for c in range(3)], -1
    )
    torch.testing.assert_close(model(x)[0], want)


def _toy_splits():
    t = np.arange(600, dtype=np.float32)
    return ts.make_splits("toy", 16, 4, frame=pd.DataFrame({"a": np.sin(t / 5)}))


def test_train_forecaster_schedule_counts_every_batch(monkeypatch):
    """M25: steps_per_epoch handed to fit is the number of batches an epoch yields (the last one partial)."""
    splits = _toy_splits()
    seen = {}
    real_fit = ts.train.fit

    def spy(model, loss_fn, train_data, **kw):
        seen["steps"] = kw["steps_per_epoch"]
        seen["batches"] = len(list(train_data(0)))
        return real_fit(model, loss_fn, train_data, **kw)

    monkeypatch.setattr(ts.train, "fit", spy)
    ts.train_forecaster(ts.DLinear(1, 16, 4), splits, epochs=1, batch_size=32, max_train_windows=100)
    assert seen["batches"] == 4 and seen["steps"] == 4


def test_train_forecaster_validates_on_max_val_windows(monkeypatch):
    """M26: max_val_windows bounds the validation windows of every epoch."""
    splits = _toy_splits()
    counts = []
    real = ts.train.forecast_loss

    def counting(model, batch, **kw):
        if not model.training:
            counts.append(len(batch[0]))
        return real(model, batch, **kw)

    monkeypatch.setattr(ts.train, "forecast_loss", counting)
    ts.train_forecaster(ts.DLinear(1, 16, 4), splits, epochs=2, max_train_windows=32, max_val_windows=10, patience=None)
    assert counts == [10, 10]
