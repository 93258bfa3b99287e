"""A trained forecaster in the data's units (``ts.Forecaster``) and its folder (``ts.save_forecaster`` /
``ts.load_forecaster``), on the real ETTh1 series with its daily profile."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _shared import shared_path

import dfmamba_st
from dfmamba_st import pathology, ts
from dfmamba_st._weights import FOLDER_FORMAT

SEQ_LEN, HORIZON = 96, 24


@pytest.fixture(scope="module")
def etth1() -> pd.DataFrame:
    return ts.load("ETTh1", path=shared_path("ts", "ETTh1.csv.gz"))


@pytest.fixture(scope="module")
def splits(etth1) -> ts.ForecastSplits:
    return ts.make_splits("ETTh1", SEQ_LEN, HORIZON, frame=etth1, season="daily")


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        ts.DLinear(7, SEQ_LEN, HORIZON, individual=True),
        ts.DFMambaTS(7, SEQ_LEN, HORIZON, d_model=8, d_state=2, depth=2, tokens="time", share_weights=True),
        ts.MSMamba(7, SEQ_LEN, HORIZON, d_model=8, d_ff=8, d_state=2, scales=(1.0, 3.0)),
    ]


def test_forecast_in_the_data_units_is_the_documented_recipe(etth1, splits):
    """scaler.transform − season → model → + season → scaler.inverse, for raw rows anywhere in the file."""
    model = _models()[1]
    forecaster = ts.Forecaster.from_splits(model, splits)
    starts = np.array([0, 9000, len(etth1) - SEQ_LEN - HORIZON])
    lookbacks = np.stack([splits.values[s : s + SEQ_LEN] for s in starts])
    future = starts[:, None] + SEQ_LEN + np.arange(HORIZON)
    standardised = ts.predict(model, lookbacks).numpy() + splits.season.at(future)
    want = splits.scaler.inverse(standardised.reshape(-1, 7)).reshape(standardised.shape)
    raw = np.stack([etth1.to_numpy()[s : s + SEQ_LEN] for s in starts])
    got = forecaster.forecast(raw, first_row=starts)
    assert got.shape == (3, HORIZON, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # one lookback, as a frame with its columns in another order: the same forecast
    frame = etth1.iloc[9000 : 9000 + SEQ_LEN, ::-1]
    np.testing.assert_allclose(forecaster.forecast(frame, first_row=9000), got[1], rtol=1e-6, atol=1e-5)
    # a list of frames, one of them with its columns in another order: each frame is read by name
    frames = [etth1.iloc[s : s + SEQ_LEN] for s in starts]
    frames[1] = frames[1].iloc[:, ::-1]
    np.testing.assert_allclose(forecaster.forecast(frames, first_row=starts), got, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"first_row must be one number or one per lookback \(3\), got shape \(2,\)"):
        forecaster.forecast(raw, first_row=starts[:2])
    # and the forecast is in the data's units: the oil temperature's scale, not a standardised one
    assert abs(got[..., -1].mean() - etth1["OT"].iloc[future.ravel()].mean()) < 3 * etth1["OT"].std()


def test_the_latest_lookback_forecasts_past_the_end_of_the_file(etth1, splits):
    forecaster = ts.Forecaster.from_splits(_models()[0], splits)
    n = len(etth1)
    got = forecaster.forecast(etth1.iloc[-SEQ_LEN:], first_row=n - SEQ_LEN)
    future = splits.season.at(np.arange(n, n + HORIZON))
    lookback = splits.values[None, -SEQ_LEN:]
    want = splits.scaler.inverse(ts.predict(forecaster.model, lookback)[0].numpy() + future)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_a_bfloat16_model_forecasts_in_float32_data_units(etth1, splits):
    model = _models()[0]
    forecaster = ts.Forecaster.from_splits(model, splits)
    half = ts.Forecaster.from_splits(_models()[0].to(torch.bfloat16), splits)
    got, want = (f.forecast(etth1.iloc[:SEQ_LEN], first_row=0) for f in (half, forecaster))
    assert got.dtype == np.float32
    error = np.abs(got - want) / etth1.to_numpy().std(0)  # in standard deviations of each variate
    assert error.max() < 0.05, error.max()


@pytest.mark.parametrize("index", [0, 1, 2], ids=["DLinear", "DFMambaTS", "MSMamba"])
def test_a_saved_forecaster_is_read_back_exactly(etth1, splits, index, tmp_path):
    model = _models()[index]
    folder = ts.save_forecaster(model, tmp_path / "run", splits=splits)
    again = ts.load_forecaster(folder)
    assert type(again.model) is type(model) and not again.model.training
    assert again.model.config == model.config  # JSON-ready as built: the config read back equals the model's
    assert again.columns == list(etth1.columns) and again.name == "ETTh1"
    np.testing.assert_array_equal(again.scaler.mean, splits.scaler.mean)
    np.testing.assert_array_equal(again.scaler.std, splits.scaler.std)
    assert again.season.period == splits.season.period == 24
    np.testing.assert_array_equal(again.season.profile, splits.season.profile)
    np.testing.assert_array_equal(again.season.phase, splits.season.phase)
    raw, start = etth1.to_numpy()[12000 : 12000 + SEQ_LEN], 12000
    want = ts.Forecaster.from_splits(model.eval(), splits).forecast(raw, first_row=start)
    np.testing.assert_array_equal(again.forecast(raw, first_row=start), want)
    # a Forecaster is saved as it is (here the one just read), and reads back the same
    twice = ts.load_forecaster(ts.save_forecaster(again, tmp_path / "again"))
    np.testing.assert_array_equal(twice.forecast(raw, first_row=start), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["DLinear", "DFMambaTS", "MSMamba"])
def test_a_forecaster_is_read_back_in_the_precision_it_was_saved_in(etth1, splits, index, dtype, tmp_path):
    model = _models()[index].to(dtype).eval()
    again = ts.load_forecaster(ts.save_forecaster(model, tmp_path, splits=splits))
    assert {p.dtype for p in again.model.parameters()} == {dtype}
    raw = etth1.to_numpy()[12000 : 12000 + SEQ_LEN]
    want = ts.Forecaster.from_splits(model, splits).forecast(raw, first_row=12000)
    np.testing.assert_array_equal(again.forecast(raw, first_row=12000), want)
    if index == 2:  # ms-Mamba's one rate projection for every scale is still one, in the saved precision
        for layer in again.model.layers:
            first, second = layer.mamba.blocks[0].dt_proj, layer.mamba.blocks[1].dt_proj
            assert first is second and first.weight.dtype == dtype


def test_a_lookback_with_missing_values_is_refused_not_forecast_as_nan(etth1, splits):
    forecaster = ts.Forecaster.from_splits(_models()[0], splits)
    raw = etth1.to_numpy()[:SEQ_LEN].copy()
    raw[5, 2] = np.nan
    with pytest.raises(ValueError, match="history holds missing or infinite values"):
        forecaster.forecast(raw, first_row=0)


def test_a_model_saved_alone_forecasts_the_values_it_is_given(splits, tmp_path):
    model = _models()[0]
    again = ts.load_forecaster(ts.save_forecaster(model, tmp_path))
    assert again.scaler is None and again.season is None and again.columns is None
    lookback = splits.values[:SEQ_LEN]
    np.testing.assert_array_equal(again.forecast(lookback), ts.predict(model, lookback[None])[0].numpy())


def test_forecaster_errors_say_what_to_pass(etth1, splits, tmp_path):
    forecaster = ts.Forecaster.from_splits(_models()[0], splits)
    with pytest.raises(ValueError, match="pass first_row="):
        forecaster.forecast(etth1.iloc[:SEQ_LEN])
    for first_row in (-1, 1.5):
        with pytest.raises(ValueError, match="first_row must be whole numbers >= 0"):
            forecaster.forecast(etth1.iloc[:SEQ_LEN], first_row=first_row)
    with pytest.raises(ValueError, match=r"shape \(96, 7\) or \(n, 96, 7\), got \(95, 7\)"):
        forecaster.forecast(etth1.to_numpy()[:95], first_row=0)
    with pytest.raises(ValueError, match=r"no column \['OT'\]"):
        forecaster.forecast(etth1.iloc[:SEQ_LEN].drop(columns="OT"), first_row=0)
    with pytest.raises(TypeError, match="saves the package's forecasters"):
        ts.save_forecaster(torch.nn.Linear(2, 2), tmp_path / "linear")
    with pytest.raises(ValueError, match="not both"):
        ts.save_forecaster(forecaster, tmp_path / "both", splits=splits)
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "file").write_text("")
        ts.save_forecaster(forecaster, tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or config\.json"):
        ts.load_forecaster(tmp_path / "nothing")
    classifier = pathology.save_classifier(pathology.DFMambaClassifier(4, d_model=8, depth=1), tmp_path / "path")
    with pytest.raises(ValueError, match=r"holds a folder of kind 'dfmamba_st.classifier', not one written by dfm.ts"):
        ts.load_forecaster(classifier)
    with pytest.raises(ValueError, match=r"holds a folder of kind 'dfmamba_st.forecaster', not one written by dfm.pa"):
        pathology.load_classifier(ts.save_forecaster(forecaster, tmp_path / "forecaster"))
    config = tmp_path / "forecaster" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "forecaster": "Prophet"}))
    with pytest.raises(ValueError, match=r"holds no forecaster written by dfm\.ts\.save_forecaster .*names 'Prophet'"):
        ts.load_forecaster(tmp_path / "forecaster")


def test_numpy_sizes_and_tuples_given_to_a_forecaster_are_saved_as_plain_values(splits, tmp_path):
    models = [
        ts.MSMamba(7, SEQ_LEN, HORIZON, d_model=8, d_ff=8, d_state=2, scales=np.array([1.0, 2.0])),
        ts.DFMambaTS(7, SEQ_LEN, HORIZON, d_model=8, d_state=2, depth=2, hidden=np.int64(4), lambdas=(0.5, 0.5, 0.2)),
    ]
    for i, model in enumerate(models):
        again = ts.load_forecaster(ts.save_forecaster(model, tmp_path / str(i), splits=splits))  # numpy: not JSON
        assert again.model.config == model.config
        x = splits.values[None, :SEQ_LEN]
        np.testing.assert_array_equal(ts.predict(again.model, x), ts.predict(model.eval(), x))


def _folders(splits, tmp_path) -> list[tuple]:
    """A saved forecaster and a saved classifier, each with its reader and a forward pass to compare."""
    forecaster = ts.Forecaster.from_splits(_models()[1], splits)
    classifier = pathology.DFMambaClassifier(4, d_model=8, depth=1, d_state=2).eval()
    image, lookback = torch.rand(1, 3, 32, 32), splits.values[:SEQ_LEN]
    return [
        (
            ts.save_forecaster(forecaster, tmp_path / "f"),
            ts.load_forecaster,
            lambda m: m.forecast(lookback, first_row=0),
        ),
        (pathology.save_classifier(classifier, tmp_path / "c"), pathology.load_classifier, lambda m: m(image).detach()),
    ]


def test_a_saved_folder_records_its_layout_and_a_newer_layout_is_refused(splits, tmp_path):
    for folder, load, run in _folders(splits, tmp_path):
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        assert saved["format_version"] == FOLDER_FORMAT and saved["dfmamba_st_version"] == dfmamba_st.__version__
        expected = run(load(folder))
        for version, error in ((FOLDER_FORMAT + 1, "Upgrade dfmamba_st"), (1.5, "1.5 is not a format number")):
            path.write_text(json.dumps({**saved, "format_version": version}))
            with pytest.raises(ValueError, match=error):
                load(folder)
        path.write_text(json.dumps([saved]))
        with pytest.raises(ValueError, match="holds no settings written by"):
            load(folder)
        # a folder written before the layout was recorded reads as before, and by its own reader only
        old = {k: v for k, v in saved.items() if not k.startswith(("format", "dfmamba_st"))}
        if "forecaster" in old:
            path.write_text(json.dumps(old))
            with pytest.raises(ValueError, match=r"holds a forecaster .* read it with dfm\.ts\.load_forecaster"):
                pathology.load_classifier(folder)
        path.write_text(json.dumps(old))
        np.testing.assert_array_equal(run(load(folder)), expected)


def test_entries_named_like_the_folder_s_own_are_refused_before_anything_is_written(tmp_path):
    model = pathology.DFMambaClassifier(4, d_model=8, depth=1)
    with pytest.raises(ValueError, match=r"format_version in config\.json is the folder's own entry; give another"):
        pathology.save_classifier(model, tmp_path / "c", {"format_version": 2})
    with pytest.raises(ValueError, match=r"format, format_version in config\.json are the folder's own entries; give"):
        pathology.save_classifier(model, tmp_path / "c", {"format_version": 2, "format": "x"})
    with pytest.raises(ValueError, match="extra= cannot hold 'config'"):
        pathology.save_classifier(model, tmp_path / "c", {"config": {}})  # it replaced the model's settings
    assert not (tmp_path / "c").exists()
