"""Edge cases of dfmamba_st.ts: the caller's global state, file names and split protocols, headerless files, the
checks of a frame given to ``make_splits`` and clear errors for invalid arguments (audit32_c, findings 2-5 and 11).
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pandas as pd
import pytest
import torch
from _shared import shared_path

from dfmamba_st import ts

#: the standard (Informer) split ends of ETTh1 / ETTh2
ETTH_ENDS = [8640, 11520, 14400]


@pytest.fixture(scope="module")
def toy() -> ts.ForecastSplits:
    t = np.arange(2000, dtype=np.float32)
    return ts.make_splits("toy", 32, 8, frame=pd.DataFrame({"a": np.sin(t / 10), "b": np.cos(t / 7)}))


@pytest.fixture(scope="module")
def etth1() -> pd.DataFrame:
    return ts.load("ETTh1", path=shared_path("ts", "ETTh1.csv.gz"))


def _global_state() -> tuple:
    return (
        random.getstate(),
        np.random.get_state()[1].copy(),  # noqa: NPY002 - the caller's global NumPy state is what is checked
        torch.random.get_rng_state(),
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


# ------------------------------------------------------------------------------------------------ global state


@pytest.mark.parametrize("seed", [42, None])
def test_train_forecaster_leaves_the_callers_global_state(toy, seed, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        random.seed(1)
        np.random.seed(1)  # noqa: NPY002
        torch.manual_seed(1)
        model = ts.DLinear(2, 32, 8)
        before = _global_state()
        result = ts.train_forecaster(model, toy, epochs=1, max_train_windows=64, seed=seed)
        after = _global_state()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    assert len(result.history) == 1
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    assert torch.equal(after[2], before[2])
    assert after[3:] == before[3:] == (False, None)


def test_train_forecaster_without_seed_follows_the_torch_state(toy):
    def run(caller_seed: int) -> list[dict]:
        torch.manual_seed(0)
        model = ts.DLinear(2, 32, 8)  # the same weights every time: only the shuffles can differ (no dropout)
        torch.manual_seed(caller_seed)
        return ts.train_forecaster(model, toy, epochs=1, max_train_windows=64, seed=None).history

    assert run(3) == run(3)  # the caller's seed makes an unseeded run reproducible
    assert run(3) != run(4)  # and it is the caller's seed that decides


# ------------------------------------------------------------------------------------------------ names and files


def test_make_splits_takes_the_protocol_from_the_file_name(etth1):
    file = shared_path("ts", "ETTh1.csv.gz")
    for splits in (ts.make_splits(str(file)), ts.make_splits(file), ts.make_splits("ETTh1", path=file)):
        assert splits.name == "ETTh1"
        assert splits.ends == ETTH_ENDS
        assert (len(splits.train), len(splits.val), len(splits.test)) == (8449, 2785, 2785)
    assert ts.split_borders(str(file), 17420, 96)[1] == ETTH_ENDS
    from_frame = ts.make_splits(str(file), frame=etth1)  # a frame named by the file's path: the file's protocol
    assert from_frame.name == "ETTh1" and from_frame.ends == ETTH_ENDS
    pd.testing.assert_frame_equal(ts.load(str(file)), etth1)


def test_a_file_named_after_another_data_set_is_refused():
    file = shared_path("ts", "ETTh1.csv.gz")
    with pytest.raises(ValueError, match=r"name='weather' does not match .*pass name='ETTh1'"):
        ts.make_splits("weather", path=file)
    with pytest.raises(ValueError, match="does not match"):
        ts.load("ETTh2", path=file)
    with pytest.raises(ValueError, match="give the file once"):
        ts.make_splits(str(file), path=file.parent)


def test_load_reads_a_headerless_file():
    file = shared_path("ts", "exchange_rate_lstnet.txt.gz")
    df = ts.load("exchange_rate_lstnet.txt", path=file)
    assert df.shape == (7588, 8)
    assert list(df.columns) == list(range(8))
    assert df.iloc[0, 0] == np.float32(0.7855)
    pd.testing.assert_frame_equal(ts.load("exchange_rate_lstnet", path=file.parent), df)  # found as .txt.gz
    splits = ts.make_splits(str(file), 96, 96)
    assert splits.name == "exchange_rate_lstnet"
    assert splits.ends == [int(7588 * 0.7), 7588 - int(7588 * 0.2), 7588]  # any other file: 70 / 10 / 20
    assert splits.columns == [str(c) for c in range(8)]


def test_a_file_name_in_the_working_folder_is_read_as_a_path(etth1, tmp_path, monkeypatch):
    (tmp_path / "ETTh1.csv.gz").write_bytes(shared_path("ts", "ETTh1.csv.gz").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DFMAMBA_TS_DATA", str(tmp_path / "elsewhere"))  # not the default folder's file
    for name in ("ETTh1.csv.gz", "./ETTh1.csv.gz"):
        pd.testing.assert_frame_equal(ts.load(name), etth1)
        assert ts.make_splits(name).ends == ETTH_ENDS
    (tmp_path / "ETTh1").write_bytes(b"not the data")
    with pytest.raises(FileNotFoundError, match="elsewhere"):  # a bare name still means the data folder
        ts.load("ETTh1")  # (even with a file of exactly that name in the working folder)
    (tmp_path / "sub").mkdir()
    (tmp_path / "ETTh1.csv.gz").rename(tmp_path / "sub" / "ETTh1.csv.gz")
    etth1.iloc[:100].to_csv(tmp_path / "sub" / "ETTh1.csv")
    pd.testing.assert_frame_equal(ts.load("sub/ETTh1"), etth1)  # a folder and a stem; .csv.gz found before .csv
    # with a folder given, a file of that name in the working folder is no path: the folder's file is read
    pd.testing.assert_frame_equal(ts.load("ETTh1.csv.gz", path=shared_path("ts", "ETTh1.csv.gz").parent), etth1)


def test_a_file_with_a_latin_1_header_is_read(tmp_path, etth1):
    """A header of latin-1 text, not UTF-8 (units such as W/m² and µmol), is read with its own characters."""
    frame = etth1.iloc[:5, :2].set_axis(["SWDR (W/m²)", "PAR (µmol/m²/s)"], axis=1)
    frame.to_csv(tmp_path / "weather.csv", encoding="latin-1")
    df = ts.load("weather", path=tmp_path)
    assert list(df.columns) == list(frame.columns)
    np.testing.assert_array_equal(df.to_numpy(), frame.to_numpy())


def test_a_header_row_with_text_is_still_a_header(tmp_path):
    pd.DataFrame({"x1": [1.0, 2.0], "2": [3.0, 4.0]}).to_csv(tmp_path / "mixed.csv", index=False)
    df = ts.load("mixed", path=tmp_path)
    assert list(df.columns) == ["x1", "2"] and len(df) == 2
    (tmp_path / "numbers.csv").write_text("1,2\n3,4\n")
    assert ts.load("numbers", path=tmp_path).to_numpy().tolist() == [[1, 2], [3, 4]]


# ------------------------------------------------------------------------------------------------ frames


def test_make_splits_moves_a_date_column_to_the_index(etth1):
    raw = pd.read_csv(shared_path("ts", "ETTh1.csv.gz"))
    from_frame = ts.make_splits("ETTh1", frame=raw, season="daily")
    from_file = ts.make_splits("ETTh1", frame=etth1, season="daily")
    assert from_frame.ends == ETTH_ENDS
    np.testing.assert_allclose(from_frame.values, from_file.values, atol=1e-5)
    np.testing.assert_array_equal(from_frame.season.phase, from_file.season.phase)
    assert "date" in raw.columns  # the caller's frame is left as it was


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_make_splits_refuses_missing_or_infinite_values(etth1, bad):
    frame = etth1.copy()
    frame.iloc[5, 0] = bad
    with pytest.raises(ValueError, match=re.escape("columns ['HUFL']")):
        ts.make_splits("ETTh1", frame=frame)


def test_a_time_column_not_named_date_is_refused_not_taken_for_a_variate(etth1):
    frame = etth1.reset_index().rename(columns={"date": "timestamp"})  # datetime64, not a variate
    with pytest.raises(ValueError, match=r"date/time columns \['timestamp'\], which are not variates"):
        ts.make_splits("ETTh1", 96, 96, frame=frame)
    ts.make_splits("ETTh1", 96, 96, frame=frame.set_index("timestamp"))  # as the index: fine


@pytest.mark.filterwarnings("ignore:Could not infer format")  # pandas, on the text that is no date
def test_dates_read_as_text_into_the_index_are_parsed_like_a_date_column(etth1):
    """pd.read_csv(..., index_col="date") leaves the dates as text: time order checked, the season follows them."""
    text = pd.read_csv(shared_path("ts", "ETTh1.csv.gz"), index_col="date")
    assert text.index.inferred_type == "string"
    with pytest.raises(ValueError, match="ascending time order"):
        ts.make_splits("ETTh1", frame=text.iloc[::-1])
    # two rows dropped: the daily phase must follow the clock, not the row number
    gappy = text.drop(text.index[[100, 101]])
    got = ts.make_splits("ETTh1", frame=gappy, season="daily")
    want = ts.make_splits("ETTh1", frame=etth1.drop(etth1.index[[100, 101]]), season="daily")
    np.testing.assert_array_equal(got.season.phase, want.season.phase)
    assert got.season.phase[100] == (got.season.phase[99] + 3) % 24
    with pytest.raises(ValueError, match="its index holds text that does not parse as timestamps"):
        ts.make_splits("ETTh1", frame=text.set_axis([f"row {i}" for i in range(len(text))], axis=0))


def test_make_splits_refuses_a_frame_of_dates_alone(etth1):
    with pytest.raises(ValueError, match="The frame has no value columns"):
        ts.make_splits("toy", 8, 4, frame=pd.DataFrame({"date": etth1.index}))


def test_make_splits_refuses_a_frame_out_of_time_order(etth1):
    with pytest.raises(ValueError, match="ascending time order"):
        ts.make_splits("ETTh1", frame=etth1.iloc[::-1], season="daily")


def test_frame_and_file_get_the_same_checks(tmp_path):
    frame = pd.DataFrame({"date": ["2020-01-01 01:00", "2020-01-01 00:00"], "a": [1.0, 2.0]})
    frame.to_csv(tmp_path / "late.csv", index=False)
    for call in (lambda: ts.load("late", path=tmp_path), lambda: ts.make_splits("late", frame=frame)):
        with pytest.raises(ValueError, match="ascending time order"):
            call()
    frame = pd.DataFrame({"date": ["2020-01-01", "someday"], "a": [1.0, 2.0]})
    frame.to_csv(tmp_path / "odd.csv", index=False)
    for call in (lambda: ts.load("odd", path=tmp_path), lambda: ts.make_splits("odd", frame=frame)):
        with pytest.raises(ValueError, match="'date' column does not parse"):
            call()


def test_make_splits_refuses_a_fractional_season(toy):
    frame = pd.DataFrame({"a": toy.values[:, 0]})
    with pytest.raises(ValueError, match="whole number"):
        ts.make_splits("toy", 32, 8, frame=frame, season=24.7)
    assert ts.make_splits("toy", 32, 8, frame=frame, season=24.0).season.period == 24


# ------------------------------------------------------------------------------------------------ clear errors


def _tiny_ms(**kw) -> ts.MSMamba:
    return ts.MSMamba(2, 32, 8, d_model=8, d_ff=8, d_state=2, **kw)


def test_dlinear_trend_is_the_moving_average_of_the_series_padded_with_its_end_values():
    x = torch.arange(8.0).reshape(1, 8, 1)
    trend = ts.DLinear(1, 8, 2, kernel_size=5).decomp(x)[0, :, 0]
    # padded 0 0 | 0 1 ... 7 | 7 7: the first mean (0 + 0 + 0 + 1 + 2) / 5, the last (5 + 6 + 7 + 7 + 7) / 5
    torch.testing.assert_close(trend, torch.tensor([0.6, 1.2, 2.0, 3.0, 4.0, 5.0, 5.8, 6.4]))


def test_revin_cannot_denormalize_before_it_has_normalized():
    with pytest.raises(RuntimeError, match="denormalize called before normalize"):
        ts.RevIN(2).denormalize(torch.zeros(1, 4, 2))


def test_forecasters_refuse_a_lookback_with_another_number_of_variates():
    """DLinear's shared maps and ms-Mamba's variate tokens would run on any number of variates."""
    for model in (ts.DLinear(2, 32, 8), _tiny_ms(), ts.DFMambaTS(2, 32, 8, d_model=8, d_state=2)):
        with pytest.raises(ValueError, match=r"Expected a lookback of shape \(batch, 32, 2\), got \(1, 32, 3\)"):
            model(torch.zeros(1, 32, 3))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ts.DLinear(7, 96, 24, kernel_size=24), "kernel_size must be odd"),
        (lambda: ts.DFMambaTS(7, patch_len=0), "patch_len must be a whole number >= 1, got 0"),
        (lambda: ts.DFMambaTS(7, patch_len=5), "patch_len=5 must be >= 1 and divide seq_len=96"),
        (lambda: ts.DLinear(7, kernel_size=24.5), "kernel_size must be a whole number >= 1, got 24.5"),
        (lambda: _tiny_ms(scales=()), "scales must be one or more"),
        (lambda: _tiny_ms(scales=(1.0, 0.0)), "scales must be one or more positive"),
        (lambda: ts.DFMambaTS(7, tokens="pixel"), r"tokens='pixel' is not one of \('time', 'patch', 'mixed'\)"),
    ],
)
def test_models_refuse_invalid_sizes_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, s: ts.zero_shot(m, s, factors=(2.5,)), "factor must be a whole number"),
        (lambda m, s: ts.zero_shot(m, s, stride=0), "stride must be a whole number"),
        (lambda m, s: ts.zero_shot(m, s, batch_size=0), "batch_size must be a whole number"),
        (lambda m, s: ts.coarsened_windows(s, 1, 32, 8, split="train"), "split='train' is not one of"),
        (lambda m, s: ts.evaluate(m, s.test, batch_size=0), "batch_size must be a whole number"),
        (lambda m, s: ts.train_forecaster(m, s, batch_size=0), "batch_size must be a whole number"),
        (lambda m, s: ts.train_forecaster(m, s, max_val_windows=0), r"max_val_windows \(None: every validation"),
        (lambda m, s: ts.train_forecaster(m, s, max_train_windows=-5), r"max_train_windows .* >= 1, got -5"),
        (lambda m, s: ts.predict(m, torch.zeros(4, 32, 2), batch_size=0), "batch_size must be a whole number"),
        (lambda m, s: ts.train_forecaster(ts.DLinear(2, 32, 4), s), "model's horizon is 4 .* horizon 8"),
        (lambda m, s: ts.train_forecaster(ts.DLinear(2, 16, 8), s), "model's seq_len is 16 .* seq_len 32"),
        (lambda m, s: ts.evaluate(ts.DLinear(2, 32, 4), s.test), r"forecasts shape \(256, 4, 2\)"),
    ],
)
def test_invalid_arguments_get_a_clear_error(toy, call, match):
    with pytest.raises(ValueError, match=match):
        call(ts.DLinear(2, 32, 8), toy)


def test_forecast_loss_refuses_a_forecast_of_another_shape():
    with pytest.raises(ValueError, match="does not match the data"):
        ts.forecast_loss(ts.DLinear(2, 8, 4), (torch.zeros(3, 8, 2), torch.zeros(3, 6, 2)))


def test_zero_shot_refuses_a_factor_it_cannot_serve_before_any_forecast(toy):
    model, calls = ts.DLinear(2, 32, 8), []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="factor 3 to divide the horizon 8"):
        ts.zero_shot(model, toy, factors=(1, 2, 3))
    with pytest.raises(ValueError, match=r"The test split is too short for factor 64 \(span 512\)"):  # 400 rows
        ts.zero_shot(model, toy, factors=(1, 64), mode="steps")
    assert calls == []  # factors 1 and 2 were not scored first and then lost
    assert sorted(ts.zero_shot(model, toy, factors=(1, 2))) == [1, 2] and calls


def test_evaluate_refuses_max_windows_with_batches_it_cannot_subset(toy):
    model, test = ts.DLinear(2, 32, 8), toy.test
    batches = list(test.batches(64))
    with pytest.raises(ValueError, match=r"max_windows=5 takes a subset of a WindowDataset's windows; data is a list"):
        ts.evaluate(model, batches, max_windows=5)
    assert ts.evaluate(model, test, max_windows=5)["n_windows"] == 5
    assert ts.evaluate(model, batches)["n_windows"] == len(test)


def test_whole_float_kernel_and_patch_lengths_build_the_same_models(toy):
    x = torch.from_numpy(np.stack([toy.values[i : i + 32] for i in range(3)]))
    for build, size in (
        (lambda k: ts.DLinear(2, 32, 8, kernel_size=k), 25),
        (lambda k: ts.DFMambaTS(2, 32, 8, d_model=8, d_state=2, depth=1, patch_len=k), 8),
    ):
        torch.manual_seed(0)
        want = ts.predict(build(size), x)
        torch.manual_seed(0)
        np.testing.assert_array_equal(ts.predict(build(float(size)), x), want)


def test_zero_shot_takes_whole_float_factors(toy):
    model = ts.DLinear(2, 32, 8)
    got, want = ts.zero_shot(model, toy, factors=(2.0,)), ts.zero_shot(model, toy, factors=(2,))
    assert list(got) == [2]
    assert got[2]["mse"] == want[2]["mse"] and got[2]["n_windows"] == want[2]["n_windows"]


def test_predict_takes_arrays_and_float64_in_the_models_precision(toy):
    lookbacks = np.stack([toy.values[i : i + 32] for i in range(5)]).astype(np.float64)  # as numpy / pandas give
    for model in (ts.DLinear(2, 32, 8), ts.DFMambaTS(2, 32, 8, d_model=8, d_state=2, depth=1)):
        want = ts.predict(model, torch.from_numpy(lookbacks.astype(np.float32)))
        for given in (lookbacks, torch.from_numpy(lookbacks)):
            got = ts.predict(model, given)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)


def test_the_season_continues_past_the_end_of_the_series(etth1):
    splits = ts.make_splits("ETTh1", 96, 24, frame=etth1, season="daily")
    n, period = len(splits.values), splits.season.period
    future = np.arange(n, n + 3 * period)  # the next three days, which the file does not hold
    np.testing.assert_array_equal(splits.season.at(future), splits.season.at(future - 7 * period))  # a week before
    assert splits.season.at(future).shape == (3 * period, splits.values.shape[1])


def test_season_daily_refuses_repeated_timestamps_clearly():
    index = pd.DatetimeIndex(["2020-01-01"] * 1000)
    frame = pd.DataFrame({"a": np.arange(1000.0)}, index=index)
    with pytest.raises(ValueError, match=r"most common spacing is 0 days.*drop repeated rows"):
        ts.make_splits("toy", 8, 4, frame=frame, season="daily")


@pytest.mark.parametrize("model", [ts.DLinear, ts.MSMamba, ts.DFMambaTS])
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((0, 16, 4), "n_variates must be a whole number >= 1, got 0"),
        ((2, 0, 4), "seq_len must be a whole number >= 1, got 0"),
        ((2, 16, 0), "horizon must be a whole number >= 1, got 0"),
        ((2, 4.5, 4), "got 4.5"),
    ],
)
def test_forecasters_refuse_sizes_that_are_not_whole_numbers_at_construction(model, sizes, message):
    with pytest.raises(ValueError, match=message):
        model(*sizes)


def test_window_datasets_refuse_lengths_that_are_not_whole_numbers():
    values = np.zeros((40, 2), np.float32)
    for seq_len, horizon in ((4.5, 4), (0, 4), (8, -1)):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            ts.WindowDataset(values, seq_len, horizon)


class _WithoutHorizon(torch.nn.Module):
    """A forecaster that does not say its lookback or horizon (a DLinear inside)."""

    def __init__(self, n_variates: int = 3, seq_len: int = 16, horizon: int = 4) -> None:
        super().__init__()
        self.inner = ts.DLinear(n_variates, seq_len, horizon)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x)


def test_predict_on_no_lookback_gives_an_empty_forecast():
    # DF-Mamba-TS cannot run an empty batch itself; the model without a horizon is shown one empty batch
    for model in (ts.DLinear(3, 16, 4), ts.DFMambaTS(3, 16, 4, d_model=8, d_state=2), _WithoutHorizon()):
        for n in (0, 5):
            assert ts.predict(model, torch.zeros(n, 16, 3), batch_size=2).shape == (n, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        ts.predict(model, torch.zeros(16, 3))


def test_a_forecaster_that_does_not_say_its_window_lengths_trains(toy):
    assert len(ts.train_forecaster(_WithoutHorizon(2, 32, 8), toy, epochs=1, max_train_windows=64).history) == 1


def test_a_cap_above_the_number_of_training_windows_changes_nothing(toy):
    def weights(cap: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ts.DLinear(2, 32, 8)
        ts.train_forecaster(model, toy, epochs=1, max_train_windows=cap)
        return list(model.state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(weights(None), weights(10**6)))


def test_evaluate_scores_the_first_n_outputs_and_refuses_no_windows():
    model = ts.DLinear(2, 16, 4).eval()
    x = torch.randn(6, 16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forecast = model(x)[0]
    assert ts.evaluate(model, [(x, forecast[:, :2])], n_outputs=2)["mse"] == 0.0  # the first two steps
    assert ts.evaluate(model, [(x, forecast[:, 2:])], n_outputs=2)["mse"] > 0.0
    with pytest.raises(ValueError, match="No window to evaluate"):
        ts.evaluate(model, [])


def test_a_checkpoint_of_another_series_is_refused(toy, tmp_path):
    """Same model and settings, other data: the folder's state must not come back as this run's model."""
    options = dict(epochs=1, max_train_windows=64, max_val_windows=64, checkpoint_dir=tmp_path)
    ts.train_forecaster(ts.DLinear(2, 32, 8), toy, **options)
    ts.train_forecaster(ts.DLinear(2, 32, 8), toy, **options)  # the same run: resumed
    t = np.arange(2000, dtype=np.float32)
    other = ts.make_splits("other", 32, 8, frame=pd.DataFrame({"a": np.cos(t / 10), "b": np.sin(t / 7)}))
    with pytest.raises(ValueError, match=r"another run \(differs in run_key\.data\)"):
        ts.train_forecaster(ts.DLinear(2, 32, 8), other, **options)
    with pytest.raises(ValueError, match=r"differs in run_key\.train_loss"):
        ts.train_forecaster(ts.DLinear(2, 32, 8), toy, **options, train_loss="mse")
    # other windows or batches in as many steps per epoch (2), so that only the run key can tell
    for changed, name in (
        ({"max_train_windows": 63}, "windows"),
        ({"max_val_windows": 50}, "windows"),
        ({"batch_size": 33}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=rf"another run \(differs in run_key\.{name}\)"):
            ts.train_forecaster(ts.DLinear(2, 32, 8), toy, **{**options, **changed})


def test_make_splits_and_train_forecaster_name_what_to_change(etth1, toy):
    short = etth1.iloc[:600]  # as a data set of its own: 70/10/20 of 600 rows
    with pytest.raises(ValueError, match=r"The validation segment of mine .* fewer than seq_len \+ horizon = 192"):
        ts.make_splits("mine", 96, 96, frame=short)
    for bad, error in ((96.5, ValueError), ("96", TypeError)):
        with pytest.raises(error, match="seq_len must be a whole number >= 1"):
            ts.make_splits("mine", bad, 24, frame=short)
    with pytest.raises(TypeError, match=r"frame must be a pandas DataFrame .* got Series"):
        ts.make_splits("mine", 24, 24, frame=short["OT"])
    with pytest.raises(ValueError, match=r"epochs must be a whole number >= 1, got 1\.5"):
        ts.train_forecaster(ts.DLinear(2, 32, 8), toy, epochs=1.5)
    with pytest.raises(TypeError, match=r"no device option: .* model\.to\('cuda'\)"):
        ts.train_forecaster(ts.DLinear(2, 32, 8), toy, device="cuda")


def test_window_rows_are_checked_and_count_from_the_end_as_indexing_does():
    ds = ts.WindowDataset(np.zeros((20, 1), np.float32), seq_len=4, horizon=2, offset=100)
    assert ds.rows(-1) == ds.rows(len(ds) - 1) == (range(114, 118), range(118, 120))
    for i in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError, match="out of range"):
            ds.rows(i)


def test_window_datasets_take_a_segment_of_exactly_one_window_and_refuse_a_flat_one():
    ds = ts.WindowDataset(np.arange(12, dtype=np.float32)[:, None], seq_len=8, horizon=4)
    assert len(ds) == 1 and ds[0][1].ravel().tolist() == [8.0, 9.0, 10.0, 11.0]
    with pytest.raises(ValueError, match=r"values must be \(time, variates\), got shape \(20,\)"):
        ts.WindowDataset(np.zeros(20, np.float32), seq_len=4, horizon=2)


def test_shuffled_window_batches_follow_their_seed_not_the_global_state():
    ds = ts.WindowDataset(np.arange(40, dtype=np.float32)[:, None], seq_len=4, horizon=2)
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        orders.append([x[:, 0, 0].tolist() for x, _ in ds.batches(8, shuffle=True, seed=3)])
        assert torch.equal(torch.random.get_rng_state(), state)  # the global state is not used
    assert orders[0] == orders[1]


def test_split_borders_refuse_a_zero_fraction_and_a_lookback_longer_than_the_training_rows():
    with pytest.raises(ValueError, match="three positive fractions"):
        ts.split_borders("mine", 1000, 8, ratios=(0.8, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"seq_len=80 is longer than the training segment \(70 rows\)"):
        ts.split_borders("mine", 100, 80)


def test_a_season_needs_every_phase_in_the_training_rows():
    with pytest.raises(ValueError, match="do not cover every phase of the period 3"):
        ts.Season.fit(np.zeros((3, 1)), np.array([0, 1, 0, 1, 2]), period=3)  # training phases 0, 1, 0


def test_a_daily_season_takes_the_most_common_spacing_and_a_known_data_sets_interval(etth1):
    gap_first = etth1.drop(etth1.index[1])  # the first spacing is two hours, the most common one hour
    assert ts.make_splits("ETTh1", frame=gap_first, season="daily").season.period == 24
    without_times = etth1.reset_index(drop=True)  # no timestamps: ETTh1's known interval, one hour
    assert ts.make_splits("ETTh1", frame=without_times, season="daily").season.period == 24


def test_window_batches_check_their_sizes_at_the_call():
    ds = ts.WindowDataset(np.zeros((20, 1), np.float32), seq_len=4, horizon=2)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        ds.batches(0)  # not iterated: the call itself refuses it
    with pytest.raises(ValueError, match=r"max_windows \(None: every window\) must be a whole number"):
        ds.batches(4, max_windows=-1)


@pytest.mark.parametrize("training", [True, False])
def test_forecast_loss_refuses_an_unknown_loss_in_either_mode(training):
    model = ts.DLinear(2, 8, 4).train(training)
    with pytest.raises(ValueError, match="Unknown train_loss 'foo'"):
        ts.forecast_loss(model, (torch.zeros(3, 8, 2), torch.zeros(3, 4, 2)), train_loss="foo")
