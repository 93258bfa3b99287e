"""Input checks and small helpers shared by the pp/tl/pl functions."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

__all__ = ["check_adata", "check_library_key", "h5ad_safe", "library_indices", "versions"]


def check_adata(adata: AnnData) -> None:
    """Fail early on something that is not a usable AnnData."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has 0 spots; there is nothing to analyse.")


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
