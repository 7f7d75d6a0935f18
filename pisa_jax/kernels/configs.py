"""Launch parameters per shape, measured on an H200 (see benchmarks/RESULTS.md).

Keys are (head dim after padding, block size, bytes per element). Shapes not in the
table get a conservative default.
"""

from __future__ import annotations

import jax.numpy as jnp

from pisa_jax.kernels._common import LaunchConfig, supported_head_dim

_ATTENTION = {
    (128, 64, 2): LaunchConfig(num_warps=4, num_stages=2),
    (128, 128, 2): LaunchConfig(num_warps=8, num_stages=2),
    (64, 64, 2): LaunchConfig(num_warps=4, num_stages=2),
    (64, 128, 2): LaunchConfig(num_warps=4, num_stages=2),
}
_STATISTICS = {
    (128, 64): LaunchConfig(num_warps=8, num_stages=2),
    (128, 128): LaunchConfig(num_warps=8, num_stages=2),
}


def attention_config(head_dim: int, block_size: int, dtype) -> LaunchConfig:
    key = (supported_head_dim(head_dim), block_size, jnp.dtype(dtype).itemsize)
    return _ATTENTION.get(key, LaunchConfig(num_warps=4 if block_size <= 64 else 8,
                                            num_stages=2))


def statistics_config(head_dim: int, block_size: int) -> LaunchConfig:
    key = (supported_head_dim(head_dim), block_size)
    return _STATISTICS.get(key, LaunchConfig(num_warps=4, num_stages=2))
