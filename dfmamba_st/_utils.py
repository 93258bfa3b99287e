"""Input checks and small helpers shared by the pp/tl/pl functions."""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = [
    "check_adata",
    "check_colour_range",
    "check_library_key",
    "check_outputs",
    "embed_record_key",
    "gate_range",
    "h5ad_safe",
    "is_tool_record",
    "is_whole_number",
    "library_indices",
    "recorded_param",
    "recorded_spatial_key",
    "resolve_library_key",
    "shared_positions",
    "user_stacklevel",
    "versions",
    "warn_extra_coordinates",
    "warn_pooled_slices",
    "warn_unnamed_libraries",
    "whole_number",
    "written_by",
]


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that names the first frame outside the package.

    For warnings raised in helpers that several public functions reach at different depths. Frames of
    :mod:`contextlib` are passed over too: ``tl.embed`` is wrapped by a context manager used as a decorator.
    """
    package = Path(__file__).resolve().parent
    wrapper = Path(contextlib.__file__).resolve()
    frame, level = sys._getframe(1), 1
    while frame is not None:
        file = Path(frame.f_code.co_filename).resolve()
        if not (file.is_relative_to(package) or file == wrapper):
            break
        frame, level = frame.f_back, level + 1
    return level


def check_adata(adata: AnnData, *, min_spots: int = 1, caller: str = "") -> None:
    """Fail early on something that is not a usable AnnData (or has fewer than ``min_spots`` spots for ``caller``)."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has 0 spots; there is nothing to analyse.")
    if adata.n_obs < min_spots:
        raise ValueError(f"{caller} needs at least {min_spots} spots, got {adata.n_obs}.")


def check_library_key(adata: AnnData, library_key: str | None) -> None:
    """Check that ``library_key`` names a column of ``obs`` without missing values."""
    if library_key is None:
        return
    if library_key not in adata.obs.columns:
        raise KeyError(
            f"library_key={library_key!r} is not a column of adata.obs; available columns: {list(adata.obs.columns)}."
        )
    if adata.obs[library_key].isna().any():
        raise ValueError(f"obs[{library_key!r}] has missing values; every spot needs a library.")


POOLED_SLICES_HINT = (
    "Several slices in one AnnData (e.g. after anndata.concat)? Pass library_key= (the obs column naming them)"
)


def shared_positions(xy: np.ndarray) -> int:
    """Spots whose (finite) coordinates ``xy`` are those of an earlier spot."""
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    return xy.shape[0] - np.unique(xy, axis=0).shape[0]


def warn_extra_coordinates(adata: AnnData, spatial_key: str) -> None:
    """Warn when ``obsm[spatial_key]`` has more columns than (x, y) and they vary (a z or section index is dropped).

    The package reads the first two columns everywhere (ordering, graphs, plots, spatial scores).
    """
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] <= 2:
        return
    if pd.DataFrame(coords[:, 2:]).nunique(dropna=False).max() > 1:  # any column type (a DataFrame may hold text)
        warnings.warn(
            f"obsm[{spatial_key!r}] has {coords.shape[1]} columns; only the first two (x, y) are used, the others "
            "vary. Sections stacked along a third axis are read as one tissue: give each its own library "
            "(library_key=).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


#: ``obs`` columns that usually name the slice of each spot (``anndata.concat(label=...)``, squidpy, spatialLIBD)
LIBRARY_COLUMNS = ("library_id", "library", "sample_id", "sample", "section", "slice", "batch")


def warn_unnamed_libraries(adata: AnnData, caller: str, consequence: str) -> None:
    """Warn when several slices seem pooled without a library key although no two spots share a position.

    Slices whose coordinates overlap without coinciding (two Visium slides in their own pixel frames, or another
    platform's coordinates) share no position; a column such as ``obs['library_id']`` with several values is the
    sign, and so are several images in ``uns['spatial']``, unless such a column names one of them for every spot
    (a subset holding one slice of several keeps all their images).
    """
    images = adata.uns.get("spatial", {})
    images = list(images) if isinstance(images, Mapping) else []
    values = {c: set(adata.obs[c].dropna().astype(str)) for c in LIBRARY_COLUMNS if c in adata.obs.columns}
    counts = {c: len(v) for c, v in values.items()}
    named = [c for c, n in counts.items() if n > 1]
    one_image_named = any(n == 1 and values[c] <= set(map(str, images)) for c, n in counts.items())
    if not named and (len(images) < 2 or one_image_named):
        return
    sign = (
        f"obs[{named[0]!r}] holds {counts[named[0]]} values"
        if named
        else f"uns['spatial'] holds {len(images)} libraries"
    )
    warnings.warn(
        f"{sign} but no library_key was given: several slices in one AnnData are read as one tissue, {consequence}. "
        f"Pass library_key= (e.g. library_key={(named or ['<the obs column>'])[0]!r}) to "
        f"{caller} if they are several slices.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def warn_pooled_slices(
    adata: AnnData,
    n_shared: int,
    library_key: str | None,
    *,
    caller: str,
    shared: str,
    unnamed: str | None = None,
) -> None:
    """Warn about slices pooled without a library key, the one check of every step that reads positions.

    ``n_shared`` spots on the position of another (grid cell or coordinates) are the sign: ``shared`` says what
    ``caller`` does with them (with a library key they are only reported). Where none share one and no library key
    is in effect, an ``obs`` / ``uns`` naming several slices is the sign (:func:`warn_unnamed_libraries`) and
    ``unnamed`` the consequence (by default ``shared``'s). ``anndata.concat`` drops ``uns``, and with it the library
    key the steps recorded, so slices processed one at a time and joined afterwards reach a later step without one.
    """
    if n_shared:
        hint = f" {POOLED_SLICES_HINT} to {caller}." if library_key is None else ""
        warnings.warn(
            f"{n_shared} spots have the same coordinates (or grid cell) as another spot; {shared}." + hint,
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    elif library_key is None:
        warn_unnamed_libraries(adata, caller, shared if unnamed is None else unnamed)


def is_whole_number(value: object, minimum: int) -> bool:
    """Whether ``value`` is a whole number (an int, or a float such as ``2.0``; not a bool) of at least ``minimum``."""
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and float(value).is_integer()
        and value >= minimum
    )


def whole_number(value: object, what: str, minimum: int = 1) -> int:
    """``value`` as an ``int``, unless it is not a whole number ``>= minimum``: then an error naming ``what``.

    A ``TypeError`` for what is not a number (a string, a bool), a ``ValueError`` for a number that is not whole
    (``2.5``, NaN) or too small.
    """
    if not is_whole_number(value, minimum):
        error = TypeError if isinstance(value, bool) or not isinstance(value, numbers.Real) else ValueError
        raise error(f"{what} must be a whole number >= {minimum}, got {value!r}.")
    return int(value)


#: the largest seed NumPy's legacy ``RandomState`` (scikit-learn's, scanpy's PCA) takes
MAX_SEED = 2**32 - 1


def seed_number(value: object, what: str) -> int:
    """``value`` as a seed: a whole number from 0 to ``MAX_SEED``, else an error naming ``what``.

    Checked before any work: scikit-learn and NumPy refuse larger seeds only when they come to use them.
    """
    seed = whole_number(value, what, minimum=0)
    if seed > MAX_SEED:
        raise ValueError(f"{what} must be a whole number from 0 to 2**32 - 1 ({MAX_SEED}), got {value!r}.")
    return seed


#: the ``uns`` key of the record of the default embedding (``obsm['X_dfm']``)
EMBED_RECORD = "dfm"


def embed_record_key(key_added: str) -> str:
    """The ``uns`` key of the record of a :func:`~dfmamba_st.tl.embed` run that wrote ``obsm[key_added]``.

    ``"dfm"`` for the default ``"X_dfm"``, else ``key_added`` itself (scanpy's rule for ``sc.pp.pca``), so two
    embeddings of one AnnData keep their own records.
    """
    return EMBED_RECORD if key_added == "X_dfm" else key_added


def check_key_added(key_added: str, caller: str) -> None:
    """Refuse a ``key_added`` whose ``uns`` record would replace the default embedding's (``uns['dfm']``)."""
    if key_added == EMBED_RECORD:
        raise ValueError(
            f"key_added={EMBED_RECORD!r} would write {caller}'s record over uns[{EMBED_RECORD!r}], the record of "
            "the embedding obsm['X_dfm'] (its genes, settings and training history); choose another name."
        )


#: the params every record of a tool holds: how its record in ``uns`` is told from another tool's or the user's
RECORD_PARAMS = {
    "dfm.pp.serialize": frozenset({"curve", "grid"}),
    "dfm.tl.embed": frozenset({"token_scale", "d_model", "readout"}),
    "dfm.tl.cluster": frozenset({"use_rep", "method", "n_clusters"}),
}


def written_by(record: object, caller: str) -> bool:
    """Whether ``record`` (an ``uns`` value) is a record that ``caller`` (a key of :data:`RECORD_PARAMS`) wrote."""
    return is_tool_record(record) and RECORD_PARAMS[caller] <= set(record["params"])


#: the ``key_added`` of each tool by default: names of dfmamba_st's own, which a call may always write over
DEFAULT_KEYS = {"dfm.pp.serialize": "dfm_order", "dfm.tl.embed": "X_dfm", "dfm.tl.cluster": "dfm_domain"}


def check_outputs(adata: AnnData, caller: str, key_added: str, uns_key: str, **slots: tuple[str, ...]) -> None:
    """Refuse to overwrite what another tool (or the user) stored where ``caller`` would write its output.

    ``caller`` writes its record to ``uns[uns_key]`` and its results to the keys of ``slots``
    (``obs=("dfm_domain",)``, ``obsm=("X_dfm", "X_dfm_gates")``), named after ``key_added``. The default names
    (:data:`DEFAULT_KEYS`) are the package's own and are written over (slices joined by ``ad.concat`` keep their
    ``obs['dfm_order']`` but lose its record). Under another name, a call whose ``uns[uns_key]`` is a record of
    ``caller`` itself is a re-run and replaces its own output; otherwise any of these keys that exists already
    (truth labels in ``obs``, coordinates in ``obsm``, the images in ``uns['spatial']``, ...) is an error naming it.
    ``key_added`` must be a non-empty string without ``/`` (an ``.h5ad`` file reads ``/`` as nesting: an ``obsm``
    entry so named cannot be read back, an ``obs`` / ``uns`` one comes back nested).
    """
    if not isinstance(key_added, str) or not key_added:
        raise (ValueError if key_added == "" else TypeError)(
            f"key_added must be a non-empty str (the name of {caller}'s output), got {key_added!r}."
        )
    if "/" in key_added:  # h5ad stores it as a path: written, but read back nested or not at all
        raise ValueError(f"key_added={key_added!r} holds '/', which an .h5ad file reads as a subgroup; choose another.")
    if key_added == DEFAULT_KEYS[caller] or written_by(adata.uns.get(uns_key), caller):
        return
    taken = [f"uns[{uns_key!r}]"] if uns_key in adata.uns else []
    for attr, keys in slots.items():
        taken += [f"{attr}[{key!r}]" for key in keys if key in getattr(adata, attr)]
    if taken:
        raise ValueError(
            f"{caller} would overwrite {', '.join(taken)}, which {caller} did not write (no record of it in "
            f"uns[{uns_key!r}]); choose another key_added=, or delete {' and '.join(taken)} first."
        )


def is_tool_record(value: object) -> bool:
    """Whether ``value`` is a ``{'params': {...}, ...}`` record that a tool wrote in ``uns`` about the data it ran on.

    Such records are written by ``pp.serialize``, ``tl.embed``, ``tl.cluster``, ``sc.pp.pca``, ``sc.pp.neighbors``, ….
    """
    return isinstance(value, Mapping) and isinstance(value.get("params"), Mapping)


def recorded_param(adata: AnnData, uns_key: str | None, name: str):
    """``uns[uns_key]['params'][name]`` as a tool recorded it.

    ``None`` for a stored ``"None"``, a missing record or ``uns_key=None``.
    """
    record = adata.uns.get(uns_key) if uns_key is not None else None
    value = record["params"].get(name) if is_tool_record(record) else None
    return None if value is None or (isinstance(value, str) and value == "None") else value


def recorded_spatial_key(adata: AnnData, *uns_keys: str | None) -> str:
    """The ``obsm`` key of the coordinates recorded in the first of ``uns_keys`` that records one, else ``"spatial"``.

    ``pp.serialize`` records the coordinates it ordered the spots on; ``tl.embed`` and ``tl.cluster`` pass it on.
    """
    for uns_key in uns_keys:
        recorded = recorded_param(adata, uns_key, "spatial_key")
        if recorded:
            return str(recorded)
    return "spatial"


def resolve_library_key(adata: AnnData, library_key: str | None, *uns_keys: str) -> str | None:
    """``library_key``, or else the one recorded in the first of ``uns_keys`` that has one (and is in ``obs``).

    The step before (``pp.serialize``, ``tl.embed``) records the key it was given, so a later step does not pool
    the slices when the key is not repeated. A key taken from a record is logged.
    """
    if library_key is not None:
        return library_key
    for uns_key in uns_keys:
        recorded = recorded_param(adata, uns_key, "library_key")
        if recorded is not None and recorded in adata.obs.columns:
            from scanpy import logging as logg

            logg.info(f"    library_key={recorded!r}, as recorded in uns[{uns_key!r}]")
            return str(recorded)
    return None


def serialized_rows(adata: AnnData, order_key: str, library_key: str | None) -> np.ndarray:
    """The rows by library, then along the serialization curve: an order that does not depend on the AnnData's.

    Without ``obs[order_key]`` (or with missing values in it) the spots' names take the curve's place, which do not
    depend on the AnnData's order either; they also order spots at one position along the curve (slices serialized
    one by one and joined without a library key). Repeated names keep the AnnData's order among themselves.
    """
    library = None if library_key is None else pd.Categorical(adata.obs[library_key]).codes
    order = None
    if order_key in adata.obs.columns and not adata.obs[order_key].isna().any():
        order = adata.obs[order_key].to_numpy()
    keys = []  # np.lexsort: the last key first
    if order is None or pd.DataFrame({"order": order, "library": 0 if library is None else library}).duplicated().any():
        keys.append(pd.factorize(adata.obs_names, sort=True)[0])  # the names, sorted only where they are needed
    keys += [k for k in (order, library) if k is not None]  # library: declared categories or sorted values
    return np.lexsort(keys)


def library_indices(adata: AnnData, library_key: str | None) -> list[np.ndarray]:
    """Integer positions of the spots of each library (one array for all spots without a key)."""
    if library_key is None:
        return [np.arange(adata.n_obs)]
    codes = adata.obs[library_key].astype("category").cat.codes.to_numpy()
    return [np.flatnonzero(codes == c) for c in np.unique(codes)]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a result, to store next to it."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("dfmamba-st", "torch", "numpy", "scanpy", "anndata", "squidpy", "scikit-learn", "numba"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def h5ad_safe(value):
    """Parameters in a form ``AnnData.write_h5ad`` stores: tuples become lists, ``None`` becomes ``"None"``."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [h5ad_safe(v) for v in value]
    if value is None:
        return "None"
    return value


def check_colour_range(vmin: float | None, vmax: float | None) -> None:
    """A ``ValueError`` when both ends of a colour map are given and ``vmin`` is not below ``vmax``."""
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"vmin must be below vmax; got {vmin} and {vmax}.")


def gate_range(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """The ends of a gate plot's colour map (``pl.gates``, the pathology gate maps).

    ``vmin`` / ``vmax`` where given, else the 1st / 99th percentile of the finite ``values`` (0 / 1 if they are flat).

    An end left automatic that falls on the wrong side of the one given becomes 0 or 1, the gates' bounds.
    """
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    if high - low < 1e-3:
        low, high = 0.0, 1.0
    check_colour_range(vmin, vmax)
    if vmin is not None:
        low, high = vmin, high if high > vmin else max(1.0, vmin + 1e-3)
    if vmax is not None:
        low, high = low if low < vmax else min(0.0, vmax - 1e-3), vmax
    return float(low), float(high)
