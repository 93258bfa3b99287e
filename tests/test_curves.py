"""Space-filling curves: bijection onto any grid, adjacency of the Hilbert curve, quantiser."""

import numpy as np
import pytest

from dfmamba_st.core import curves


@pytest.mark.parametrize("curve", curves.CURVES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (13, 7), (78, 128)])
def test_curve_is_a_bijection_onto_the_grid(curve, shape):
    cells = curves.grid_curve(*shape, curve=curve)
    assert cells.shape == (shape[0] * shape[1], 2)
    flat = cells[:, 0] * shape[1] + cells[:, 1]
    assert np.array_equal(np.sort(flat), np.arange(shape[0] * shape[1]))


@pytest.mark.parametrize("side", [2, 4, 16, 64])
@pytest.mark.parametrize("curve", ["hilbert", "hilbert_t"])
def test_hilbert_steps_between_grid_neighbours_on_power_of_two_squares(side, curve):
    cells = curves.grid_curve(side, side, curve=curve)
    steps = np.abs(np.diff(cells, axis=0)).sum(axis=1)
    assert np.all(steps == 1)


def test_zorder_is_bit_interleaving_and_not_adjacent():
    assert curves.zorder_index(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 1).tolist() == [0, 2, 1, 3]
    cells = curves.grid_curve(8, 8, curve="zorder")
    assert np.abs(np.diff(cells, axis=0)).sum(axis=1).max() > 1


def test_hilbert_order_one_and_two_known_values():
    assert curves.hilbert_index([0, 0, 1, 1], [0, 1, 1, 0], 1).tolist() == [0, 1, 2, 3]
    # order 2 by hand from order 1: the lower-left quadrant transposed, (0,0) (1,0) (1,1) (0,1); the upper-left and
    # upper-right as order 1, (0,2) (0,3) (1,3) (1,2) and (2,2) (2,3) (3,3) (3,2); the lower-right reflected on the
    # other diagonal, (3,1) (2,1) (2,0) (3,0). Listed here by x, then y:
    d = curves.hilbert_index(np.arange(4).repeat(4), np.tile(np.arange(4), 4), 2)
    assert d.tolist() == [0, 3, 4, 5, 1, 2, 7, 6, 14, 13, 8, 9, 15, 12, 11, 10]


def test_transposed_curve_is_the_hilbert_curve_of_swapped_axes():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 50, size=(200, 2))
    a = curves.curve_index(pts[:, 0], pts[:, 1], "hilbert_t")
    b = curves.curve_index(pts[:, 1], pts[:, 0], "hilbert")
    assert np.array_equal(a, b)


def test_shifted_curve_is_the_hilbert_curve_of_the_grid_moved_by_a_third_of_its_square():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 50, size=(200, 2))
    extent = pts.max() + 1  # 50 → square side 64, shift 64 // 3 = 21 = 0b10101
    shift = 21
    order = int(np.ceil(np.log2(extent + shift)))
    expected = curves.hilbert_index(pts[:, 0] + shift, pts[:, 1] + shift, order)
    assert np.array_equal(curves.curve_index(pts[:, 0], pts[:, 1], "hilbert_s"), expected)
    expected_t = curves.hilbert_index(pts[:, 1] + shift, pts[:, 0] + shift, order)
    assert np.array_equal(curves.curve_index(pts[:, 0], pts[:, 1], "hilbert_ts"), expected_t)


def _far_neighbour_share(side: int, names: tuple[str, ...], window: int) -> float:
    """Share of the 4-neighbour pairs of a ``side``² grid more than ``window`` steps apart along every curve."""
    cells = np.stack(np.divmod(np.arange(side * side), side), axis=1)
    idx = np.arange(side * side).reshape(side, side)
    pairs = np.concatenate(
        [np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1), np.stack([idx[:-1].ravel(), idx[1:].ravel()], 1)]
    )
    gap = curves.pair_gaps([curves.curve_order(cells, c) for c in names], pairs[:, 0], pairs[:, 1])
    return float(np.mean(gap > window))


def test_a_shifted_curve_joins_what_the_quadtree_lines_split():
    # the transposed curve has the same quadtree lines as the Hilbert curve: pairs across them stay far apart on
    # both; the shifted curve moves the lines, so nearly every neighbour pair is close on one of the two curves
    transposed = _far_neighbour_share(64, ("hilbert", "hilbert_t"), 16)
    shifted = _far_neighbour_share(64, ("hilbert", "hilbert_s"), 16)
    assert transposed > 0.08
    assert shifted < 0.03
    # the shift is odd: a pair split between two 2 × 2 blocks of one curve shares a block of the other (≤ 3 steps)
    assert _far_neighbour_share(64, ("hilbert", "hilbert_s"), 3) == 0.0
    assert _far_neighbour_share(64, ("hilbert", "hilbert_t"), 3) > 0.2
    assert _far_neighbour_share(64, ("hilbert",), 16) > transposed


def test_inverse_permutation():
    perm = np.random.default_rng(1).permutation(100)
    inv = curves.inverse_permutation(perm)
    assert np.array_equal(perm[inv], np.arange(100))
    assert np.array_equal(inv[perm], np.arange(100))


def test_curve_order_keeps_duplicates_deterministically():
    coords = np.array([[3, 3], [0, 0], [3, 3], [0, 0], [1, 0]])
    order = curves.curve_order(coords)
    assert sorted(order.tolist()) == list(range(5))
    assert order.tolist() == curves.curve_order(coords).tolist()
    # ties keep their input order
    assert order.tolist().index(1) < order.tolist().index(3)
    assert order.tolist().index(0) < order.tolist().index(2)


def test_quantize_keeps_every_point_and_preserves_locality():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1000, size=(500, 2))
    cells = curves.quantize(pts)
    assert cells.shape == (500, 2) and cells.min() >= 0
    # about one point per cell on average
    assert 0.5 < len({tuple(c) for c in cells}) / 500 <= 1.0
    # the ordering of points along x is preserved by their cells
    assert np.all(np.diff(cells[np.argsort(pts[:, 0]), 0]) >= 0)
    assert np.array_equal(curves.quantize(pts, cell_size=100.0), np.floor((pts - pts.min(0)) / 100.0))


def test_points_on_a_line_get_about_one_point_per_cell_along_it():
    """A bounding box of zero area (points on a line parallel to an axis): cells of length / n, as documented."""
    line = np.stack([np.linspace(0.0, 90.0, 10), np.full(10, 5.0)], axis=1)  # 10 points 10 apart along x
    assert curves.default_cell_size(line) == pytest.approx(9.0)
    cells = curves.quantize(line)
    assert len({tuple(c) for c in cells}) == 10 and cells[:, 1].max() == 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="whole numbers"):
        curves.curve_order(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        curves.quantize(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="Unknown curve"):
        curves.curve_index([0], [0], "peano")


def test_pair_gaps_takes_the_closest_curve():
    # positions along curve a: spot i at i; along curve b: spot 3 at 0, 2 at 1, 0 at 2, 1 at 3
    a, b = np.array([0, 1, 2, 3]), np.array([3, 2, 0, 1])
    first, second = np.array([0, 0, 1, 2]), np.array([3, 1, 2, 3])
    # pair (0, 3): 3 on a, 2 on b; (0, 1): 1 and 1; (1, 2): 1 and 2; (2, 3): 1 and 1
    np.testing.assert_array_equal(curves.pair_gaps([a, b], first, second), [2, 1, 1, 1])
    np.testing.assert_array_equal(curves.pair_gaps([a], first, second), [3, 1, 1, 1])


def test_curve_order_sorts_by_curve_index_first_and_tiebreak_second():
    """C1: the tiebreak only orders points of one cell."""
    coords = np.array([[1, 1], [0, 0], [0, 0], [1, 0]])
    index = curves.curve_index(coords[:, 0], coords[:, 1])
    order = curves.curve_order(coords, tiebreak=np.array([0, 5, 1, 9]))
    assert np.all(np.diff(index[order]) >= 0)
    assert order[:2].tolist() == [2, 1]
