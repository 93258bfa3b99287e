"""Loaders, standard splits and sliding windows for the long-horizon forecasting benchmarks.

The splits follow the Informer / Autoformer protocol used by every paper in the field:

* ``ETTh1``, ``ETTh2`` (hourly): train = months 1-12 (8640 rows), validation = months 13-16 (2880 rows),
  test = months 17-20 (2880 rows); the rows after month 20 are not used.
* ``ETTm1``, ``ETTm2`` (15 min): the same months, four times as many rows (34560 / 11520 / 11520).
* ``weather`` and any other file: 70 % train, 10 % validation, 20 % test, in time order.

The validation and test segments start ``seq_len`` rows before their boundary, so the first window of each
split forecasts the first row after the boundary from a lookback that lies (partly) in the previous split; no
*target* ever lies outside its split. Every split is standardised with the mean and standard deviation of the
training rows only.

``make_splits(..., season="daily")`` also removes a fixed daily profile (the mean of the standardised training rows
at each time of day, :class:`Season`) from the whole series before it is cut into windows. A model then forecasts
the residual; adding the profile back to forecast and target alike changes no error, so MSE and MAE stay on the
standard scale and comparable with runs without the profile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .._utils import is_whole_number, whole_number

__all__ = [
    "DATA_ENV",
    "KNOWN_DATASETS",
    "ForecastSplits",
    "Scaler",
    "Season",
    "WindowDataset",
    "default_data_dir",
    "load",
    "make_splits",
    "split_borders",
]

#: Environment variable naming a folder with the benchmark CSVs (checked before the cache folder).
DATA_ENV = "DFMAMBA_TS_DATA"

#: The benchmark files this module knows (file stem → sampling interval in minutes).
KNOWN_DATASETS: dict[str, int] = {"ETTh1": 60, "ETTh2": 60, "ETTm1": 15, "ETTm2": 15, "weather": 10}

_HOURS_PER_MONTH = 30 * 24
#: file suffixes :func:`load` reads (each also gzipped), in the order it looks for them
_SUFFIXES = (".csv", ".txt")


def default_data_dir() -> Path:
    """Folder searched by :func:`~dfmamba_st.ts.load` when no ``path`` is given.

    ``$DFMAMBA_TS_DATA`` if that variable is set, else ``~/.cache/dfmamba_st/ts``.

    Examples
    --------
    >>> import os
    >>> from pathlib import Path
    >>> from dfmamba_st.ts import default_data_dir
    >>> default_data_dir() == Path(os.environ.get("DFMAMBA_TS_DATA", "~/.cache/dfmamba_st/ts")).expanduser()
    True
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dfmamba_st" / "ts"


def _dataset_stem(name: str | os.PathLike) -> str:
    """The data set's name in a file name or path: ``"/data/ETTh1.csv.gz"`` → ``"ETTh1"``."""
    stem = Path(name).name.removesuffix(".gz")
    return next((stem.removesuffix(suffix) for suffix in _SUFFIXES if stem.endswith(suffix)), stem)


def _find_file(name: str | os.PathLike, path: str | os.PathLike | None) -> Path:
    """The file of data set ``name``: ``path`` when it is a file, else ``{stem}.csv.gz`` & co. in a folder.

    ``name`` may itself be a path (a file, or a folder and stem); ``path`` must then be ``None``. A file whose name
    does not match ``name`` is refused: :func:`split_borders` picks the split protocol from the name.
    """
    stem = _dataset_stem(name)
    name_path = Path(name).expanduser()
    # a path: absolute, with a folder, or (no path given) a file's name in the working folder ("ETTh1.csv.gz", not
    # "ETTh1")
    in_working_folder = path is None and name_path.is_file() and name_path.name != stem
    if name_path.is_absolute() or len(name_path.parts) > 1 or in_working_folder:
        if path is not None:
            raise ValueError(
                f"name={str(name)!r} is a path and path={str(path)!r} is given too; give the file once, e.g. "
                f"name={stem!r}, path={str(name)!r}."
            )
        path = name_path if name_path.is_file() else name_path.parent
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            found = _dataset_stem(path)
            if found != stem:
                raise ValueError(
                    f"name={str(name)!r} does not match the file {path} (data set {found!r}); the split protocol "
                    f"is chosen by the name, so pass name={found!r} or rename the file. To split its rows as "
                    f"{stem!r}, pass frame=load({found!r}, path=...) to make_splits."
                )
            return path
        folder = path
    else:
        folder = default_data_dir()
    candidates = [folder / f"{stem}{suffix}{gz}" for suffix in _SUFFIXES for gz in (".gz", "")]
    for cand in candidates:
        if cand.is_file():
            return cand
    hint = (
        f"Put {stem}.csv or {stem}.csv.gz (the ETDataset / Autoformer release) in {folder}"
        if path is not None
        else f"Put {stem}.csv or {stem}.csv.gz (the ETDataset / Autoformer release) in {folder}, "
        f"set ${DATA_ENV} to the folder that holds it, or pass path=..."
    )
    raise FileNotFoundError(f"No data file for {name!r}: looked for {', '.join(map(str, candidates))}. {hint}.")


def _read_table(file: Path) -> pd.DataFrame:
    """Read a CSV file; a first row of numbers only is data, not a header (the columns are then ``0 … n-1``)."""

    def read(**kwargs) -> pd.DataFrame:
        try:
            return pd.read_csv(file, **kwargs)
        except UnicodeDecodeError:  # the weather header carries latin-1 units (W/m², µmol)
            return pd.read_csv(file, encoding="latin-1", **kwargs)

    first = read(header=None, nrows=1, dtype=str).iloc[0]
    headerless = bool(pd.to_numeric(first, errors="coerce").notna().all())
    return read(header=None) if headerless else read()


def _validated(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """``df`` checked for forecasting: a ``date`` column moved to the index, numeric finite values, time ascending.

    An index of text (dates read without parsing) is parsed to timestamps, so that the time order is checked and a
    daily season follows the clock, as for a ``date`` column.

    Shared by :func:`load` and :func:`make_splits` (``frame=``); ``source`` names the data in the messages. The
    values keep their dtype; ``df`` itself is not changed.
    """
    if "date" in df.columns:
        try:
            dates = pd.to_datetime(df["date"])
        except (ValueError, TypeError) as err:
            reason = str(err).splitlines()[0]
            raise ValueError(f"{source}: the 'date' column does not parse as timestamps ({reason}).") from err
        df = df.assign(date=dates).set_index("date")
    elif df.index.inferred_type == "string":  # dates as text, as pd.read_csv(..., index_col="date") gives them
        try:
            df = df.set_axis(pd.to_datetime(df.index), axis=0)
        except (ValueError, TypeError) as err:
            reason = str(err).splitlines()[0]
            raise ValueError(
                f"{source}: its index holds text that does not parse as timestamps ({reason}); index the rows by "
                "their times or by their number (frame.reset_index(drop=True))."
            ) from err
    if df.shape[1] == 0:
        raise ValueError(f"{source} has no value columns.")
    times = [
        c for c in df.columns if pd.api.types.is_datetime64_any_dtype(df[c]) or pd.api.types.is_timedelta64_dtype(df[c])
    ]
    if times:  # to_numeric would turn them into nanoseconds, a variate
        raise ValueError(
            f"{source} has date/time columns {times}, which are not variates: name the timestamps 'date' or make them "
            "the index (frame.set_index(...))."
        )
    values = df.apply(pd.to_numeric, errors="coerce")
    bad = values.columns[~np.isfinite(values.to_numpy(dtype=np.float64)).all(axis=0)].tolist()
    if bad:
        raise ValueError(
            f"{source} has missing, infinite or non-numeric values in columns {bad}; fix or fill them first "
            "(a date column must be named 'date' or be the index)."
        )
    if isinstance(values.index, pd.DatetimeIndex) and not values.index.is_monotonic_increasing:
        raise ValueError(f"{source} is not in ascending time order; sort it first (frame.sort_index()).")
    return values


def load(name: str | os.PathLike, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read one forecasting benchmark (``ETTh1``, ``ETTh2``, ``ETTm1``, ``ETTm2``, ``weather``) as a data frame.

    Parameters
    ----------
    name
        File stem, e.g. ``"ETTh2"``; ``.csv``/``.txt`` suffixes (gzipped or not) are accepted. It may also be the
        path of the file (then ``path`` must be ``None``): one with a folder (``"./ETTh2.csv.gz"``), or with
        ``path=None`` a file name with its suffix that exists in the working folder (``"ETTh2.csv.gz"``).
    path
        A CSV file, or a folder holding ``{name}.csv.gz``, ``{name}.csv``, ``{name}.txt.gz`` or ``{name}.txt``.
        ``None`` searches :func:`default_data_dir` (``$DFMAMBA_TS_DATA``, else ``~/.cache/dfmamba_st/ts``). A file
        must be named after ``name`` (the split protocol of :func:`make_splits` is chosen by the name).

    Returns
    -------
    A frame indexed by the ``date`` column (parsed to datetimes) with one float32 column per variate, in file order.
    A file without a header row (its first row holds numbers only, as ``exchange_rate_lstnet.txt.gz``) is read as
    data from its first row; its columns are then named ``0 … n-1`` (integers) and the index is the row number.

    Raises
    ------
    FileNotFoundError
        When the file is not there; the message says where to put it.
    ValueError
        When ``path`` is a file named after another data set than ``name``, or ``name`` is a path and ``path`` is
        given too; when the values are not numeric and finite, or the dates do not parse or are not in ascending
        order.

    Examples
    --------
    With ``ETTh2.csv`` in ``data/ts/`` (``tests/test_ts.py`` checks these figures on the real file):

    >>> import dfmamba_st as dfm
    >>> df = dfm.ts.load("ETTh2", path="data/ts")  # doctest: +SKIP
    >>> df.shape, list(df.columns)[-1]  # doctest: +SKIP
    ((17420, 7), 'OT')
    """
    return _load_file(_find_file(name, path))


def _load_file(file: Path) -> pd.DataFrame:
    """:func:`~dfmamba_st.ts.load`'s frame of ``file``."""
    return _validated(_read_table(file), str(file)).astype(np.float32)


def split_borders(
    name: str, n_rows: int, seq_len: int, *, ratios: tuple[float, float, float] | None = None
) -> tuple[list[int], list[int]]:
    """Row borders ``(starts, ends)`` of the train / validation / test segments (Informer protocol).

    Segment ``i`` is ``rows[starts[i]:ends[i]]``; validation and test start ``seq_len`` rows before their boundary.

    Parameters
    ----------
    name
        Data set name (or its file name or path: the stem counts); ``ETTh*`` and ``ETTm*`` use the 12/4/4-month
        split, anything else 70/10/20.
    n_rows
        Number of rows of the file.
    seq_len
        Lookback length.
    ratios
        Split **all** rows by these train / validation / test fractions instead (training ``int(n_rows * ratios[0])``
        rows, test ``int(n_rows * ratios[2])``, validation the rest). The DF-Mamba paper splits ETT this way,
        ``(0.6, 0.2, 0.2)``, which tests on a later period of the file than the 12/4/4-month protocol (whose test set
        ends at month 20); its figures are therefore not comparable with the standard protocol's.

    Examples
    --------
    >>> from dfmamba_st.ts import split_borders
    >>> split_borders("ETTh2", 17420, 96)
    ([0, 8544, 11424], [8640, 11520, 14400])
    >>> split_borders("weather", 52696, 96)
    ([0, 36791, 42061], [36887, 42157, 52696])
    >>> split_borders("ETTh2", 17420, 96, ratios=(0.6, 0.2, 0.2))
    ([0, 10356, 13840], [10452, 13936, 17420])
    """
    stem = _dataset_stem(name)
    if ratios is None and (stem.startswith("ETTh") or stem.startswith("ETTm")):
        per_month = _HOURS_PER_MONTH * (4 if stem.startswith("ETTm") else 1)
        train, val, test = 12 * per_month, 4 * per_month, 4 * per_month
        if n_rows < train + val + test:
            raise ValueError(
                f"{stem} needs at least {train + val + test} rows for the 12/4/4-month split, got {n_rows}."
            )
        ends = [train, train + val, train + val + test]
    else:
        ratios = (0.7, 0.1, 0.2) if ratios is None else ratios
        if len(ratios) != 3 or min(ratios) <= 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios must be three positive fractions summing to 1, got {ratios}.")
        n_train, n_test = int(n_rows * ratios[0]), int(n_rows * ratios[2])
        ends = [n_train, n_rows - n_test, n_rows]
    starts = [0, ends[0] - seq_len, ends[1] - seq_len]
    if starts[1] < 0:
        raise ValueError(f"seq_len={seq_len} is longer than the training segment ({ends[0]} rows).")
    return starts, ends


@dataclass
class Scaler:
    """Per-variate standardisation ``(x - mean) / std`` fitted on the training rows.

    Attributes
    ----------
    mean
        (variates,) float64 mean of every variate over the rows it was fitted on.
    std
        (variates,) float64 standard deviation (population, ``ddof=0``) of every variate; 1 for a constant variate.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.ts import Scaler
    >>> s = Scaler.fit(np.array([[0.0, 1.0], [2.0, 3.0]]))
    >>> s.transform(np.array([[1.0, 2.0]])).tolist()
    [[0.0, 0.0]]
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> Scaler:
        """Fit on ``rows`` (time, variates); a constant variate gets std 1.

        Parameters
        ----------
        rows
            (time, variates) values, any numeric type (computed in float64).

        Returns
        -------
        A :class:`Scaler` with the float64 mean and standard deviation (``ddof=0``) of every column.
        """
        rows = np.asarray(rows, dtype=np.float64)
        std = rows.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(mean=rows.mean(axis=0), std=std)

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """Standardise ``rows`` (time, variates).

        Parameters
        ----------
        rows
            (time, variates) values, or anything that broadcasts against ``mean`` (its last axis holds the
            variates); computed in float64.

        Returns
        -------
        ``(rows - mean) / std`` as float32, shaped like ``rows``.

        Examples
        --------
        >>> import numpy as np
        >>> from dfmamba_st.ts import Scaler
        >>> s = Scaler(mean=np.array([1.0, 10.0]), std=np.array([2.0, 5.0]))
        >>> z = s.transform([[3.0, 20.0], [1.0, 5.0]])
        >>> z.tolist(), z.dtype
        ([[1.0, 2.0], [0.0, -1.0]], dtype('float32'))
        """
        return ((np.asarray(rows, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, rows: np.ndarray) -> np.ndarray:
        """Undo :meth:`transform`.

        Parameters
        ----------
        rows
            Standardised (time, variates) values, or anything that broadcasts against ``std`` (its last axis holds
            the variates), e.g. forecasts (batch, horizon, variates); computed in float64.

        Returns
        -------
        ``rows * std + mean`` as float32, shaped like ``rows``.

        Examples
        --------
        >>> import numpy as np
        >>> from dfmamba_st.ts import Scaler
        >>> s = Scaler(mean=np.array([1.0, 10.0]), std=np.array([2.0, 5.0]))
        >>> s.inverse([[1.0, 2.0], [0.0, -1.0]]).tolist()
        [[3.0, 20.0], [1.0, 5.0]]
        """
        return (np.asarray(rows, dtype=np.float64) * self.std + self.mean).astype(np.float32)


@dataclass
class Season:
    """A fixed seasonal profile: the mean of the standardised training rows at each phase of a period.

    Attributes
    ----------
    period
        Length of the period in rows (one day: 24 for ETTh, 96 for ETTm, 144 for weather).
    profile
        (period, variates): the mean of the training rows of each phase.
    phase
        (rows,): the phase of every row of the file (from its timestamps when it has them, so a gap or a repeated
        row does not shift the later phases; from the row number otherwise).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.ts import Season
    >>> rows = np.array([[1.0], [3.0], [2.0], [5.0]])
    >>> s = Season.fit(rows, np.array([0, 1, 0, 1]), period=2)
    >>> s.profile.ravel().tolist(), s.at(np.array([2, 3])).ravel().tolist()
    ([1.5, 4.0], [1.5, 4.0])
    """

    period: int
    profile: np.ndarray
    phase: np.ndarray

    @classmethod
    def fit(cls, train_rows: np.ndarray, phase: np.ndarray, period: int) -> Season:
        """Profile of ``train_rows`` (time, variates): the first rows of the file, whose ``phase`` is given for all."""
        phase = np.asarray(phase, dtype=np.int64)
        train_phase = phase[: len(train_rows)]
        counts = np.bincount(train_phase, minlength=period)
        if (counts == 0).any():
            raise ValueError(f"The training rows do not cover every phase of the period {period}.")
        sums = np.zeros((period, train_rows.shape[1]))
        np.add.at(sums, train_phase, np.asarray(train_rows, dtype=np.float64))
        return cls(period=period, profile=(sums / counts[:, None]).astype(np.float32), phase=phase)

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The profile at file rows ``rows`` (any shape), shape ``rows.shape + (variates,)``.

        Rows past the end of the file (a forecast of the future) continue the last row's phase, one step per row.

        Examples
        --------
        >>> import numpy as np
        >>> s = Season(period=3, profile=np.arange(3.0)[:, None], phase=np.array([0, 1, 2, 0]))
        >>> s.at(np.arange(2, 7))[:, 0].tolist()  # rows 4, 5, 6 lie after the file's last row (phase 0)
        [2.0, 0.0, 1.0, 2.0, 0.0]
        """
        rows = np.asarray(rows)
        last = len(self.phase) - 1
        past = rows > last
        phase = self.phase[np.where(past, last, rows)]
        phase = np.where(past, (self.phase[last] + rows - last) % self.period, phase)
        return self.profile[phase]


def _sampling_step(index: pd.Index) -> pd.Timedelta | None:
    """The most common spacing of a timestamp index; ``None`` without timestamps."""
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 2:
        return None
    return index.to_series().diff().mode().iloc[0]


def _season_phase(index: pd.Index, step: pd.Timedelta | None, period: int) -> np.ndarray:
    """Phase of every row: ``step``s since the first timestamp modulo ``period`` (row numbers without timestamps)."""
    if step is None:
        return np.arange(len(index)) % period
    steps = np.round((index - index[0]) / step).astype(np.int64)
    return np.asarray(steps) % period


def _season_period(season: int | str, name: str, step: pd.Timedelta | None) -> int:
    """Rows per period: ``season``, or for ``"daily"`` one day of ``step`` (else of the known data set's interval)."""
    if season == "daily":
        if step is None and name in KNOWN_DATASETS:
            step = pd.Timedelta(minutes=KNOWN_DATASETS[name])
        if step is None:
            raise ValueError(f"season='daily' needs timestamps (a DatetimeIndex) or a known data set, not {name!r}.")
        if step <= pd.Timedelta(0):
            raise ValueError(
                f"The timestamps' most common spacing is {step}: sort them and drop repeated rows, or pass "
                "season=<rows>."
            )
        period = pd.Timedelta(days=1) / step
        if period != int(period):
            raise ValueError(f"A day is not a whole number of sampling steps ({step}); pass season=<rows>.")
        return int(period)
    if isinstance(season, str) or not is_whole_number(season, 2):
        raise ValueError(f"season must be 'daily', a whole number of rows >= 2 or None, got {season!r}.")
    return int(season)


def window_lengths(seq_len: int, horizon: int) -> tuple[int, int]:
    """``seq_len`` (lookback) and ``horizon`` (forecast) as whole numbers >= 1, else an error naming the one."""
    return whole_number(seq_len, "seq_len"), whole_number(horizon, "horizon")


class WindowDataset(Dataset):
    """Sliding windows ``(x, y)`` over one standardised segment: ``x`` = ``seq_len`` rows, ``y`` = the next ``horizon``.

    Window ``i`` is ``x = segment[i : i + seq_len]``, ``y = segment[i + seq_len : i + seq_len + horizon]``,
    both float32 tensors of shape (length, variates); there are ``len(segment) - seq_len - horizon + 1`` windows.

    Parameters
    ----------
    values
        The segment, (time, variates), already standardised.
    seq_len, horizon
        Lookback and forecast lengths.
    offset
        Row of ``values[0]`` in the full file (kept for bookkeeping: :meth:`rows` returns file rows).

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.ts import WindowDataset
    >>> ds = WindowDataset(np.arange(20, dtype=np.float32)[:, None], seq_len=4, horizon=2)
    >>> len(ds), ds[0][0].ravel().tolist(), ds[0][1].ravel().tolist()
    (15, [0.0, 1.0, 2.0, 3.0], [4.0, 5.0])
    """

    def __init__(self, values: np.ndarray, seq_len: int, horizon: int, offset: int = 0) -> None:
        seq_len, horizon = window_lengths(seq_len, horizon)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim != 2:
            raise ValueError(f"values must be (time, variates), got shape {values.shape}.")
        if len(values) < seq_len + horizon:
            raise ValueError(
                f"A segment of {len(values)} rows is shorter than seq_len + horizon = {seq_len + horizon}."
            )
        self.values = torch.from_numpy(values)
        self.seq_len, self.horizon, self.offset = seq_len, horizon, offset

    def __len__(self) -> int:
        return len(self.values) - self.seq_len - self.horizon + 1

    def rows(self, i: int) -> tuple[range, range]:
        """File rows of the lookback and of the target of window ``i``.

        Parameters
        ----------
        i
            Window index, as for indexing the data set: ``-len(self) <= i < len(self)``, a negative one counting
            from the end (``IndexError`` otherwise).

        Returns
        -------
        ``(lookback, target)``: ``range(offset + i, offset + i + seq_len)`` and the ``horizon`` rows after it.

        Examples
        --------
        >>> import numpy as np
        >>> from dfmamba_st.ts import WindowDataset
        >>> ds = WindowDataset(np.zeros((20, 1), np.float32), seq_len=4, horizon=2, offset=100)
        >>> ds.rows(0)
        (range(100, 104), range(104, 106))
        >>> ds.rows(-1) == ds.rows(len(ds) - 1)
        True
        """
        start = self.offset + self._window(i)
        return range(start, start + self.seq_len), range(start + self.seq_len, start + self.seq_len + self.horizon)

    def _window(self, i: int) -> int:
        """Window ``i`` counted from the start (a negative one from the end), checked."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        return i % len(self)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._window(i)
        x = self.values[i : i + self.seq_len]
        y = self.values[i + self.seq_len : i + self.seq_len + self.horizon]
        return x, y

    def batches(self, batch_size: int = 32, *, shuffle: bool = False, seed: int = 0, max_windows: int | None = None):
        """Batches ``(x, y)`` of shape (batch, seq_len, C) and (batch, horizon, C), built by fancy indexing (fast).

        Parameters
        ----------
        batch_size
            Windows per batch (the last batch may be smaller).
        shuffle
            Shuffle the window order (seeded by ``seed``).
        seed
            Seed of the shuffle (a fresh :class:`torch.Generator`; the global random state is not used). Ignored
            without ``shuffle``.
        max_windows
            Use only this many windows: evenly spaced ones when not shuffling (the first and the last included), a
            random subset otherwise (the first ``max_windows`` of the shuffled order). ``None``, or a number at least
            ``len(self)``: every window.

        Returns
        -------
        A generator of ``(x, y)`` float32 tensors, (batch, seq_len, C) and (batch, horizon, C), in the window order
        (ascending without ``shuffle``).

        Raises
        ------
        ValueError
            When ``batch_size`` or ``max_windows`` is not a whole number >= 1 (at the call; a ``TypeError`` for a
            value that is not a number).

        Examples
        --------
        >>> import numpy as np
        >>> from dfmamba_st.ts import WindowDataset
        >>> ds = WindowDataset(np.arange(20, dtype=np.float32)[:, None], seq_len=4, horizon=2)
        >>> [tuple(x.shape) for x, y in ds.batches(6)]
        [(6, 4, 1), (6, 4, 1), (3, 4, 1)]
        >>> [x[:, 0, 0].tolist() for x, y in ds.batches(4, max_windows=3)]  # windows 0, 7 and 14
        [[0.0, 7.0, 14.0]]
        >>> sum(len(x) for x, y in ds.batches(4, shuffle=True, seed=1, max_windows=10))
        10
        """
        batch_size = whole_number(batch_size, "batch_size")
        if max_windows is not None:
            max_windows = whole_number(max_windows, "max_windows (None: every window)")
        n = len(self)
        if shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            if max_windows is not None:
                idx = idx[:max_windows]
        elif max_windows is not None and max_windows < n:
            idx = torch.linspace(0, n - 1, max_windows).round().long()
        else:
            idx = torch.arange(n)
        return self._batches(idx, batch_size)

    def _batches(self, idx: torch.Tensor, batch_size: int):
        steps = torch.arange(self.seq_len + self.horizon)
        for start in range(0, len(idx), batch_size):
            win = self.values[idx[start : start + batch_size, None] + steps]  # (b, seq_len + horizon, C)
            yield win[:, : self.seq_len], win[:, self.seq_len :]

    def loader(self, batch_size: int = 32, shuffle: bool = False, **kwargs) -> DataLoader:
        """A plain torch :class:`~torch.utils.data.DataLoader` over the windows."""
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, **kwargs)


@dataclass
class ForecastSplits:
    """Train / validation / test windows of one data set, with the scaler fitted on the training rows.

    Attributes
    ----------
    name
        Data set name.
    train, val, test
        :class:`WindowDataset` of each split.
    scaler
        :class:`Scaler` fitted on ``rows[starts[0]:ends[0]]`` only.
    values
        The whole file standardised with that scaler, (rows, variates), less ``season``'s profile when there is
        one (what the windows hold; the zero-shot coarsening test uses it too).
    starts, ends
        Row borders of the segments (see :func:`split_borders`).
    columns
        Variate names.
    season
        The :class:`Season` removed from ``values`` (fitted on the training rows only), or ``None``. A forecast of
        the series is the model's forecast plus ``season.at(rows)`` of the forecast rows.

    Examples
    --------
    :func:`make_splits` builds it; here from a frame of 200 rows (70/10/20 split, lookback 8, horizon 4):

    >>> import numpy as np, pandas as pd
    >>> from dfmamba_st.ts import make_splits
    >>> s = make_splits("toy", 8, 4, frame=pd.DataFrame({"a": np.arange(200.0), "b": np.ones(200)}))
    >>> s.starts, s.ends, s.n_variates, s.columns
    ([0, 132, 152], [140, 160, 200], 2, ['a', 'b'])
    >>> len(s.train), len(s.val), len(s.test), s.values.shape
    (129, 17, 37, (200, 2))
    >>> s.test.rows(0)[1]  # the first test target starts at the test boundary
    range(160, 164)
    """

    name: str
    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    scaler: Scaler
    values: np.ndarray
    starts: list[int]
    ends: list[int]
    columns: list[str]
    season: Season | None = None

    @property
    def n_variates(self) -> int:
        """Number of variates (channels)."""
        return self.values.shape[1]


def make_splits(
    name: str | os.PathLike,
    seq_len: int = 96,
    horizon: int = 96,
    path: str | os.PathLike | None = None,
    frame: pd.DataFrame | None = None,
    *,
    ratios: tuple[float, float, float] | None = None,
    season: int | Literal["daily"] | None = None,
) -> ForecastSplits:
    """Load a benchmark and cut it into standardised train / validation / test windows.

    Parameters
    ----------
    name
        ``ETTh1``, ``ETTh2``, ``ETTm1``, ``ETTm2``, ``weather`` (others use the 70/10/20 split). It picks the split
        protocol, so a file read from ``path`` must be named after it; ``name`` may also be the file's path. The
        stem of a file name or path counts (``"/data/ETTh1.csv.gz"`` is ``ETTh1``).
    seq_len
        Lookback (96 in the standard protocol).
    horizon
        Forecast length (96, 192, 336 or 720 in the standard protocol).
    path
        Where to read the file (see :func:`load`).
    frame
        An already loaded frame (skips reading; ``path`` is then ignored). It is checked as :func:`load` checks a
        file: a ``date`` column becomes the index (an index of dates as text is parsed), every value must be
        numeric and finite, and timestamps must be in ascending order (else ``ValueError``).
    ratios
        Train / validation / test fractions of all rows instead of the standard split (see :func:`split_borders`;
        the DF-Mamba paper's ETT protocol is ``(0.6, 0.2, 0.2)``).
    season
        ``"daily"`` (or a whole number of rows per period): subtract a fixed :class:`Season` profile, the mean of
        the standardised training rows at each time of day, from the series before cutting windows. Errors of
        forecasts of the residual equal errors of forecasts of the series (the profile is added to forecast and
        target alike), so metrics stay comparable. ``None``: the standardised series as it is.

    Examples
    --------
    With ``ETTh2.csv`` in ``data/ts/`` (``tests/test_ts.py`` checks these figures on the real file):

    >>> import dfmamba_st as dfm
    >>> s = dfm.ts.make_splits("ETTh2", 96, 96, path="data/ts")  # doctest: +SKIP
    >>> len(s.train), len(s.val), len(s.test)  # doctest: +SKIP
    (8449, 2785, 2785)
    """
    seq_len, horizon = window_lengths(seq_len, horizon)
    if frame is None:
        file = _find_file(name, path)
        df, stem = _load_file(file), _dataset_stem(file)
    else:
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(
                f"frame must be a pandas DataFrame (one column per variate), got {type(frame).__name__}; "
                "e.g. series.to_frame() or pd.DataFrame(array)."
            )
        df, stem = _validated(frame, "The frame"), _dataset_stem(name)
    raw = df.to_numpy(dtype=np.float64)
    starts, ends = split_borders(stem, len(raw), seq_len, ratios=ratios)
    for part, start, end in zip(("training", "validation", "test"), starts, ends):
        if end - start < seq_len + horizon:
            raise ValueError(
                f"The {part} segment of {stem} (rows {start}-{end}, lookback included) holds {end - start} rows, fewer "
                f"than seq_len + horizon = {seq_len + horizon}: use a shorter seq_len or horizon, other ratios, or a "
                f"longer series ({len(raw)} rows)."
            )
    scaler = Scaler.fit(raw[starts[0] : ends[0]])
    values = scaler.transform(raw)
    fitted = None
    if season is not None:
        step = _sampling_step(df.index)
        period = _season_period(season, stem, step)
        fitted = Season.fit(values[starts[0] : ends[0]], _season_phase(df.index, step, period), period)
        values = values - fitted.at(np.arange(len(values)))
    sets = [WindowDataset(values[s:e], seq_len, horizon, offset=s) for s, e in zip(starts, ends)]
    return ForecastSplits(
        name=stem,
        train=sets[0],
        val=sets[1],
        test=sets[2],
        scaler=scaler,
        values=values,
        starts=starts,
        ends=ends,
        columns=[str(c) for c in df.columns],
        season=fitted,
    )
