"""Block bookkeeping shared by the reference, the kernels and the tests.

Everything about how a sequence is cut into blocks lives here, once: the block
count, each block's length (only the last one can be short), the selection size
for a density, padding to whole blocks and the two memory layouts.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import Array

LAYOUTS = ("bthd", "bhtd")


def ceil_div(a: int, b: int) -> int:
    """`ceil(a / b)` for positive integers, without floating point."""
    return -(-a // b)


def num_blocks(num_tokens: int, block_size: int) -> int:
    """`NT = ceil(T / bs)`."""
    return ceil_div(num_tokens, block_size)


def block_lengths(num_tokens: int, block_size: int) -> np.ndarray:
    """Tokens in each block, `[NT]` int32; only the last block can be shorter."""
    nt = num_blocks(num_tokens, block_size)
    lengths = np.full((nt,), block_size, dtype=np.int32)
    lengths[-1] = num_tokens - (nt - 1) * block_size
    return lengths


def top_k_count(density: float, nt: int) -> int:
    """Selected key blocks per query block: `max(1, floor(density * NT))`."""
    return max(1, int(density * nt))


def selection_size(density: float, nt: int, num_forced: int) -> int:
    """Forced blocks use up slots; when there are more of them than slots, all stay."""
    return min(nt, max(top_k_count(density, nt), num_forced))


def token_axis(layout: str) -> int:
    """Axis of T in a 4D array of `layout` ("bthd": 1, "bhtd": 2)."""
    return 1 if layout == "bthd" else 2


def head_axis(layout: str) -> int:
    """Axis of H in a 4D array of `layout` ("bthd": 2, "bhtd": 1)."""
    return 3 - token_axis(layout)


def to_bhtd(x: Array, layout: str) -> Array:
    return jnp.swapaxes(x, 1, 2) if layout == "bthd" else x


def from_bhtd(x: Array, layout: str) -> Array:
    return jnp.swapaxes(x, 1, 2) if layout == "bthd" else x


def pad_tokens(x: Array, multiple: int, layout: str) -> Array:
    """Zero-pads the token axis up to a multiple of `multiple` (no-op when whole)."""
    axis = token_axis(layout)
    t = x.shape[axis]
    extra = ceil_div(t, multiple) * multiple - t
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def default_scale(head_dim: int, scale: float | None) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)
