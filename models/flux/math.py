"""FLUX's math: rotary embedding, timestep embedding, attention with rope."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.embeddings import rope_angles, sinusoidal_embedding


def position_embedding(ids: jax.Array, axes_dim, theta: int) -> jax.Array:
    """`[B, L, 1, D/2, 2, 2]` rotation matrices from ids `[B, L, n_axes]` (float32)."""
    ang = rope_angles(ids, axes_dim, theta)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return jnp.stack([cos, -sin, sin, cos], axis=-1).reshape(*ang.shape, 2, 2)[:, :, None]


def apply_rope(x: jax.Array, pe: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0, x1) of `x` `[B, L, H, D]` in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of `time_factor * t` (FLUX takes times in [0, 1])."""
    return sinusoidal_embedding(time_factor * t.astype(jnp.float32), dim, max_period)


def attention(q, k, v, pe, attn, *, num_text_tokens: int, dense: bool) -> jax.Array:
    """Rope on q and k, then `attn` (a `pisa_jax.Attention`); `[B, L, H, D]` -> `[B, L, H*D]`.

    Heads stay on the third axis ("bthd") from the projection to the output, so neither
    the kernels nor cuDNN need a transposed copy of q, k, v or of the output.
    """
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = attn(q, k, v, num_text_tokens=num_text_tokens, dense=dense, layout="bthd")
    b, l, h, d = out.shape
    return out.reshape(b, l, h * d)
