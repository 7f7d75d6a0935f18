"""Tile-major token orders of 2D and 3D grids (pisa_jax.tokens), partial tiles included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pisa_jax.tokens import check_tile, tile_major_key, tile_major_permutation, tile_order


def _loop_order(grid, tile):
    """Tile-major order written as nested loops: tiles in raster order, raster inside."""
    ranges = [range(0, g, t) for g, t in zip(grid, tile)]
    order = []
    for start in itertools.product(*ranges):
        inner = [range(s, min(s + t, g)) for s, t, g in zip(start, tile, grid)]
        order += [np.ravel_multi_index(c, grid) for c in itertools.product(*inner)]
    return np.array(order)


@pytest.mark.parametrize("rows,cols,block", [(13, 21, 64), (20, 12, 64), (7, 33, 128), (16, 16, 64)])
def test_2d_permutation_is_the_loop_order_with_partial_tiles_in_place(rows, cols, block):
    r, c = np.divmod(np.arange(rows * cols), cols)
    tile = (8, 8) if block == 64 else (8, 16)
    expected = _loop_order((rows, cols), tile)
    np.testing.assert_array_equal(np.asarray(tile_major_permutation(r, c, block)), expected)
    np.testing.assert_array_equal(np.argsort(tile_major_key(r, c, cols, block), kind="stable"),
                                  expected)
    np.testing.assert_array_equal(tile_order((rows, cols), tile, full_tiles_first=False),
                                  expected)


@pytest.mark.parametrize("grid,tile", [((3, 5, 7), (2, 2, 4)), ((9, 13, 10), (4, 4, 4)),
                                       ((3, 21, 20), (1, 8, 8)), ((5, 9, 13), (2, 4, 8))])
def test_3d_order_round_trips_and_puts_full_tiles_first(grid, tile):
    n = int(np.prod(grid))
    order = tile_order(grid, tile)
    assert order.dtype == np.int32 and sorted(order) == list(range(n))
    x = np.random.default_rng(0).standard_normal(n)
    np.testing.assert_array_equal(x[order][np.argsort(order)], x)
    # Every block of prod(tile) tokens before the partial ones is one compact full tile.
    volume = int(np.prod(tile))
    full = int(np.prod([g // t for g, t in zip(grid, tile)]))
    coords = np.stack(np.unravel_index(order, grid), -1)
    for blk in range(full):
        c = coords[blk * volume:(blk + 1) * volume]
        assert (c.max(0) - c.min(0) + 1).tolist() == list(tile)
        assert (c.min(0) % np.array(tile) == 0).all()
    # The partial tiles' tokens come last and keep tile-major order among themselves.
    rest = coords[full * volume:]
    assert (rest >= (np.array(grid) // tile) * tile).any(-1).all()
    loop = _loop_order(grid, tile)
    in_partial = np.isin(loop, order[full * volume:])
    np.testing.assert_array_equal(order[full * volume:], loop[in_partial])


def test_3d_order_without_full_tiles_first_is_the_loop_order():
    np.testing.assert_array_equal(tile_order((3, 5, 7), (2, 2, 4), full_tiles_first=False),
                                  _loop_order((3, 5, 7), (2, 2, 4)))


def test_bad_tiles_are_refused_with_names():
    with pytest.raises(ValueError, match=r"tile \(4, 4, 2\) holds 32 tokens; one block holds 64"):
        check_tile((4, 4, 2), 64)
    with pytest.raises(ValueError, match="one size per grid axis"):
        tile_order((3, 5, 7), (8, 8))
    with pytest.raises(ValueError, match="positive"):
        tile_order((3, 0, 7), (1, 8, 8))
    with pytest.raises(TypeError, match="sequence of ints"):
        check_tile("abc")


@pytest.mark.parametrize("tile", ["64", (2.5, 4), (True, 8), 64, None])
def test_tiles_that_are_not_int_sequences_are_refused_not_converted(tile):
    # "64" would otherwise read as (6, 4) and 2.5 as 2.
    with pytest.raises(TypeError, match=r"tile must be a sequence of ints; got"):
        check_tile(tile)


def test_int_like_tile_sizes_are_taken():
    assert check_tile(np.array([2, 4, 8]), 64) == (2, 4, 8)
    assert check_tile([np.int64(8), 8]) == (8, 8)
