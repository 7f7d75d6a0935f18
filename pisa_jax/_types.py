"""The two values passed between PISA's stages: block statistics and a selection."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockStatistics:
    """Per-block summaries of one attention call's q, k, v (layout-free: `[B, H, ...]`).

    Attributes:
      q_mean: `[B, H, NT, D]` block-mean queries (float32, float64 for float64 input).
      k_mean: `[B, H, NT, D]` block-mean keys.
      v_sum: `[B, H, NT, D]` block-sum values (a sum, not a mean).
      moment: `[B, H, D, D]` the global first moment `H = sum_j sum_n (k_n - kc_j)^T v_n`.
      moment_norms: `[B, H, NT]` `||H_j||_F` per block, or None when not asked for.
      num_tokens: T, the sequence length (static).
      block_size: tokens per block (static).
    """

    q_mean: Array
    k_mean: Array
    v_sum: Array
    moment: Array
    moment_norms: Array | None
    num_tokens: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_blocks(self) -> int:
        return self.q_mean.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """Which key blocks each query block attends to exactly.

    Attributes:
      indices: `[B, H, NT, K]` int32 key-block indices per query block (distinct).
      num_blocks: NT (static).
    """

    indices: Array
    num_blocks: int = dataclasses.field(metadata=dict(static=True))

    def mask(self) -> Array:
        """`[B, H, NT, NT]` bool: `mask[..., i, j]` is True when block j is in `S_i`."""
        empty = jnp.zeros(self.indices.shape[:-1] + (self.num_blocks,), jnp.bool_)
        return jnp.put_along_axis(empty, self.indices, True, axis=-1, inplace=False)
