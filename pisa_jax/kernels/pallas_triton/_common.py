"""Helpers shared by the Triton kernels: input preparation, block specs, dot precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pisa_jax._blocks import pad_tokens
from pisa_jax.kernels.pallas_triton.config import supported_head_dim


def prepare(x: jax.Array, block_size: int, layout: str) -> jax.Array:
    """Zero-pads the token axis to whole blocks and the head dim to a power of two.

    Zero padding is exact here: padded keys are masked in the kernels and padded head
    channels add nothing to any dot product. Whole-block, power-of-two inputs are
    passed through untouched (no copy).
    """
    x = pad_tokens(x, block_size, layout)
    d_pad = supported_head_dim(x.shape[-1]) - x.shape[-1]
    if d_pad:
        x = jnp.pad(x, [(0, 0)] * 3 + [(0, d_pad)])
    return x


def token_block_spec(layout: str, rows: int, d: int, index) -> pl.BlockSpec:
    """Spec of a `[rows, D]` slab of one (batch, head) in either layout, no transposes.

    `index(*grid_ids)` returns (batch, head, row block).
    """
    if layout == "bthd":
        return pl.BlockSpec((None, rows, None, d),
                            lambda *g: (index(*g)[0], index(*g)[2], index(*g)[1], 0))
    return pl.BlockSpec((None, None, rows, d),
                        lambda *g: (index(*g)[0], index(*g)[1], index(*g)[2], 0))


def dot_precision(dtype) -> dict:
    """float32 inputs get true float32 products; half types use the tensor cores as is."""
    return dict(allow_tf32=False) if jnp.dtype(dtype) == jnp.float32 else {}
