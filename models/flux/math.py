"""FLUX's math: rotary embedding, timestep embedding, attention with rope."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope(pos: jax.Array, dim: int, theta: int) -> jax.Array:
    """`[..., L, dim/2, 2, 2]` rotation matrices for one position axis (float32)."""
    freqs = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    ang = pos.astype(jnp.float32)[..., None] * freqs
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return jnp.stack([cos, -sin, sin, cos], axis=-1).reshape(*ang.shape, 2, 2)


def position_embedding(ids: jax.Array, axes_dim, theta: int) -> jax.Array:
    """`[B, 1, L, D/2, 2, 2]` from ids `[B, L, n_axes]`, the axes' pairs concatenated."""
    emb = jnp.concatenate([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-3)
    return emb[:, None]


def apply_rope(x: jax.Array, pe: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0, x1) of `x` `[B, H, L, D]` in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of `time_factor * t`, cosines first (float32)."""
    t = time_factor * t.astype(jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def attention(q, k, v, pe, attn, *, num_text_tokens: int, dense: bool) -> jax.Array:
    """Rope on q and k, then `attn` (a `pisa_jax.Attention`); `[B, H, L, D]` -> `[B, L, H*D]`."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = attn(q, k, v, num_text_tokens=num_text_tokens, dense=dense, layout="bhtd")
    b, h, l, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, l, h * d)
