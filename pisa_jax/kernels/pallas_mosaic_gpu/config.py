"""Launch parameters of the Mosaic GPU attention kernel and the inputs it takes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pisa_jax.kernels._common import shared_memory_per_block

DTYPES = ("bfloat16", "float16")
BLOCK_SIZES = (64, 128)
MAX_HEAD_DIM = 128


def unsupported(dtype, block_size: int, head_dim: int) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if jnp.dtype(dtype).name not in DTYPES:
        return (f"the Mosaic GPU attention kernel takes bfloat16 or float16 inputs; got "
                f"{jnp.dtype(dtype).name}")
    if block_size not in BLOCK_SIZES:
        return (f"the Mosaic GPU attention kernel takes block_size 64 or 128; got "
                f"{block_size}")
    if head_dim > MAX_HEAD_DIM:
        return (f"the Mosaic GPU attention kernel takes head dims up to {MAX_HEAD_DIM}; "
                f"got D = {head_dim}")
    return None


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """How one CTA of the Mosaic GPU attention kernel is laid out.

    Each CTA runs `query_blocks_per_cta` compute warpgroups (1 or 2), each on its own
    query block with its own stream of key/value tiles; `stages` tiles of keys and values
    per warpgroup are in flight (copied by the tensor memory accelerator) while one is
    consumed. With `ping_pong` the two warpgroups take turns on the tensor cores: one
    runs its softmax while the other's matrix products run.

    At block size 128 a query block needs both compute warpgroups (64 rows each), so
    `query_blocks_per_cta` must stay 2; `ping_pong` makes those two take turns, `stages`
    (default 2) counts the 128-key tiles in flight, and with `persistent` (block 128
    only) the grid is one CTA per multiprocessor, each walking its share of the query
    blocks in turn. Without a config the block-128 kernel takes turns on a persistent
    grid (the fastest measured).
    """

    stages: int = 2
    query_blocks_per_cta: int = 2
    ping_pong: bool = False
    persistent: bool = False

    def __post_init__(self):
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"MosaicConfig.stages: expected a positive int, got {self.stages!r}")
        if self.query_blocks_per_cta not in (1, 2):
            raise ValueError("MosaicConfig.query_blocks_per_cta: expected 1 or 2, got "
                             f"{self.query_blocks_per_cta!r}")
        if not isinstance(self.ping_pong, bool):
            raise ValueError(f"MosaicConfig.ping_pong: expected a bool, got {self.ping_pong!r}")
        if not isinstance(self.persistent, bool):
            raise ValueError(f"MosaicConfig.persistent: expected a bool, got "
                             f"{self.persistent!r}")

    def shared_memory_bytes(self, block_size: int, head_dim: int, itemsize: int,
                            num_selected: int, padded_blocks: int) -> int:
        """Shared memory one CTA asks for (tiles, index and mask rows, the moment)."""
        tile = block_size * head_dim * itemsize
        per_group = (1 + 2 * self.stages) * tile + 4 * num_selected + itemsize * padded_blocks
        return self.query_blocks_per_cta * per_group + head_dim * head_dim * itemsize + 4096


def default_config(block_size: int, head_dim: int, itemsize: int, num_selected: int,
                   padded_blocks: int) -> MosaicConfig:
    """The deepest pipeline (up to 4 stages) that fits two query blocks per CTA."""
    limit = shared_memory_per_block()
    for stages in (4, 3, 2):
        cfg = MosaicConfig(stages=stages)
        if cfg.shared_memory_bytes(block_size, head_dim, itemsize, num_selected,
                                   padded_blocks) <= limit:
            return cfg
    for stages in (4, 3, 2, 1):
        cfg = MosaicConfig(stages=stages, query_blocks_per_cta=1)
        if cfg.shared_memory_bytes(block_size, head_dim, itemsize, num_selected,
                                   padded_blocks) <= limit:
            return cfg
    raise ValueError(
        f"the Mosaic GPU attention kernel needs more shared memory than the device has "
        f"({limit} bytes) for head dim {head_dim}, block size {block_size}, {num_selected} "
        f"selected blocks and {padded_blocks} key blocks; use implementation='triton'")
