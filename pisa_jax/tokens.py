"""Token orders: tile-major order of a 2D or 3D token grid, so that one block is one tile.

PISA works on blocks of consecutive tokens. Putting the tokens of an image (2D grid) or a
video (frames x height x width) in tile-major order makes each block a compact tile of
the grid, so a block's mean key stands for a neighbourhood and its selection is local.

Two forms:
  * `tile_major_key` / `tile_major_permutation`: 2D, from token coordinates that may be
    traced (FLUX reads them from its position ids); tiles at the edges may be partial
    and are kept in place, in raster order of the tiles.
  * `tile_order` / `grid_tile_key`: any number of axes, for a grid whose shape is known
    when tracing. With `full_tiles_first` (the default of `tile_order`) the full tiles
    come first and the tokens of the partial edge tiles last, so every full tile is
    exactly one block whatever the grid size; the other order lets a partial tile shift
    every later tile across a block boundary.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def tile_shape(block_size: int) -> tuple[int, int]:
    """A 2D tile of `block_size` tokens, as square as a power of two allows (8 x 8 for 64)."""
    th = 1 << (block_size.bit_length() - 1) // 2
    return th, block_size // th


def check_tile(tile: Sequence[int], block_size: int | None = None, *,
               name: str = "tile") -> tuple[int, ...]:
    """`tile` as a tuple of positive ints; with `block_size`, its volume must equal it."""
    # A string is a sequence too ("64" would read as (6, 4)), and 2.5 must not become 2.
    is_sequence = hasattr(tile, "__iter__") and not isinstance(tile, (str, bytes))
    items = tuple(tile) if is_sequence else None
    if items is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                for t in items):
        raise TypeError(f"{name} must be a sequence of ints; got {tile!r}")
    tile = tuple(int(t) for t in items)
    if not tile or any(t < 1 for t in tile):
        raise ValueError(f"{name} must hold positive sizes; got {tile}")
    if block_size is not None and math.prod(tile) != block_size:
        raise ValueError(f"{name} {tile} holds {math.prod(tile)} tokens; one block holds "
                         f"{block_size}, and a tile must fill exactly one block")
    return tile


def grid_tile_key(coords: Sequence, grid: Sequence, tile: Sequence[int], *,
                  full_tiles_first: bool = False):
    """Sort key putting grid tokens tile by tile, raster order inside each tile.

    Args:
      coords: one integer array per axis (NumPy or traced JAX), the tokens' coordinates.
      grid: the grid's size per axis (ints or arrays); the first axis's size is only used
        with `full_tiles_first`.
      tile: the tile's size per axis.
      full_tiles_first: put the tokens of partial edge tiles after all full tiles.
    """
    tile_index, offset = 0, 0
    for a, (c, g, t) in enumerate(zip(coords, grid, tile)):
        tile_index = (tile_index * ((g + t - 1) // t) if a else 0) + c // t
        offset = offset * t + c % t
    volume = math.prod(tile)
    key = tile_index * volume + offset
    if full_tiles_first:
        partial = sum(c >= (g // t) * t for c, g, t in zip(coords, grid, tile)) > 0
        num_tiles = math.prod((g + t - 1) // t for g, t in zip(grid, tile))
        key = key + partial * (num_tiles * volume)
    return key


def tile_major_key(rows, cols, num_cols, block_size: int = 64):
    """2D sort key putting tokens tile by tile (`tile_shape(block_size)` tiles), row-major
    inside each tile.

    Works on NumPy or (traced) JAX integer arrays. Tiles at the right and bottom edges
    of a grid whose sides are not multiples of the tile may be partial.
    """
    return grid_tile_key((rows, cols), (None, num_cols), tile_shape(block_size))


def tile_major_permutation(rows, cols, block_size: int = 64):
    """Indices that reorder raster tokens `[..., L]` into tile-major order (last axis)."""
    rows = jnp.asarray(rows, jnp.int32)
    cols = jnp.asarray(cols, jnp.int32)
    num_cols = jnp.max(cols, axis=-1, keepdims=True) + 1
    return jnp.argsort(tile_major_key(rows, cols, num_cols, block_size), axis=-1, stable=True)


def tile_order(grid: Sequence[int], tile: Sequence[int], *,
               full_tiles_first: bool = True) -> np.ndarray:
    """Raster index of the token at each position of the tile-major order (int32 `[L]`).

    `grid` and `tile` have one size per axis (e.g. frames, height, width). Gather raster
    tokens with it (`x[:, order]`) and restore raster order with `np.argsort(order)`.
    Raises ValueError if `tile` and `grid` differ in length or hold a size below 1.
    """
    grid = check_tile(grid, name="grid")
    tile = check_tile(tile)
    if len(grid) != len(tile):
        raise ValueError(f"tile {tile} must have one size per grid axis; grid is {grid}")
    coords = np.unravel_index(np.arange(math.prod(grid)), grid)
    key = grid_tile_key(coords, grid, tile, full_tiles_first=full_tiles_first)
    return np.argsort(key, kind="stable").astype(np.int32)
