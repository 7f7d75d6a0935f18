"""pisa_jax: piecewise sparse attention (PISA) for diffusion transformers in JAX/Pallas."""

from pisa_jax._types import BlockStatistics, Selection
from pisa_jax.api import (block_statistics, dense_attention, piecewise_attention,
                          piecewise_sparse_attention, select_blocks)

__all__ = [
    "BlockStatistics",
    "Selection",
    "block_statistics",
    "dense_attention",
    "piecewise_attention",
    "piecewise_sparse_attention",
    "select_blocks",
]
__version__ = "0.1.0"

from pisa_jax.nn import Attention, AttentionPolicy, layer_policies, model_policies  # noqa: E402

__all__ += ["Attention", "AttentionPolicy", "layer_policies", "model_policies"]
