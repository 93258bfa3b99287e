"""Order spots along a space-filling curve: the tissue becomes a sequence."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import (
    check_adata,
    check_library_key,
    check_outputs,
    h5ad_safe,
    library_indices,
    recorded_spatial_key,
    resolve_library_key,
    user_stacklevel,
    warn_extra_coordinates,
    warn_pooled_slices,
    written_by,
)
from ..core import curves

__all__ = ["LibraryLayout", "library_layouts", "serialize", "spot_cells"]

#: sub-cells per cell side used to order points that share a quantised cell
TIE_RESOLUTION = 16


#: when at most this share of spots breaks the hexagonal grid's parity, they are reported as likely errors
OFF_LATTICE_SHARE = 0.01


def spot_cells(adata: AnnData, *, spatial_key: str = "spatial") -> tuple[np.ndarray, str]:
    """Integer grid cells of every spot and how they were obtained.

    On a Visium hexagonal grid (``obs['array_row']``, ``obs['array_col']``, with ``row + col`` even) a spot sits at
    ``(array_row, array_col // 2)``, a square grid in which hex neighbours stay neighbours. Without a grid,
    ``obsm[spatial_key]`` is quantised (about one spot per cell; spots sharing a cell are all kept).

    Parameters
    ----------
    adata
        Spots with a grid in ``obs['array_row'/'array_col']`` (used when both hold whole numbers) or coordinates in
        ``obsm[spatial_key]``. All spots are taken together, as one library: :func:`library_layouts` gives the cells
        of each library.
    spatial_key
        Key of the (x, y) coordinates in ``obsm``, used when there is no grid.

    Returns
    -------
    ``(cells, source)`` with ``cells`` (n_obs, 2) int64 and ``source`` ``"visium_grid"``, ``"grid"`` or ``"quantized"``.
    A grid is shifted to start at 0 (a Visium grid's columns by an even number, so that a spot's cell does not depend on
    the other spots); ``"grid"`` is a grid whose ``row + col`` has both parities, taken as square.

    Examples
    --------
    >>> import pandas as pd
    >>> from anndata import AnnData
    >>> import dfmamba_st as dfm
    >>> rows_cols = pd.DataFrame({"array_row": [0, 0, 1], "array_col": [0, 2, 1]}, index=["s0", "s1", "s2"])
    >>> cells, source = dfm.pp.spot_cells(AnnData(obs=rows_cols))  # three touching spots of a hexagonal grid
    >>> cells.tolist(), source
    ([[0, 0], [0, 1], [1, 0]], 'visium_grid')
    """
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        rc = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(rc)):
            raise ValueError(
                "obs['array_row'/'array_col'] contain NaN or inf; fix or drop those spots, "
                "or delete the columns to serialize from obsm['spatial']."
            )
        if np.all(rc == np.round(rc)):
            rc = rc.astype(np.int64)
            if np.all((rc[:, 0] + rc[:, 1]) % 2 == (rc[0, 0] + rc[0, 1]) % 2):
                # columns shifted by an even number, so a spot's cell does not depend on the other spots present
                # (another slice, where a crop starts): an odd shift would pair the columns of alternate rows anew
                rc -= np.array([rc[:, 0].min(), 2 * (rc[:, 1].min() // 2)])
                return np.stack([rc[:, 0], rc[:, 1] // 2], axis=1), "visium_grid"
            return rc - rc.min(axis=0), "grid"
    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        if not np.all(np.isfinite(xy)):
            bad = int((~np.isfinite(xy).all(axis=1)).sum())
            raise ValueError(
                f"obsm[{spatial_key!r}] contains NaN or inf coordinates for {bad:,} of {xy.shape[0]:,} spots; fix "
                f"them, or drop those spots: adata = adata[np.isfinite(adata.obsm[{spatial_key!r}]).all(axis=1)]"
                ".copy()."
            )
        return curves.quantize(xy), "quantized"
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        raise ValueError(
            f"obs['array_row'/'array_col'] are not whole numbers, so they are no Visium grid, and there is no "
            f"obsm[{spatial_key!r}] (x, y) to serialize from instead: fix the grid columns or add the coordinates."
        )
    raise KeyError(
        "No spatial coordinates: expected obs['array_row'] and obs['array_col'] (Visium grid) "
        f"or obsm[{spatial_key!r}] (x, y). Add one of them, e.g. from squidpy.read.visium."
    )


def _hexagonal_positions(obs: pd.DataFrame) -> np.ndarray:
    """(row, column) positions of Visium spots (``obs`` rows) on their hexagonal grid, touching spots one unit apart.

    Neighbours along a row are two ``array_col`` apart, neighbours in the next row one ``array_col`` to either side
    and one ``array_row`` down, which is √3/2 of the distance between touching spots.
    """
    rc = obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
    rc = rc - rc.min(axis=0)
    return np.stack([rc[:, 0] * np.sqrt(3) / 2, rc[:, 1] / 2], axis=1)


@dataclass
class LibraryLayout:
    """The spots of one library laid out for serialization.

    Attributes
    ----------
    idx
        Positions of the library's spots in the AnnData.
    cells
        (n, 2) integer grid cells, shifted to start at 0.
    points
        (n, 2) float coordinates in cell units, for neighbour graphs: on the Visium grid the spots' hexagonal
        positions (touching spots one unit apart, six around an inner spot), on another grid the cells themselves,
        the real coordinates when they were quantised.
    source
        How the cells were obtained: ``"visium_grid"``, ``"grid"`` or ``"quantized"`` (see :func:`spot_cells`).

    Examples
    --------
    >>> import numpy as np
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> (layout,) = dfm.pp.library_layouts(adata)  # one library
    >>> layout.source, layout.quantized, layout.cells.shape
    ('visium_grid', False, (3639, 2))
    >>> order = layout.order("hilbert")  # positions within layout.idx, in curve order
    >>> bool(np.array_equal(np.sort(order), np.arange(layout.idx.size)))
    True
    >>> layout.graph().shape  # each spot and its touching spots
    (3639, 3639)
    """

    idx: np.ndarray
    cells: np.ndarray
    points: np.ndarray
    source: str

    @property
    def quantized(self) -> bool:
        """Whether the cells come from quantised coordinates (several spots can share a cell)."""
        return self.source == "quantized"

    def order(self, curve: curves.Curve) -> np.ndarray:
        """Positions (within ``idx``) of the spots in curve order.

        Spots that share a quantised cell are ordered along the same curve on a grid ``TIE_RESOLUTION`` times
        finer, then by their coordinates (then by input order, for identical coordinates only): the order does not
        depend on the order of the spots in the AnnData.
        """
        tiebreak = None
        if self.quantized:
            sub = np.floor((self.points - self.cells) * TIE_RESOLUTION).clip(0, TIE_RESOLUTION - 1)
            # rank by (sub-cell along the curve, x, y): only identical coordinates are left to input order
            keys = np.lexsort((self.points[:, 1], self.points[:, 0], curves.curve_index(sub[:, 0], sub[:, 1], curve)))
            tiebreak = np.empty(keys.size, dtype=np.int64)
            tiebreak[keys] = np.arange(keys.size)
        return curves.curve_order(self.cells, curve, tiebreak=tiebreak)

    def graph(self, n_neighbors: int = 6):
        """Row-normalised sparse k-nearest-neighbour graph of the spots (see ``tl._features.spatial_graph``)."""
        from ..tl._features import spatial_graph

        return spatial_graph(self.points, n_neighbors=n_neighbors)


def library_layouts(
    adata: AnnData, *, library_key: str | None = None, spatial_key: str = "spatial"
) -> list[LibraryLayout]:
    """Grid cells of every library, from the Visium grid or from coordinates quantised per library.

    Each library is quantised on its own (its own bounding box and cell size), so slices stored in different
    coordinate frames each get about one spot per cell.

    Parameters
    ----------
    adata
        Spots with a grid in ``obs['array_row'/'array_col']`` or coordinates in ``obsm[spatial_key]`` (see
        :func:`spot_cells`).
    library_key
        Column of ``obs`` naming the library of each spot; ``None``: all spots form one library.
    spatial_key
        Key of the coordinates in ``obsm``, used when there is no grid.

    Returns
    -------
    One :class:`LibraryLayout` per library, in the order of the library column's categories (sorted values when it
    is not categorical), each with its cells shifted to start at 0.

    Examples
    --------
    >>> import numpy as np
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> adata.obs["half"] = np.where(adata.obs["array_row"] < 40, "top", "bottom")
    >>> layouts = dfm.pp.library_layouts(adata, library_key="half")
    >>> [(layout.source, layout.idx.size, layout.cells.min(axis=0).tolist()) for layout in layouts]
    [('visium_grid', 1638, [0, 0]), ('visium_grid', 2001, [0, 0])]

    ``"bottom"`` comes first; each half starts at cell ``(0, 0)``.
    """
    cells, source = spot_cells(adata, spatial_key=spatial_key)
    quantized = source == "quantized"
    if quantized:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    out = []
    for idx in library_indices(adata, library_key):
        if quantized:
            lib_xy = xy[idx] - xy[idx].min(axis=0)
            points = lib_xy / curves.default_cell_size(lib_xy)
            lib_cells = np.floor(points).astype(np.int64)
        else:
            lib_cells = cells[idx] - cells[idx].min(axis=0)
            on_hexagons = source == "visium_grid"
            points = _hexagonal_positions(adata.obs.iloc[idx]) if on_hexagons else lib_cells.astype(np.float64)
        out.append(LibraryLayout(idx, lib_cells, points, source))
    return out


def _warn_off_lattice(adata: AnnData) -> None:
    """Warn when a few spots break the hexagonal grid's parity (likely errors that turn it into a square grid)."""
    parity = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.int64).sum(axis=1) % 2
    odd = int(min(parity.sum(), parity.size - parity.sum()))
    if odd <= OFF_LATTICE_SHARE * parity.size:
        warnings.warn(
            f"{odd} of {parity.size} spots break the Visium hexagonal grid (array_row + array_col of one parity), "
            "so the grid is read as a square one, which orders the spots differently. Check those spots' "
            "obs['array_row'/'array_col'].",
            stacklevel=user_stacklevel(),
        )


CALLER = "dfm.pp.serialize"


def serialized_orders(adata: AnnData) -> list[str]:
    """The ``obs`` keys that hold an order :func:`serialize` wrote (its record in ``uns`` names the curve and grid)."""
    return [key for key, record in adata.uns.items() if key in adata.obs.columns and written_by(record, CALLER)]


def identical_positions(layouts: list[LibraryLayout]) -> int:
    """Spots at the same position (grid cell or exact coordinates) as an earlier spot of their library."""
    return sum(layout.idx.size - len(np.unique(layout.points, axis=0)) for layout in layouts)


def warn_off_tissue(
    adata: AnnData, consequence: str = "they are ordered, embedded and clustered like the others"
) -> None:
    """Warn when ``obs['in_tissue']`` marks spots outside the tissue (``sc.read_visium`` of the raw matrix has them).

    ``consequence`` says what the step does with them.
    """
    if "in_tissue" not in adata.obs.columns:
        return
    off = int((pd.to_numeric(adata.obs["in_tissue"], errors="coerce") == 0).sum())
    if off:
        warnings.warn(
            f"{off} of {adata.n_obs} spots have obs['in_tissue'] == 0 (outside the tissue); {consequence}. Keep the "
            "tissue first: adata = adata[adata.obs['in_tissue'] == 1].copy().",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def serialize(
    adata: AnnData,
    *,
    curve: curves.Curve = "hilbert",
    library_key: str | None = None,
    spatial_key: str | None = None,
    key_added: str = "dfm_order",
    copy: bool = False,
) -> AnnData | None:
    """Order spots along a space-filling curve, one sequence per library.

    Parameters
    ----------
    adata
        Annotated data matrix with a Visium grid in ``obs['array_row'/'array_col']`` or coordinates in
        ``obsm[spatial_key]``. Every spot is a spot of the tissue: spots marked ``obs['in_tissue'] == 0`` are kept,
        with a warning (filter them out first).
    curve
        ``"hilbert"`` (default), ``"hilbert_t"`` (Hilbert curve of the transposed grid), ``"hilbert_s"`` /
        ``"hilbert_ts"`` (the same two on the grid shifted by a third of its square, see
        :func:`dfmamba_st.core.curves.curve_index`) or ``"zorder"``.
    library_key
        Column of ``obs`` naming the slice of each spot; each slice becomes its own sequence. By default the key
        :func:`~dfmamba_st.pp.coarsen` recorded when ``adata`` is its result (its bins never mix slices), else none.
    spatial_key
        Key of the coordinates in ``obsm``: serialized on when there is no grid, and recorded for the later steps
        (the plots, the metrics). A key other than ``"spatial"`` must be in ``obsm``. By default the key
        :func:`~dfmamba_st.pp.coarsen` recorded when ``adata`` is its result, else ``"spatial"``.
    key_added
        Name of the ``obs`` column that receives the position along the curve (and of the ``uns`` record). An
        ``obs`` column or ``uns`` entry of that name that :func:`serialize` did not write is not overwritten: an
        error asks for another name. A non-empty name without ``/`` (an ``.h5ad`` file reads ``/`` as nesting).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    Returns ``None`` if ``copy=False``, else a new :class:`~anndata.AnnData`. Sets

    ``adata.obs[key_added]``
        Position of every spot along the curve within its library (0, 1, ...; every spot gets one).
    ``adata.uns[key_added]['params']``
        The parameters and how the grid was obtained (``visium_grid``, ``grid`` or ``quantized``).

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> adata.obs["dfm_order"].is_unique
    True
    """
    check_adata(adata)
    check_outputs(adata, CALLER, key_added, key_added, obs=(key_added,))
    library_key = resolve_library_key(adata, library_key, "dfm_coarsen")
    check_library_key(adata, library_key)
    spatial_key = spatial_key or recorded_spatial_key(adata, "dfm_coarsen")
    curves.check_curve(curve)
    if spatial_key != "spatial" and spatial_key not in adata.obsm:  # a key given that the later steps would miss
        raise KeyError(f"spatial_key={spatial_key!r} is not in adata.obsm; available keys: {list(adata.obsm)}.")
    warn_off_tissue(adata)
    layouts = library_layouts(adata, library_key=library_key, spatial_key=spatial_key)
    position = np.empty(adata.n_obs, dtype=np.int64)
    n_sharing = 0
    for layout in layouts:
        position[layout.idx[layout.order(curve)]] = np.arange(layout.idx.size)
        n_sharing += layout.idx.size - len(np.unique(layout.cells, axis=0))
    # spots sharing a quantised cell are expected for single cells (about one per cell on average); only exact ties
    # are odd
    n_identical = identical_positions(layouts)
    warn_pooled_slices(
        adata,
        n_identical,
        library_key,
        caller=CALLER,
        shared="all are kept, in input order",
        unnamed="their spots linked as neighbours",
    )
    if layouts[0].source == "grid":
        _warn_off_lattice(adata)
    if layouts[0].quantized:
        warn_extra_coordinates(adata, spatial_key)
        if {"array_row", "array_col"} <= set(adata.obs.columns):
            warnings.warn(
                f"obs['array_row'/'array_col'] are not whole numbers, so they are no Visium grid: the spots are "
                f"ordered on obsm[{spatial_key!r}] instead. Fix the grid columns (whole numbers) to order on the grid.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Series(position, index=adata.obs_names)
    adata.uns[key_added] = {
        "params": h5ad_safe(
            {
                "curve": curve,
                "library_key": library_key,
                "spatial_key": spatial_key,
                "grid": layouts[0].source,
                "n_spots_sharing_a_cell": int(n_sharing),
                "n_spots_with_identical_coordinates": int(n_identical),
            }
        )
    }
    return adata if copy else None
