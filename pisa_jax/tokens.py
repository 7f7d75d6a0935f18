"""Token orders: tile-major order of a 2D token grid, so that one block is one spatial tile."""

from __future__ import annotations

import jax.numpy as jnp


def tile_shape(block_size: int) -> tuple[int, int]:
    """A tile of `block_size` tokens, as square as a power of two allows (8 x 8 for 64)."""
    th = 1 << (block_size.bit_length() - 1) // 2
    return th, block_size // th


def tile_major_key(rows, cols, num_cols, block_size: int = 64):
    """Sort key putting tokens tile by tile, row-major inside each tile.

    Works on NumPy or (traced) JAX integer arrays. Tiles at the right and bottom edges
    of a grid whose sides are not multiples of the tile may be partial.
    """
    th, tw = tile_shape(block_size)
    tiles_per_row = (num_cols + tw - 1) // tw
    return (((rows // th) * tiles_per_row + cols // tw) * (th * tw)
            + (rows % th) * tw + cols % tw)


def tile_major_permutation(rows, cols, block_size: int = 64):
    """Indices that reorder raster tokens `[..., L]` into tile-major order (last axis)."""
    rows = jnp.asarray(rows, jnp.int32)
    cols = jnp.asarray(cols, jnp.int32)
    num_cols = jnp.max(cols, axis=-1, keepdims=True) + 1
    return jnp.argsort(tile_major_key(rows, cols, num_cols, block_size), axis=-1, stable=True)
