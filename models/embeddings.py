"""Embeddings shared by the diffusion transformers: sinusoidal timestep embeddings and
rotary (RoPE) angles of multi-axis token positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """`[B, dim]` float32 sinusoids of `t` `[B]`: cosines first, then sines, at frequencies
    `max_period^(-i / (dim/2))`."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_angles(positions: jax.Array, axes_dims, theta: float) -> jax.Array:
    """`[..., L, D/2]` float32 rotation angles of tokens at `positions` `[..., L, n_axes]`.

    Axis `a` rotates its own consecutive slice of the head dim's pairs: `axes_dims[a] / 2`
    pairs with frequencies `theta^(-2i / axes_dims[a])` (FLUX: text/row/column; Wan:
    frame/height/width).
    """
    parts = []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        parts.append(positions[..., a, None].astype(jnp.float32) * freqs)
    return jnp.concatenate(parts, axis=-1)
