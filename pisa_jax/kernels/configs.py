"""Launch parameters per shape.

Keys are (head dim after padding, block size, bytes per element). The entry for D = 128,
block 64, half types was chosen by the sweep in benchmarks/RESULTS.md on an H200 (4 warps
beat 8 by 1.5-2x; 2 and 3 stages tie; 4 stages lose 30%). The other entries and the
defaults follow from it (8 warps for 128-row tiles) and have not been swept.
"""

from __future__ import annotations

import jax.numpy as jnp

from pisa_jax.kernels._common import LaunchConfig, supported_head_dim

_ATTENTION = {
    (128, 64, 2): LaunchConfig(num_warps=4, num_stages=2),      # swept
    (128, 128, 2): LaunchConfig(num_warps=8, num_stages=2),
    (64, 64, 2): LaunchConfig(num_warps=4, num_stages=2),
    (64, 128, 2): LaunchConfig(num_warps=4, num_stages=2),
}
_STATISTICS = {   # timed at these settings (1-2% of the whole op), not swept
    (128, 64): LaunchConfig(num_warps=8, num_stages=2),
    (128, 128): LaunchConfig(num_warps=8, num_stages=2),
}


# Shared memory per multiprocessor on Hopper is 227 KiB: tiles of float32 at 128 x 128 do
# not fit twice (double buffering of k and v), so such shapes run unpipelined.
_TILE_BYTES_FOR_ONE_STAGE = 64 * 1024


def _stages(head_dim: int, block_size: int, itemsize: int, stages: int) -> int:
    big = supported_head_dim(head_dim) * block_size * itemsize >= _TILE_BYTES_FOR_ONE_STAGE
    return 1 if big else stages


def attention_config(head_dim: int, block_size: int, dtype) -> LaunchConfig:
    itemsize = jnp.dtype(dtype).itemsize
    key = (supported_head_dim(head_dim), block_size, itemsize)
    cfg = _ATTENTION.get(key, LaunchConfig(num_warps=4 if block_size <= 64 else 8))
    return LaunchConfig(cfg.num_warps, _stages(head_dim, block_size, itemsize, cfg.num_stages))


def statistics_config(head_dim: int, block_size: int, dtype) -> LaunchConfig:
    itemsize = jnp.dtype(dtype).itemsize
    cfg = _STATISTICS.get((supported_head_dim(head_dim), block_size), LaunchConfig())
    return LaunchConfig(cfg.num_warps, _stages(head_dim, block_size, itemsize, cfg.num_stages))
