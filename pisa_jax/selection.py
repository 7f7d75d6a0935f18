"""Block selection (PISA_SPEC section 2): pooled scores, optional bias, forced blocks, top-k.

Plain XLA, shared by every implementation: it works on the `[NT, NT]` block level,
a small fraction of the attention's cost (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pisa_jax._blocks import selection_size
from pisa_jax._types import BlockStatistics, Selection


# Block pairs scored at a time: 4 heads at wan-720p (NT = 1184), all heads up to NT ~ 500.
_SCORE_ELEMENTS = 6 << 20
# Below this many blocks per row XLA's sort-based top-k is the faster one (H200: 0.055 vs
# 0.071 ms for the whole selection at NT = 72; the kernel wins from NT = 264 on).
_TOP_K_KERNEL_MIN_BLOCKS = 128


def block_scores(stats: BlockStatistics, scale: float, use_bias: bool) -> jax.Array:
    """`[B, H, NT, NT]` pooled scores `s * qc_i . kc_j` (+ `log(||H_j||_F + 1e-5)`)."""
    scores = scale * jnp.einsum("bhid,bhjd->bhij", stats.q_mean, stats.k_mean,
                               precision=jax.lax.Precision.HIGHEST)
    if use_bias:
        if stats.moment_norms is None:
            raise ValueError(
                "use_bias=True needs the block statistics' moment_norms; compute the "
                "statistics with with_norms=True (got moment_norms=None)")
        scores = scores + jnp.log(stats.moment_norms + 1e-5)[:, :, None, :]
    return scores


def select_from_statistics(
    stats: BlockStatistics,
    *,
    density: float,
    scale: float,
    use_bias: bool,
    forced_blocks: Sequence[int] = (),
    top_k_kernel: bool = False,
    interpret: bool = False,
) -> Selection:
    """Top-k key blocks per query block; forced blocks always in and using up slots.

    Ranks with `lax.top_k` (indices by descending score), or with `top_k_kernel` the
    Triton top-k kernel (the same set, indices in ascending block order) from
    `_TOP_K_KERNEL_MIN_BLOCKS` blocks per row on, with `lax.top_k` below that.
    """
    nt = stats.num_blocks
    b, h = stats.q_mean.shape[:2]
    forced = tuple(sorted(set(forced_blocks)))
    k = selection_size(density, nt, len(forced))

    def top_blocks(part: BlockStatistics) -> jax.Array:
        scores = block_scores(part, scale, use_bias)
        if forced:
            # +inf ranks forced blocks first without changing the order of the others.
            scores = scores.at[..., jnp.asarray(forced)].set(jnp.inf)
        if top_k_kernel and nt >= _TOP_K_KERNEL_MIN_BLOCKS:
            from pisa_jax.kernels.pallas_triton.top_k import top_k_indices
            return top_k_indices(scores, k, interpret=interpret)
        return jax.lax.top_k(scores, k)[1].astype(jnp.int32)

    # The [NT, NT] scores of all heads at once would be large for long sequences
    # (224 MB at 75k tokens and 40 heads): score at most 6M block pairs (25 MB) at a time.
    heads_per_step = max(1, min(b * h, _SCORE_ELEMENTS // (nt * nt)))
    if heads_per_step >= b * h:
        return Selection(indices=top_blocks(stats), num_blocks=nt)
    flat = jax.tree.map(lambda x: x.reshape((b * h, 1, 1) + x.shape[2:]), stats)
    indices = jax.lax.map(top_blocks, flat, batch_size=heads_per_step)
    return Selection(indices=indices.reshape(b, h, nt, k), num_blocks=nt)
