"""Flax NNX attention module running PISA (or dense attention) under a per-layer policy.

Inference only: the Pallas kernels have no backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from pisa_jax._blocks import num_blocks
from pisa_jax._checks import ORDERS, check_block_size, check_choice, check_density
from pisa_jax.api import dense_attention, piecewise_sparse_attention

KINDS = ("pisa", "dense")


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
    """How one attention layer attends.

    Attributes:
      kind: "pisa" or "dense".
      density, order, use_bias, block_size: PISA options (see `piecewise_sparse_attention`).
      exact_text: keep the blocks holding the text tokens (the sequence's first tokens in
        a joint text-image sequence) always selected.
      implementation: "auto", "pallas" or "reference" for the PISA layers.
    """

    kind: str = "pisa"
    density: float = 0.15
    order: int = 1
    use_bias: bool = True
    block_size: int = 64
    exact_text: bool = False
    implementation: str = "auto"

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        if self.kind == "pisa":
            check_density(self.density)
            check_choice("order", self.order, ORDERS)
            check_block_size(self.block_size)


DENSE = AttentionPolicy(kind="dense")


def layer_policies(num_layers: int, *, dense_layers: int = 4, **pisa_options) -> tuple:
    """The published FLUX setting by default: first `dense_layers` dense, the rest PISA."""
    if not 0 <= dense_layers <= num_layers:
        raise ValueError(f"dense_layers must be in [0, {num_layers}]; got {dense_layers}")
    pisa = AttentionPolicy(kind="pisa", **pisa_options)
    return tuple(DENSE if i < dense_layers else pisa for i in range(num_layers))


class Attention(nnx.Module):
    """Parameter-free attention op of one layer, following its `AttentionPolicy`.

    Call with q, k, v `[B, H, T, D]` (layout "bhtd", as multi-head projections produce
    them) or `[B, T, H, D]` with `layout="bthd"`; returns the same layout and dtype.
    `dense=True` forces dense attention for this call (e.g. a sampler's first steps).
    Dense attention is cuDNN on a GPU (half types) and XLA elsewhere.
    """

    def __init__(self, policy: AttentionPolicy = DENSE):
        if not isinstance(policy, AttentionPolicy):
            raise TypeError(f"policy must be an AttentionPolicy; got {type(policy).__name__}")
        self.policy = policy

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, num_text_tokens: int = 0,
                 dense: bool = False, layout: str = "bhtd") -> jax.Array:
        p = self.policy
        if dense or p.kind == "dense":
            return dense_attention(q, k, v, layout=layout)
        forced = None
        if p.exact_text and num_text_tokens > 0:
            t = q.shape[2 if layout == "bhtd" else 1]
            forced = range(min(num_blocks(num_text_tokens, p.block_size), num_blocks(t, p.block_size)))
        return piecewise_sparse_attention(
            q, k, v, density=p.density, block_size=p.block_size, order=p.order,
            use_bias=p.use_bias, forced_blocks=forced, layout=layout,
            implementation=p.implementation)
