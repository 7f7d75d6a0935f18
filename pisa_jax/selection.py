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
) -> Selection:
    """Top-k key blocks per query block; forced blocks always in and using up slots."""
    nt = stats.num_blocks
    scores = block_scores(stats, scale, use_bias)
    forced = tuple(sorted(set(forced_blocks)))
    if forced:
        # +inf ranks forced blocks first without changing the order of the others.
        scores = scores.at[..., jnp.asarray(forced)].set(jnp.inf)
    k = selection_size(density, nt, len(forced))
    _, indices = jax.lax.top_k(scores, k)
    return Selection(indices=indices.astype(jnp.int32), num_blocks=nt)
