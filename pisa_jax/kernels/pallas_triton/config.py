"""Launch parameters of the Triton kernels, per shape, and the inputs they take.

Keys are (head dim after padding, block size, bytes per element). The entries for D = 128,
block 64, half types were chosen by the sweeps in benchmarks/RESULTS.md on an H200:
attention 4 warps (8 lose 1.5-2x), 3 stages with the index row read once as a vector
(6% faster than 2 stages with scalar index loads at flux-2048 and wan-720p, equal at
seq-32k), one key block per step (two gathered blocks per step lose 25-30%), zeroth-order
chunks of 64 blocks (128 lose 40%); statistics 8 warps, 3 stages (15-20% faster than 2).
Attention with block size 128 (bf16): 8 warps, 3 stages (2% faster than 2 stages at
flux-2048 and seq-32k; Pallas flash attention with 128 x 128 tiles runs 24% faster with 3
stages than with 2). The other entries follow from these and have not been swept.
Pipeline stages are capped so that the tiles in flight fit in the device's shared memory.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pisa_jax.kernels._common import shared_memory_per_block

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Triton launch parameters of one kernel.

    `zeroth_chunk` is read by the attention kernel only: the zeroth-order pass visits
    block summaries `zeroth_chunk` at a time (a power of two). With
    `indices_in_registers` the exact path reads its index list once as a vector instead
    of one scalar load per step.

    The statistics kernel reads one more: `blocks_per_program` (0: the rule in
    `block_statistics`) fixes how many blocks one program reduces.
    """

    num_warps: int = 4
    num_stages: int = 2
    zeroth_chunk: int = 64
    indices_in_registers: bool = False
    blocks_per_program: int = 0

    def __post_init__(self):
        for name in ("num_warps", "num_stages", "zeroth_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name}: expected a positive int, got {value!r}")
        if self.zeroth_chunk & (self.zeroth_chunk - 1):
            raise ValueError(f"LaunchConfig.zeroth_chunk: expected a power of two, got "
                             f"{self.zeroth_chunk}")
        if not isinstance(self.indices_in_registers, bool):
            raise ValueError("LaunchConfig.indices_in_registers: expected a bool, got "
                             f"{self.indices_in_registers!r}")
        if (isinstance(self.blocks_per_program, bool) or not isinstance(self.blocks_per_program, int)
                or self.blocks_per_program < 0):
            raise ValueError("LaunchConfig.blocks_per_program: expected an int >= 0 (0: the "
                             f"default rule), got {self.blocks_per_program!r}")


def supported_head_dim(d: int) -> int:
    """Triton tiles need power-of-two sizes: head dims are zero-padded up to one."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Pallas kernels take head dims up to {MAX_HEAD_DIM}; got D = {d}")
    return max(16, pl.next_power_of_2(d))


def unsupported(dtype, block_size: int, head_dim: int, interpret: bool) -> str | None:
    """Why the Triton kernels cannot take these inputs (dtype aside), or None."""
    if head_dim > MAX_HEAD_DIM:
        return f"the Pallas kernels take head dims up to {MAX_HEAD_DIM}; got D = {head_dim}"
    if not interpret and block_size > 64 and jnp.dtype(dtype).itemsize > 2:
        return (f"the Pallas attention kernel on GPU takes block_size 128 only for "
                f"bfloat16/float16 inputs (float32 tiles of 128 x {head_dim} did not build in "
                f"reasonable time); got {jnp.dtype(dtype).name} with block_size {block_size}")
    return None


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

# Shared memory Triton's own buffers need beyond the pipelined tiles (200 of Hopper's
# 227 KiB for tiles built every config swept).
_COMPILER_RESERVE = 27 * 1024


def smem_budget() -> int:
    """Bytes of shared memory per program for pipelined tiles, from the device's size."""
    return shared_memory_per_block() - _COMPILER_RESERVE


def _fit_stages(stages: int, resident_bytes: int, bytes_per_stage: int, itemsize: int) -> int:
    # Triton's pipeliner keeps `num_stages - 1` tiles in flight while one is consumed.
    # Float32 tiles have not been swept and keep at most 2 stages.
    cap = stages if itemsize <= 2 else min(stages, 2)
    return max(1, min(cap, 1 + (smem_budget() - resident_bytes) // bytes_per_stage))


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
