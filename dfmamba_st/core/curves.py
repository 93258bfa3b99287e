"""Space-filling curves (Hilbert, Z-order) on integer 2-D grids of any size, and a quantiser for points.

Everything is vectorised with NumPy. A grid of any height × width is ordered by embedding it in the smallest
power-of-two square and sorting its cells by their index along that square's curve: the result visits every
cell exactly once. On a power-of-two square the Hilbert order moves between 4-neighbours at every step.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

__all__ = [
    "CURVES",
    "Curve",
    "check_curve",
    "curve_index",
    "curve_order",
    "default_cell_size",
    "grid_curve",
    "hilbert_index",
    "inverse_permutation",
    "pair_gaps",
    "quantize",
    "zorder_index",
]

Curve = Literal["hilbert", "hilbert_t", "hilbert_s", "hilbert_ts", "zorder"]

#: every curve name :func:`curve_index` knows
CURVES: tuple[str, ...] = get_args(Curve)


def check_curve(name: str, what: str = "curve") -> None:
    """Raise a ``ValueError`` naming the known curves if ``name`` is not one of them."""
    if name not in CURVES:
        raise ValueError(f"Unknown {what} {name!r}; use one of {', '.join(repr(c) for c in CURVES)}.")


def _third_shift(extent: int) -> int:
    """``side // 3`` of the power-of-two square that holds ``extent`` cells: 0b1010…, about a third at every scale."""
    return (1 << _order_for(extent)) // 3


def _order_for(extent: int) -> int:
    return max(1, int(np.ceil(np.log2(max(int(extent), 1)))))


def _as_int(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers; use quantize() for float coordinates.")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative.")
    return arr


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """Index of cells ``(x, y)`` along the Hilbert curve of the ``2**order`` square.

    Parameters
    ----------
    x, y
        Integer coordinates in ``[0, 2**order)``.
    order
        Curve order.

    Returns
    -------
    int64 array of indices in ``[0, 4**order)``.

    Examples
    --------
    >>> from dfmamba_st.core.curves import hilbert_index
    >>> hilbert_index([0, 0, 1, 1], [0, 1, 1, 0], order=1).tolist()
    [0, 1, 2, 3]
    """
    x = _as_int(x, "x").copy()
    y = _as_int(y, "y").copy()
    side = 1 << order
    if x.size and (x.max() >= side or y.max() >= side):
        raise ValueError(f"Coordinates must lie in [0, {side}) for order {order}.")
    d = np.zeros_like(x)
    s = side >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the sub-curve has the canonical orientation
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def zorder_index(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """Index of cells ``(x, y)`` along the Z-order (Morton) curve of the ``2**order`` square (bit interleaving)."""
    x = _as_int(x, "x")
    y = _as_int(y, "y")
    d = np.zeros_like(x)
    for bit in range(order):
        d |= ((x >> bit) & 1) << (2 * bit + 1)
        d |= ((y >> bit) & 1) << (2 * bit)
    return d


def curve_index(x: np.ndarray, y: np.ndarray, curve: Curve = "hilbert") -> np.ndarray:
    """Curve index of integer cells on the smallest power-of-two square that holds them.

    ``"hilbert_t"`` is the Hilbert curve of the transposed grid (rows and columns swapped): a second ordering that
    keeps different 2-D neighbours adjacent. ``"hilbert_s"`` and ``"hilbert_ts"`` are the Hilbert curves of the grid
    (and of its transpose) shifted diagonally by a third of the square's side (``side // 3 = 0b1010…``, about a third
    of the cell at every level of the quadtree). A Hilbert curve jumps where it crosses the lines of its quadtree,
    and transposing the grid keeps those lines where they are; shifting moves them, so spots split by the lines of
    one curve are neighbours along the other (the shifted-quadtree idea of Chan 1998, which in 2-D uses shifts of 0,
    1/3 and 2/3 of the side; here one shift, measured in ``benchmarks/curve_adjacency.py``).
    """
    check_curve(curve)
    x = _as_int(x, "x")
    y = _as_int(y, "y")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    extent = max(x.max(), y.max()) + 1
    if curve in ("hilbert_t", "hilbert_ts"):
        x, y = y, x
    if curve in ("hilbert_s", "hilbert_ts"):
        shift = _third_shift(extent)
        x, y, extent = x + shift, y + shift, extent + shift
    order = _order_for(extent)
    if curve == "zorder":
        return zorder_index(x, y, order)
    return hilbert_index(x, y, order)


def curve_order(coords: np.ndarray, curve: Curve = "hilbert", *, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Permutation that orders integer points along a curve.

    Every point appears exactly once. Points sharing a cell are ordered by ``tiebreak`` when given, then by their
    input order (stable sort), so the result is deterministic.

    Parameters
    ----------
    coords
        (n, 2) integer coordinates (x, y), non-negative.
    curve
        One of :data:`CURVES` (see :func:`curve_index`).
    tiebreak
        (n,) secondary sort key for points in the same cell (e.g. their position along the curve on a finer grid).

    Returns
    -------
    ``order`` such that ``coords[order]`` runs along the curve.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (n, 2), got {coords.shape}.")
    index = curve_index(coords[:, 0], coords[:, 1], curve)
    if tiebreak is None:
        return np.argsort(index, kind="stable")
    tiebreak = np.asarray(tiebreak)
    if tiebreak.shape != index.shape:
        raise ValueError(f"tiebreak must have shape ({index.size},), got {tiebreak.shape}.")
    return np.lexsort((tiebreak, index))


def grid_curve(height: int, width: int, curve: Curve = "hilbert") -> np.ndarray:
    """All cells of a ``height × width`` grid in curve order, as (height·width, 2) integer (row, col) pairs."""
    if height < 1 or width < 1:
        raise ValueError("height and width must be >= 1.")
    rows, cols = np.divmod(np.arange(height * width, dtype=np.int64), width)
    cells = np.stack([rows, cols], axis=1)
    return cells[curve_order(cells, curve)]


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """Inverse of a permutation: ``inv[perm[i]] = i``."""
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    return inv


def pair_gaps(orders: list[np.ndarray], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Distance along the closest of several curves between the spots of each pair.

    Parameters
    ----------
    orders
        One order per curve (``order[i]`` = the spot at position ``i``), all over the same spots.
    first, second
        Spot indices of the pairs.

    Returns
    -------
    For every pair, ``min`` over the curves of ``|position(first) - position(second)|``.

    Examples
    --------
    >>> import numpy as np
    >>> pair_gaps([np.array([0, 1, 2, 3]), np.array([3, 2, 0, 1])], np.array([0, 0]), np.array([3, 1]))
    array([2, 1])
    """
    positions = [inverse_permutation(order) for order in orders]
    return np.min([np.abs(pos[first] - pos[second]) for pos in positions], axis=0)


def quantize(points: np.ndarray, *, cell_size: float | None = None) -> np.ndarray:
    """Map float 2-D points to non-negative integer grid cells.

    Parameters
    ----------
    points
        (n, 2) coordinates.
    cell_size
        Side of one cell in the units of ``points``. By default ``sqrt(area / n)`` of the bounding box, so that there
        is about one point per occupied cell.

    Returns
    -------
    (n, 2) int64 cells. Several points can share a cell; :func:`curve_order` keeps all of them.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {points.shape}.")
    if not np.all(np.isfinite(points)):
        raise ValueError("points contain NaN or inf.")
    if points.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if cell_size is None:
        cell_size = default_cell_size(points)
    if cell_size <= 0:
        raise ValueError("cell_size must be positive.")
    return np.floor((points - points.min(axis=0)) / cell_size).astype(np.int64)


def default_cell_size(points: np.ndarray) -> float:
    """Side of a grid cell that gives about one point per cell: ``sqrt(area / n)`` of the bounding box.

    Points on a line parallel to an axis get cells of ``length / n`` (about one point per cell along the line).
    """
    points = np.asarray(points, dtype=np.float64)
    span = points.max(axis=0) - points.min(axis=0)
    area = float(np.prod(np.maximum(span, 1e-12)))
    if span.min() <= 0:  # points on a line
        area = float(max(span.max(), 1e-12)) ** 2 / max(points.shape[0], 1)
    return float(np.sqrt(area / points.shape[0])) or 1.0
