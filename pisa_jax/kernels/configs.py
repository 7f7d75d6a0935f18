"""Launch parameters per shape.

Keys are (head dim after padding, block size, bytes per element). The entries for D = 128,
block 64, half types were chosen by the sweeps in benchmarks/RESULTS.md on an H200:
attention 4 warps (8 lose 1.5-2x), 3 stages with the index row read once as a vector
(6% faster than 2 stages with scalar index loads at flux-2048 and wan-720p, equal at
seq-32k), one key block per step (two gathered blocks per step lose 25-30%), zeroth-order
chunks of 64 blocks (128 lose 40%); statistics 8 warps, 3 stages (15-20% faster than 2).
Attention with block size 128 (bf16): 8 warps, 3 stages (2% faster than 2 stages at
flux-2048 and seq-32k; Pallas flash attention with 128 x 128 tiles runs 24% faster with 3
stages than with 2). The other entries follow from these and have not been swept.
Pipeline stages are capped so that the tiles in flight fit in Hopper's shared memory.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pisa_jax.kernels._common import LaunchConfig, supported_head_dim

_ATTENTION = {
    (128, 64, 2): LaunchConfig(num_warps=4, num_stages=3, indices_in_registers=True),  # swept
    (128, 128, 2): LaunchConfig(num_warps=8, num_stages=3),
    (64, 64, 2): LaunchConfig(num_warps=4, num_stages=3, indices_in_registers=True),
    (64, 128, 2): LaunchConfig(num_warps=4, num_stages=2),
}
_STATISTICS = {
    (128, 64): LaunchConfig(num_warps=8, num_stages=3),    # swept
    (128, 128): LaunchConfig(num_warps=8, num_stages=2),
}

# Shared memory for pipelined tiles per program (Hopper has 227 KiB per multiprocessor;
# the rest is left to the compiler's own buffers).
_SMEM_BUDGET = 200 * 1024


def _fit_stages(stages: int, resident_bytes: int, bytes_per_stage: int, itemsize: int) -> int:
    # Triton's pipeliner keeps `num_stages - 1` tiles in flight while one is consumed.
    # Float32 tiles have not been swept and keep at most 2 stages.
    cap = stages if itemsize <= 2 else min(stages, 2)
    return max(1, min(cap, 1 + (_SMEM_BUDGET - resident_bytes) // bytes_per_stage))


def attention_config(head_dim: int, block_size: int, dtype) -> LaunchConfig:
    itemsize = jnp.dtype(dtype).itemsize
    d = supported_head_dim(head_dim)
    cfg = _ATTENTION.get((d, block_size, min(itemsize, 2)),
                         LaunchConfig(num_warps=4 if block_size <= 64 else 8))
    tile = block_size * d * itemsize          # q stays resident; k and v per stage
    return dataclasses.replace(cfg, num_stages=_fit_stages(cfg.num_stages, tile, 2 * tile,
                                                               itemsize))


def statistics_config(head_dim: int, block_size: int, dtype) -> LaunchConfig:
    itemsize = jnp.dtype(dtype).itemsize
    d = supported_head_dim(head_dim)
    cfg = _STATISTICS.get((d, block_size), LaunchConfig())
    tile = block_size * d * itemsize          # q, k and v per stage
    return dataclasses.replace(cfg, num_stages=_fit_stages(cfg.num_stages, 0, 3 * tile,
                                                               itemsize))
